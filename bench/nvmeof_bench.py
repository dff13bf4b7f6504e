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


CPU_NOTES = []       # (label, job, text) when --cpu


def sys_cpu():
    """Jiffies of the whole guest: user+nice, system, irq+softirq, idle+iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return [v[0] + v[1], v[2], v[5] + v[6], v[3] + v[4]]


def proc_cpu(pids):
    """(utime, stime) seconds of these processes, all threads."""
    u = s = 0
    tick = float(os.sysconf("SC_CLK_TCK"))
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        u += int(fields[11])
        s += int(fields[12])
    return u / tick, s / tick


def tree(pid):
    """pid and its children (the workers of a --workers N target)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [pid] + [int(x) for x in f.read().split()]
    except OSError:
        return [pid]


def fio(dev, args, runtime, size, pids=(), label=""):
    import resource
    argv = ["fio", "--name=b", "--filename=" + dev, "--ioengine=libaio", "--direct=1",
            "--time_based", "--runtime=%d" % runtime, "--size=%s" % size, "--randseed=7",
            "--output-format=json"] + list(args)
    r0, s0, p0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), sys_cpu(), proc_cpu(pids), \
        time.time()
    out = sh(*argv)
    r1, s1, p1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), sys_cpu(), proc_cpu(pids), \
        time.time() - t0
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    if label:
        tick = float(os.sysconf("SC_CLK_TCK"))
        usr, sy, irq, idle = [(b - a) / tick for a, b in zip(s0, s1)]
        ncpu = os.cpu_count()
        fu, fs = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        tu, ts = p1[0] - p0[0], p1[1] - p0[1]
        n = side["iops"] * wall or 1
        text = ("%.1fs wall x %d CPUs: guest user %.1fs sys %.1fs irq/softirq %.1fs idle %.1fs;"
                " fio %.1fu+%.1fs" % (wall, ncpu, usr, sy, irq, idle, fu, fs))
        if pids:
            text += "; target %.1fu+%.1fs = %.0f%% of a CPU, %.0f us/cmd" % (
                tu, ts, (tu + ts) / wall * 100, (tu + ts) / n * 1e6)
        CPU_NOTES.append((label, text))
    return side["iops"], side["bw"] / 1024.0


def drop_caches():
    """Each target starts on a cold page cache (the ARC stays warm), whatever ran before."""
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def median(runs):
    """Per job, the run of median IOPS (runs: one list of (iops, MiB/s) per round)."""
    return [sorted(col)[len(col) // 2] for col in zip(*runs)]


def run_jobs(dev, runtime, size, pids=(), label="", extra=()):
    return [fio(dev, list(args) + list(extra), runtime, size, pids, label and label + " " + name)
            for name, args in JOBS]


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
    ap.add_argument("--numjobs", type=int, default=1,
                    help="fio --numjobs (the Linux host opens one I/O queue per CPU, so "
                    "2 jobs use 2 queues, possibly served by 2 workers)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat kernel/ours (and --base) in turn; medians are reported")
    ap.add_argument("--two", action="store_true", help="with --quick: still run 2 workers")
    ap.add_argument("--base", help="also run the target of this other checkout (e.g. a git "
                    "worktree of an older commit), 1 worker, for a before/after in one run")
    opts = ap.parse_args()
    extra = ["--numjobs=%d" % opts.numjobs, "--group_reporting"] if opts.numjobs > 1 else []
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

        def kernel_run():
            drop_caches()
            with KernelTarget(zvol, port=4421) as kt:
                connect(kt.nqn, 4421)
                dev = find_namespace(kt.ns_uuid)
                res = run_jobs(dev, opts.runtime, opts.size, label="kernel", extra=extra)
                disconnect(kt.nqn)
                time.sleep(1)
            return res

        def ours(workers, root=ROOT, rnd=0):
            name = "t%d-%d%s" % (workers, rnd, ".base" if root != ROOT else "")
            state, sock = os.path.join(tmp, name + ".db"), os.path.join(tmp, name + ".sock")
            prof = opts.profile if workers == 1 and root == ROOT and rnd == 0 else None
            drop_caches()
            proc, _ = start_target(state, sock, 4420, workers, prof, root)
            try:
                from nvmeof_target.control import Client
                nqn, ns_uuid = "nqn.2014-08.org.zfs-ng:bench:v%d" % workers, str(uuid.uuid4())
                Client(sock).add(nqn, zvol, ns_uuid, allow_any_host=True)
                connect(nqn, 4420)
                dev = find_namespace(ns_uuid)
                label = "zfs-ng %d worker(s)%s" % (workers, " (base)" if root != ROOT else "")
                res = run_jobs(dev, opts.runtime, opts.size, tree(proc.pid), label, extra)
                fp = footprint(proc.pid)
                if workers == 1:
                    st = Client(sock).stats()
                    if st.get("aio_reads"):
                        CPU_NOTES.append((label, "AIO: %(aio_reads)d reads, %(aio_submits)d "
                                          "io_submit, %(aio_wakeups)d wakeups, %(aio_redone)d "
                                          "redone synchronously" % st))
                disconnect(nqn)
                time.sleep(1)
                return res, fp
            finally:
                stop(proc)

        # Rounds interleave the targets so that load from outside the VM (TCG
        # vCPUs share the host) hits all of them alike; the median is printed.
        rounds = {"kernel": [], "ours1": [], "ours2": [], "base": []}
        for rnd in range(opts.rounds):
            rounds["kernel"].append(kernel_run())
            if opts.base:
                rounds["base"].append(ours(1, os.path.abspath(opts.base), rnd)[0])
            res, (busy_rss, busy_fds) = ours(1, rnd=rnd)
            rounds["ours1"].append(res)
            if not opts.quick or opts.two:
                rounds["ours2"].append(ours(2, rnd=rnd)[0])
        kernel, ours1 = median(rounds["kernel"]), median(rounds["ours1"])
        ours2 = median(rounds["ours2"]) if rounds["ours2"] else [(0, 0)] * len(JOBS)
        if opts.rounds > 1:
            print()
            print("each round (4K: IOPS, 128K: MiB/s):")
            for key, runs in sorted(rounds.items()):
                for (name, _), *vals in zip(JOBS, *runs) if runs else ():
                    i = 0 if name.startswith("4K") else 1
                    print("  %-6s %-18s %s" % (key, name, " ".join("%.0f" % v[i] for v in vals)))
        if opts.base:
            base = median(rounds["base"])
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
        print("CPU while each job ran (jiffies of the guest, %d vCPUs):" % os.cpu_count())
        for label, text in CPU_NOTES:
            print("  %s: %s" % (label, text))
        print()
        print("fio --direct=1 libaio, %ds per job, %s working set, zvol volblocksize 16K lz4%s"
              % (opts.runtime, opts.size, ", numjobs=%d" % opts.numjobs if extra else ""))
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
