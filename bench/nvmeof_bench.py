"""Benchmark (not a test): our NVMe/TCP target against the kernel's nvmet-tcp
on the same zvol, in ONE run inside the test VM, plus the target's footprint
with 100,000 configured volumes.

    python3 tests/vm/vm.py run -- python3 bench/nvmeof_bench.py [--runtime 10]

Prints one table of fio results with our/kernel ratios, then RSS, fd count and
startup time with 100k volumes.  Absolute figures under TCG mean little; the
ratios measured in the same run are the point."""

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
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, ROOT)

from kernel_nvmet import KernelTarget, connect, disconnect, find_namespace  # noqa: E402

JOBS = [("4K randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"]),
        ("4K randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"]),
        ("128K seq read QD8", ["--rw=read", "--bs=128k", "--iodepth=8"]),
        ("128K seq write QD8", ["--rw=write", "--bs=128k", "--iodepth=8"])]


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=True, stdout=subprocess.PIPE,
                          universal_newlines=True, **kw).stdout


def fio(dev, args, runtime, size):
    out = sh("fio", "--name=b", "--filename=" + dev, "--ioengine=libaio", "--direct=1",
             "--time_based", "--runtime=%d" % runtime, "--size=%s" % size, "--randseed=7",
             "--output-format=json", *args)
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return side["iops"], side["bw"] / 1024.0


def run_jobs(dev, runtime, size):
    return [fio(dev, args, runtime, size) for _, args in JOBS]


def start_target(state, sock, port, workers=1, profile=None, root=ROOT):
    env = dict(os.environ, PYTHONPATH=root)
    t0 = time.time()
    prof = ["-m", "cProfile", "-o", profile] if profile else []
    proc = subprocess.Popen([sys.executable] + prof + ["-m", "sr_tools", "target", "serve", "--listen",
                             "127.0.0.1:%d" % port, "--state", state, "--socket", sock,
                             "--workers", str(workers)], cwd=root, env=env)
    from nvmeof_target.control import Client, ControlError
    while True:
        try:
            Client(sock).stats()
            break
        except ControlError:
            if proc.poll() is not None:
                raise SystemExit("target died")
            time.sleep(0.02)
    return proc, time.time() - t0


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def footprint(pid):
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024.0
    return rss, len(os.listdir("/proc/%d/fd" % pid))


def scale(tmp, n, port):
    from nvmeof_target.registry import Registry
    state = os.path.join(tmp, "scale-%d.db" % n)
    reg = Registry(state)
    rows = [("nqn.2014-08.org.zfs-ng:bench:vol-%06d" % i, "/dev/zvol/bench/vol-%06d" % i,
             str(uuid.UUID(int=i + 1)), False, False, 512) for i in range(n)]
    reg.add_many(rows)
    reg.close()
    sock = os.path.join(tmp, "scale-%d.sock" % n)
    proc, startup = start_target(state, sock, port)
    try:
        from nvmeof_target.control import Client
        stats = Client(sock).stats()
        rss, fds = footprint(proc.pid)
    finally:
        stop(proc)
    return stats["volumes"], startup, rss, fds


