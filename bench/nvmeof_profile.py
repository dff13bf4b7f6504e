"""Profile (not a test): our NVMe/TCP target on the host over loopback, a file
as backend, a lean pipelined initiator keeping QD commands in flight.

    .venv/bin/python bench/nvmeof_profile.py [--seconds 5] [--qd 32] [--bs 4096]
        [--rw randread|randwrite|read|write] [--profile out.prof] [--workers N]

Prints IOPS, MiB/s and the target's CPU time per command (utime+stime of the
target process / commands): the figure that matters under TCG, where the
target, fio and the kernel initiator share the same 2 vCPUs.  With --profile
the target runs under cProfile and the top functions are printed."""

import argparse
import os
import pstats
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "host"))
sys.path.insert(0, ROOT)

from nvmeof_target import pdu  # noqa: E402
from nvmeof_target.command import build_sqe  # noqa: E402
from nvmeof_target.control import Client, ControlError  # noqa: E402
from nvme_peer import HOSTNQN, Host, SocketTransport  # noqa: E402
from conftest import free_port  # noqa: E402  (tests/host: one free_port)

NQN = "nqn.2014-08.org.zfs-ng:bench:prof"
HDR = struct.Struct("<BBBBI")


def start(tmp, port, prof, workers, file_dir):
    state, sock = os.path.join(tmp, "t.db"), os.path.join(tmp, "t.sock")
    argv = [sys.executable]
    if prof:
        argv += ["-m", "cProfile", "-o", prof]
    argv += ["-m", "sr_tools", "target", "serve", "--listen", "127.0.0.1:%d" % port,
             "--state", state, "--socket", sock, "--workers", str(workers),
             "--file-dir", file_dir]
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    while True:
        try:
            Client(sock).stats()
            return proc, sock
        except ControlError:
            if proc.poll() is not None:
                raise SystemExit("target died")
            time.sleep(0.05)


def cpu_of(pids):
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / float(tick)
    return total


def target_pids(proc):
    kids = []
    try:
        with open("/proc/%d/task/%d/children" % (proc.pid, proc.pid)) as f:
            kids = [int(x) for x in f.read().split()]
    except OSError:
        pass
    return [proc.pid] + kids


def io_queue(port, cntlid, qd):
    h = Host(SocketTransport(("127.0.0.1", port)))
    h.icreq()
    h.connect(NQN, qid=1, cntlid=cntlid, sqsize=max(qd, 32) * 2 - 1, kato=0)
    return h


def run_load(h, rw, bs, qd, seconds, nblocks):
    """Keep qd commands in flight for `seconds`; returns completed commands."""
    sock = h.t.sock
    rnd = random.Random(7)
    nlb = bs // 512
    span = nblocks - nlb
    seq = [0]
    payload = os.urandom(bs)
    write = rw in ("randwrite", "write")
    inline = write and bs <= 8192

    def lba():
        if rw.startswith("rand"):
            return rnd.randrange(0, span // nlb) * nlb
        seq[0] = (seq[0] + nlb) % span
        return seq[0]

    def cmd(cid):
        s = lba()
        fields = dict(opcode=0x01 if write else 0x02, nsid=1, cdw10=s & 0xFFFFFFFF,
                      cdw11=s >> 32, cdw12=nlb - 1, cid=cid, sgl_len=bs,
                      sgl_id=pdu.SGL_INLINE if inline else pdu.SGL_TRANSPORT)
        return pdu.capsule_cmd(build_sqe(**fields), payload if inline else b"")

    sock.sendall(b"".join(cmd(c) for c in range(1, qd + 1)))
    buf = bytearray()
    done = 0
    end = time.time() + seconds
    stopping = False
    inflight = qd
    while inflight:
        data = sock.recv(1 << 20)
        if not data:
            raise SystemExit("target closed the connection")
        buf += data
        out = []
        pos = 0
        while len(buf) - pos >= 8:
            ptype, _, _, _, plen = HDR.unpack_from(buf, pos)
            if len(buf) - pos < plen:
                break
            if ptype == pdu.RSP:
                cid, status = struct.unpack_from("<HH", buf, pos + 20)
                if status >> 1:
                    raise SystemExit("status %#x" % (status >> 1))
                done += 1
                if not stopping and time.time() >= end:
                    stopping = True
                if stopping:
                    inflight -= 1
                else:
                    out.append(cmd(cid))
            elif ptype == pdu.R2T:
                cid, ttag, off, ln = pdu.DATA_HDR.unpack_from(buf, pos)[5:9]
                out.append(pdu.h2c_data(cid, ttag, payload[off:off + ln], off, True))
            elif ptype == pdu.C2H_TERM:
                raise SystemExit("C2HTermReq")
            pos += plen
        del buf[:pos]
        if out:
            sock.sendall(b"".join(out))
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--qd", type=int, default=32)
    ap.add_argument("--bs", type=int, default=4096)
    ap.add_argument("--rw", default="randread", choices=("randread", "randwrite", "read", "write"))
    ap.add_argument("--size", type=int, default=128 << 20)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--dir", help="where the backing file goes (e.g. /dev/shm: tmpfs takes "
                    "O_DIRECT AIO and completes it at once, so the target's own CPU cost shows)")
    ap.add_argument("--profile", help="cProfile output file (target process)")
    opts = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="nvmeof-prof-")
    path = os.path.join(opts.dir or tmp, "vol-%d.img" % os.getpid())
    with open(path, "wb") as f:          # real data, so reads copy real pages
        chunk = os.urandom(1 << 20)
        for _ in range(opts.size >> 20):
            f.write(chunk)
    port = free_port()
    proc, csock = start(tmp, port, opts.profile, opts.workers, os.path.dirname(path))
    try:
        Client(csock).add(NQN, path, str(uuid.uuid4()), allow_any_host=True)
        admin = Host(SocketTransport(("127.0.0.1", port)))
        admin.icreq()
        cntlid = admin.connect(NQN, HOSTNQN)
        admin.enable()
        h = io_queue(port, cntlid, opts.qd)
        run_load(h, opts.rw, opts.bs, opts.qd, 0.5, opts.size // 512)     # warm up
        pids = target_pids(proc)
        cpu0, t0, c0 = cpu_of(pids), time.time(), time.process_time()
        n = run_load(h, opts.rw, opts.bs, opts.qd, opts.seconds, opts.size // 512)
        wall, cpu = time.time() - t0, cpu_of(pids) - cpu0
        client = time.process_time() - c0
        print("%s bs=%d qd=%d: %.0f IOPS, %.1f MiB/s, target CPU %.1f us/cmd (%.0f%% of a core),"
              " initiator %.0f%%" % (opts.rw, opts.bs, opts.qd, n / wall,
                                      n * opts.bs / wall / 1048576.0, cpu / n * 1e6,
                                      cpu / wall * 100, client / wall * 100))
        h.t.close()
        admin.t.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        os.unlink(path)
        shutil.rmtree(tmp, ignore_errors=True)     # the target's registry and socket
    if opts.profile:
        pstats.Stats(opts.profile).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
