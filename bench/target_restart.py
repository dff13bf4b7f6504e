#!/usr/bin/env python3
"""The NVMe/TCP target restarted with many registered volumes (issue 13's
"the target restarts with 100,000 registered volumes and serves the first I/O
in <= 2 s"): N subsystems in the registry, the target started, and the time
until a host has connected (admin + I/O queue) and read 4 KiB from one of
them, compared with the same at --small registered volumes in the same run.
Runs on the host (a file as the volume's backend; the other N-1 volumes'
files do not exist, as idle zvols have no device node), or in the test VM:

    .venv/bin/python bench/target_restart.py [-n 100000] [--small 100] [--rounds 3]
    python3 tests/vm/vm.py run -- python3 bench/target_restart.py --installed

--installed: each round also starts the target from the packages as the RPM
installs them (packaging/README.md: the package directories copied to a
local directory and byte-compiled by this python's compileall, as %post
does), alternating with the checkout.  In the test VM the checkout is a 9p
share, where every import's lookups cross to the host: a cost dom0, whose
packages are on its own disk, never pays.

Prints figures (--json FILE too); asserts nothing about time.

In the TCG guest, alone on the machine (thirteenth session, --installed,
3 rounds): first 4 KiB read 0.78-0.84 s from the checkout and from the
installed packages alike, with 100 and with 100,000 registered volumes (the
count does not show; earlier runs of 2.9-8.6 s had other guests beside)."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "host"))
sys.path.insert(0, ROOT)

from nvmeof_target.control import Client, ControlError  # noqa: E402
from nvmeof_target.registry import Registry  # noqa: E402
from nvme_peer import Host, SocketTransport, command, collect, controller  # noqa: E402
from conftest import free_port  # noqa: E402  (tests/host: one free_port)

NQN = "nqn.2014-08.org.zfs-ng:bench-restart:%06d"


def registry(d, n):
    """A registry of n volumes under d; volume 0's file exists (with data)."""
    state = os.path.join(d, "target.db")
    with open(os.path.join(d, "vol-000000.img"), "wb") as f:
        f.write(os.urandom(4096))
        f.truncate(16 << 20)
    reg = Registry(state)
    rows = [(NQN % i, os.path.join(d, "vol-%06d.img" % i), str(uuid.uuid4()), False, True, 512)
            for i in range(n)]
    t = time.time()
    reg.add_many(rows)
    reg.close()
    return state, time.time() - t


PACKAGES = ("plugins", "nvmeof_target", "nbd_server", "blockio", "sr_tools")


def install(where):
    """The packages as the RPM lays them out: .py copied, then compileall."""
    for pkg in PACKAGES:
        shutil.copytree(os.path.join(ROOT, pkg), os.path.join(where, pkg),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "compileall", "-q"] +
                   [os.path.join(where, pkg) for pkg in PACKAGES], check=True,
                   stdout=subprocess.DEVNULL)
    return where


def first_io(d, state, code=ROOT):
    """Seconds from starting the target (its packages from code) to: its
    control socket answering, and 4 KiB read from volume 0 over a fresh
    admin + I/O queue."""
    port, sock = free_port(), os.path.join(d, "t.sock")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
                             "127.0.0.1:%d" % port, "--state", state, "--socket", sock,
                             "--file-dir", d], cwd=code, env=dict(os.environ, PYTHONPATH=code),
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                Client(sock).stats()
                break
            except ControlError:
                if proc.poll() is not None:
                    sys.exit("target exited with %d" % proc.returncode)
                time.sleep(0.01)
        t_ready = time.time() - t0
        admin, cntlid = controller(port, NQN % 0)
        io = Host(SocketTransport(("127.0.0.1", port)))
        io.icreq()
        io.connect(NQN % 0, qid=1, cntlid=cntlid, sqsize=31, kato=0)
        io.t.send(command(0x02, 1, slba=0, nbytes=4096))
        status, data = collect(io, [1])[1]
        t_io = time.time() - t0
        want = open(os.path.join(d, "vol-000000.img"), "rb").read(4096)
        assert status == 0 and data == want, "the read returned the wrong data"
        io.t.close()
        admin.t.close()
        return t_ready, t_io
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--installed", action="store_true",
                    help="also from the packages installed as the RPM does, alternately")
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    code_dir = tempfile.mkdtemp(prefix="zfsng-installed-")
    try:
        layouts = [("checkout", ROOT)]
        if args.installed:
            layouts.append(("installed", install(code_dir)))
        for n in (args.small, args.n):
            d = tempfile.mkdtemp(prefix="zfsng-restart-")
            try:
                state, t_reg = registry(d, n)
                runs = {name: [] for name, _ in layouts}
                for i in range(args.rounds):
                    for name, code in (layouts if i % 2 == 0 else layouts[::-1]):
                        runs[name].append(first_io(d, state, code))
                for name, _ in layouts:
                    rs = runs[name]
                    out.setdefault(name, {})[n] = {
                        "register": t_reg, "ready": [r[0] for r in rs],
                        "first_io": [r[1] for r in rs]}
                    print("%-9s %7d volumes: registered in %.1f s; target up %s s, first 4K "
                          "read %s s" % (name, n, t_reg, " ".join("%.2f" % r[0] for r in rs),
                                         " ".join("%.2f" % r[1] for r in rs)))
            finally:
                shutil.rmtree(d)
    finally:
        shutil.rmtree(code_dir)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