def print_scale(tmp, volumes):
    # startup = process start until the control socket answers (interpreter included)
    for n in (0, volumes):
        got, startup, rss, fds = scale(tmp, n, 4422)
        print("target with %d configured volumes: startup %.2f s, RSS %.1f MiB, %d fds"
              % (got, startup, rss, fds))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10)
    ap.add_argument("--size", default="128m")
    ap.add_argument("--volumes", type=int, default=100000)
    ap.add_argument("--disk", default="/dev/disk/by-id/virtio-zfsng-d0")
    ap.add_argument("--scale-only", action="store_true", help="Only the 100k-volume footprint.")
    ap.add_argument("--jobs", help="only the jobs whose name contains one of these (comma list)")
    ap.add_argument("--quick", action="store_true", help="1 worker only, no 100k footprint")
    ap.add_argument("--profile", help="run our 1-worker target under cProfile, print the top")
    ap.add_argument("--base", help="also run the target of this other checkout (e.g. a git "
                    "worktree of an older commit), 1 worker, for a before/after in one run")
    opts = ap.parse_args()
    if opts.jobs:
        JOBS[:] = [j for j in JOBS if any(k in j[0] for k in opts.jobs.split(","))]
    tmp = tempfile.mkdtemp(prefix="nvmeof-bench-")
    if opts.scale_only:
        return print_scale(tmp, opts.volumes)
    pool = "bench%s" % uuid.uuid4().hex[:4]
    sh("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", pool, opts.disk)
    try:
        sh("zfs", "create", "-s", "-V", "512M", "-o", "volblocksize=16K", pool + "/v")
        zvol = "/dev/zvol/%s/v" % pool
        while not os.path.exists(zvol):
            sh("udevadm", "settle")
            time.sleep(0.2)
        # fill the working set so reads hit real (incompressible) blocks
        sh("fio", "--name=fill", "--filename=" + zvol, "--rw=write", "--bs=1m",
           "--size=" + opts.size, "--ioengine=libaio", "--direct=1", "--iodepth=4",
           "--refill_buffers", "--output-format=json")

        with KernelTarget(zvol, port=4421) as kt:
            connect(kt.nqn, 4421)
            dev = find_namespace(kt.ns_uuid)
            kernel = run_jobs(dev, opts.runtime, opts.size)
            disconnect(kt.nqn)
            time.sleep(1)

        def ours(workers, root=ROOT):
            state = os.path.join(tmp, "t%d.db" % workers)
            sock = os.path.join(tmp, "t%d.sock" % workers)
            prof = opts.profile if workers == 1 else None
            if root != ROOT:
                state, sock, prof = state + ".base", sock + ".base", None
            proc, _ = start_target(state, sock, 4420, workers, prof, root)
            try:
                from nvmeof_target.control import Client
                nqn, ns_uuid = "nqn.2014-08.org.zfs-ng:bench:v%d" % workers, str(uuid.uuid4())
                Client(sock).add(nqn, zvol, ns_uuid, allow_any_host=True)
                connect(nqn, 4420)
                dev = find_namespace(ns_uuid)
                res = run_jobs(dev, opts.runtime, opts.size)
                fp = footprint(proc.pid)
                disconnect(nqn)
                time.sleep(1)
                return res, fp
            finally:
                stop(proc)

        ours1, (busy_rss, busy_fds) = ours(1)
        ours2 = ours(2)[0] if not opts.quick else [(0, 0)] * len(JOBS)
        if opts.base:
            base = ours(1, os.path.abspath(opts.base))[0]
            print()
            print("before/after, 1 worker (%s vs this checkout)" % opts.base)
            print("| job | kernel | before | ratio | after | ratio |")
            print("|---|---|---|---|---|---|")
            for (name, _), k, b, o in zip(JOBS, kernel, base, ours1):
                i = 0 if name.startswith("4K") else 1
                fmt = "%.0f IOPS" if i == 0 else "%.1f MiB/s"
                print("| %s | %s | %s | %.2f | %s | %.2f |" % (
                    name, fmt % k[i], fmt % b[i], b[i] / k[i] if k[i] else 0,
                    fmt % o[i], o[i] / k[i] if k[i] else 0))
        print()
        print("fio --direct=1 libaio, %ds per job, %s working set, zvol volblocksize 16K lz4"
              % (opts.runtime, opts.size))
        print("| job | kernel nvmet-tcp | zfs-ng, 1 worker | ratio | zfs-ng, 2 workers | ratio |")
        print("|---|---|---|---|---|---|")
        for (name, _), k, o1, o2 in zip(JOBS, kernel, ours1, ours2):
            i = 0 if name.startswith("4K") else 1
            fmt = "%.0f IOPS" if i == 0 else "%.1f MiB/s"
            cells = [fmt % k[i]]
            for o in (o1, o2):
                cells += [fmt % o[i], "%.2f" % (o[i] / k[i] if k[i] else 0)]
            print("| %s | %s |" % (name, " | ".join(cells)))
        print("target while serving 1 volume: RSS %.1f MiB, %d fds" % (busy_rss, busy_fds))
        if opts.profile:
            import pstats
            pstats.Stats(opts.profile).sort_stats("tottime").print_stats(30)
        if not opts.quick:
            print_scale(tmp, opts.volumes)
    finally:
        subprocess.run(["nvme", "disconnect-all"], stdout=subprocess.PIPE)
        subprocess.run(["zpool", "destroy", "-f", pool])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
