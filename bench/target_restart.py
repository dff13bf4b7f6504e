#!/usr/bin/env python3
"""The NVMe/TCP target restarted with many registered volumes (issue 13's
"the target restarts with 100,000 registered volumes and serves the first I/O
in <= 2 s"): N subsystems in the registry, the target started, and the time
until a host has connected (admin + I/O queue) and read 4 KiB from one of
them, compared with the same at --small registered volumes in the same run.
Runs on the host (a file as the volume's backend; the other N-1 volumes'
files do not exist, as idle zvols have no device node):

    .venv/bin/python bench/target_restart.py [-n 100000] [--small 100] [--rounds 3]

Prints figures (--json FILE too); asserts nothing about time."""

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


def first_io(d, state):
    """Seconds from starting the target to: its control socket answering, and
    4 KiB read from volume 0 over a fresh admin + I/O queue."""
    port, sock = free_port(), os.path.join(d, "t.sock")
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
                             "127.0.0.1:%d" % port, "--state", state, "--socket", sock,
                             "--file-dir", d], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
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
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    for n in (args.small, args.n):
        d = tempfile.mkdtemp(prefix="zfsng-restart-")
        try:
            state, t_reg = registry(d, n)
            runs = [first_io(d, state) for _ in range(args.rounds)]
            out[n] = {"register": t_reg, "ready": [r[0] for r in runs],
                      "first_io": [r[1] for r in runs]}
            print("%7d volumes: registered in %.1f s; target up %s s, first 4K read %s s"
                  % (n, t_reg, " ".join("%.2f" % r[0] for r in runs),
                     " ".join("%.2f" % r[1] for r in runs)))
        finally:
            shutil.rmtree(d)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
