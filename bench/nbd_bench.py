#!/usr/bin/env python3
"""NBD server benchmark: zfs-ng's nbd_server against nbdkit's file plugin and
qemu-nbd, on the same page-cached file, same workloads, same run.  Prints a
table with our/reference throughput ratios.  A benchmark, not a test: no
assertion on timings.

    .venv/bin/python bench/nbd_bench.py [--size-mib 256] [--repeat 3]

Workloads (unix sockets; clients are libnbd's nbdcopy and qemu-img bench):
  copy-read       nbdcopy export -> null:, 4 connections, 256 KiB requests
  copy-read-2M-1c nbdcopy --connections=1 --request-size=2M (Xen Orchestra's pattern)
  copy-write      nbdcopy file -> export, 4 connections
  read-4k-qd16    qemu-img bench: 4 KiB reads, queue depth 16, one connection
  write-4k-qd16   qemu-img bench -w: 4 KiB writes, queue depth 16
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from nbd_server import run as nbd_run  # noqa: E402

MiB = 1 << 20


def wait_socket(path, proc, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("server for %s did not start" % path)
        time.sleep(0.05)
    time.sleep(0.2)


class Ours:
    def __init__(self, workers=1):
        self.workers = workers
        self.name = "zfs-ng" if workers == 1 else "zfs-ng -w%d" % workers

    def start(self, image, sock):
        self.pid = nbd_run.start([{"name": "e", "path": image}], unix_path=sock,
                                 workers=self.workers)

    def stop(self):
        nbd_run.stop(self.pid)


class External:
    def __init__(self, name, argv):
        self.name = name
        self.argv = argv

    def start(self, image, sock):
        argv = [a.format(image=image, sock=sock) for a in self.argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_socket(sock, self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


SERVERS = [
    Ours(),
    Ours(workers=4),
    External("nbdkit file", ["nbdkit", "-f", "-U", "{sock}", "-e", "e", "file", "file={image}"]),
    External("qemu-nbd", ["qemu-nbd", "-f", "raw", "-t", "-e", "16", "--cache=writeback",
                          "-x", "e", "-k", "{sock}", "{image}"]),
]


def workloads(size, src):
    count4k = 20000
    return [
        ("copy-read", size, lambda uri: ["nbdcopy", "--no-extents", uri, "null:"]),
        ("copy-read-2M-1c", size, lambda uri: ["nbdcopy", "--no-extents", "--connections=1",
                                               "--request-size=%d" % (2 * MiB), uri, "null:"]),
        ("copy-write", size, lambda uri: ["nbdcopy", "--no-extents", src, uri]),
        ("read-4k-qd16", count4k * 4096, lambda uri: [
            "qemu-img", "bench", "-f", "raw", "-t", "none", "-c", str(count4k), "-d", "16",
            "-s", "4096", uri]),
        ("write-4k-qd16", count4k * 4096, lambda uri: [
            "qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-c", str(count4k), "-d", "16",
            "-s", "4096", uri]),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs per cell")
    args = ap.parse_args()
    size = args.size_mib * MiB
    tmp = tempfile.mkdtemp(prefix="nbd-bench-")
    os.environ["ZFSNG_TARGET_FILE_DIRS"] = tmp     # our server exports image files only there
    try:
        src = os.path.join(tmp, "src.img")
        with open(src, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        # All servers run at once and take turns on each workload, so that
        # noise from other work on the machine hits them alike.
        results = {}
        running = []
        try:
            for i, srv in enumerate(SERVERS):
                image = os.path.join(tmp, "image%d.img" % i)
                shutil.copyfile(src, image)
                sock = os.path.join(tmp, "s%d.sock" % i)
                srv.start(image, sock)
                running.append((srv, "nbd+unix:///e?socket=%s" % sock))
            for _ in range(args.repeat):
                for wname, nbytes, cmd in workloads(size, src):
                    for srv, uri in running:
                        t0 = time.perf_counter()
                        subprocess.run(cmd(uri), check=True, stdout=subprocess.DEVNULL)
                        rate = nbytes / (time.perf_counter() - t0) / MiB
                        key = (srv.name, wname)
                        results[key] = max(results.get(key, 0), rate)
        finally:
            for srv, _ in running:
                srv.stop()
        names = [s.name for s in SERVERS]
        ours = [n for n in names if n.startswith("zfs-ng")]
        refs = [n for n in names if not n.startswith("zfs-ng")]
        print("%-16s %s" % ("MiB/s", "".join("%14s" % n for n in names)))
        for wname, _, _ in workloads(size, src):
            print("%-16s %s" % (wname, "".join("%14.1f" % results[(n, wname)] for n in names)))
        print()
        print("%-16s %s" % ("ratio", "".join("%26s" % ("%s/%s" % (o, r)) for o in ours
                                             for r in refs)))
        for wname, _, _ in workloads(size, src):
            print("%-16s %s" % (wname, "".join("%26.2f" % (results[(o, wname)] / results[(r, wname)])
                                               for o in ours for r in refs)))
        print("(%d MiB page-cached file, unix sockets, best of %d; %s)" % (
            args.size_mib, args.repeat, "cpus=%d" % os.cpu_count()))
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
