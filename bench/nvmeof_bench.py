"""Benchmark (not a test): our NVMe/TCP target against the kernel's nvmet-tcp
on the same zvols, in ONE run inside the test VM, with both sides doing the
same durable work (issue 13, "make the benchmark fair first").

    python3 tests/vm/vm.py run -- python3 bench/nvmeof_bench.py \\
        [--rounds 3] [--runtime 10] [--workers 1,2] [--json out.json]

Fairness rules, each one a fix of the old bench:
- writes end with a flush inside the measured time (fio --end_fsync=1: fio
  counts the final fsync in the job's runtime, so MiB/s and IOPS include it;
  a --fsync=32 variant flushes every 32 writes);
- before every job: sync, `zpool sync`, and drop_caches, and the ARC caches
  metadata only (primarycache=metadata on the pool, --arc all to keep data):
  no side reads what the other one (or its own previous job) left cached;
- the zvols are filled with incompressible data once, before any side runs;
  the 128K read job covers a range it does not wrap around within its runtime
  (the figure says "wrapped" if it did);
- rounds interleave the sides, in alternating order (even rounds kernel
  first, odd rounds kernel last), and report the median and min..max of each;
- CPU per I/O, both sides alike: all the guest's busy CPU time (/proc/stat:
  target, initiator, zvol threads, softirqs and the same fio on both sides)
  over the I/Os done; for ours also the target processes' own utime+stime
  (/proc/PID/stat);
- 4K QD1 randread latency: fio's completion-latency p50 and p99;
- 16 volumes x QD8 4K randread: one fio, one job per volume, aggregate IOPS.

Each side connects the same 17 namespaces (the main zvol and 16 small ones)
before its jobs.  The goals (issue 13) are checked on the median ratios
ours/kernel and printed with the table; absolute figures under TCG mean
little, the ratios measured in the same run are the point.  `--scale` adds
the old footprint figures (startup, RSS, fds with --volumes configured)."""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "e2e"))
sys.path.insert(0, ROOT)

from kernel_nvmet import NVMET, connect, disconnect  # noqa: E402

NVOLS = 16
KERNEL = "kernel"


class Job(object):
    """name, fio arguments, unit ("IOPS" or "MiB/s"), goal ((">=" or "<=", x)
    on the ratio, or None), multi: one fio job per small volume."""

    def __init__(self, key, name, args, unit, goal=None, goal2=None, multi=False, lat=False):
        self.key, self.name, self.args, self.unit = key, name, args, unit
        self.goal = goal            # on every worker count
        self.goal2 = goal2          # instead, with 2 or more workers
        self.multi, self.lat = multi, lat


JOBS = [
    Job("rr4k", "4K randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "IOPS",
        (">=", 1.0), (">=", 1.3)),
    Job("rw4k", "4K randwrite QD32 +end fsync",
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--end_fsync=1"], "IOPS", (">=", 1.0)),
    Job("rw4k_f32", "4K randwrite QD32 fsync=32",
        ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=32"], "IOPS"),
    Job("sr128k", "128K seq read QD8 cold", ["--rw=read", "--bs=128k", "--iodepth=8"], "MiB/s",
        (">=", 1.0)),
    Job("sw128k", "128K seq write QD8 +end fsync",
        ["--rw=write", "--bs=128k", "--iodepth=8", "--end_fsync=1"], "MiB/s", (">=", 1.0)),
    Job("sw128k_f32", "128K seq write QD8 fsync=32",
        ["--rw=write", "--bs=128k", "--iodepth=8", "--fsync=32"], "MiB/s"),
    Job("qd1", "4K randread QD1 p99 latency", ["--rw=randread", "--bs=4k", "--iodepth=1"], "us",
        ("<=", 1.5), lat=True),
    Job("multi", "16 vols x QD8 4K randread", ["--rw=randread", "--bs=4k", "--iodepth=8"], "IOPS",
        (">=", 1.0), multi=True),
]


def sh(*argv, **kw):
    return subprocess.run(list(argv), check=True, stdout=subprocess.PIPE,
                          universal_newlines=True, **kw).stdout


def log(msg):
    print("[%s] %s" % (time.strftime("%H:%M:%S"), msg), flush=True)


def find_namespace(ns_uuid, timeout=30.0):
    """The block device of the connected namespace with this UUID.  Only
    nvmeXnY with a device node: with native multipath the hidden per-path
    nvmeXcYnZ carry the same uuid but have no /dev node, and fio would then
    create a regular file of that name in /dev (devtmpfs) and measure RAM."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob("/sys/class/block/nvme*n*/uuid"):
            name = path.split("/")[-2]
            if not re.match(r"^nvme\d+n\d+$", name):
                continue
            try:
                if open(path).read().strip() != ns_uuid:
                    continue
                if stat.S_ISBLK(os.stat("/dev/" + name).st_mode):
                    return "/dev/" + name
            except OSError:
                pass
        time.sleep(0.2)
    raise SystemExit("no NVMe block device with namespace uuid %s" % ns_uuid)


# ---- CPU accounting ----------------------------------------------------------------
TICK = float(os.sysconf("SC_CLK_TCK"))


def guest_busy():
    """Seconds of busy CPU in the whole guest: user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    return (v[0] + v[1] + v[2] + v[5] + v[6]) / TICK


def proc_cpu(pids):
    """utime+stime seconds of these processes (all their threads)."""
    t = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        t += int(fields[11]) + int(fields[12])
    return t / TICK


def tree(pid):
    """pid and its children (the workers of a --workers N target)."""
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [pid] + [int(x) for x in f.read().split()]
    except OSError:
        return [pid]


# ---- one job -------------------------------------------------------------------------
def cold(pool):
    """Nothing cached from before: dirty data on disk, page cache dropped."""
    subprocess.run(["sync"])
    subprocess.run(["zpool", "sync", pool])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fio(job, devs, opts, pids, stats=None):
    """Run one job; returns its figures (a dict).  stats: our target's
    counters, asked before and after (what reached the target)."""
    common = ["--ioengine=libaio", "--direct=1", "--time_based", "--runtime=%d" % opts.runtime,
              "--randseed=7", "--output-format=json", "--group_reporting"] + job.args
    if job.multi:
        argv = ["fio", "--size=%s" % opts.small_size] + common
        for i, d in enumerate(devs["small"]):
            argv += ["--name=v%d" % i, "--filename=" + d]
    else:
        argv = ["fio", "--size=%s" % opts.size, "--numjobs=%d" % opts.numjobs] + common + [
            "--name=b", "--filename=" + devs["main"]]
    s0 = stats() if stats else {}
    b0, p0, t0 = guest_busy(), proc_cpu(pids), time.time()
    out = sh(*argv)
    b1, p1, wall = guest_busy(), proc_cpu(pids), time.time() - t0
    s1 = stats() if stats else {}
    doc = json.loads(out)
    j = doc["jobs"][0]
    if opts.debug:
        for k in doc["jobs"]:
            for d in ("read", "write"):
                x = k[d]
                if x["io_bytes"]:
                    log("    fio %s %s: %d bytes %d ios %.0f iops %d ms err %s" % (
                        k["jobname"], d, x["io_bytes"], x.get("total_ios", -1), x["iops"],
                        x["runtime"], k.get("error")))
    side = j["read"] if j["read"]["io_bytes"] else j["write"]
    ios = max(side.get("total_ios") or 0, 1)
    if opts.debug and s1:
        log("    target counters: " + ", ".join(
            "%s +%d" % (k, s1[k] - s0.get(k, 0)) for k in sorted(s1)
            if isinstance(s1[k], int) and not isinstance(s1[k], bool) and s1[k] != s0.get(k, 0)))
    r = {"iops": side["iops"], "mibs": side["bw"] / 1024.0, "runtime_ms": side["runtime"],
         "io_bytes": side["io_bytes"], "ios": ios, "fio_wall_s": round(wall, 2),
         # the whole guest, fio included (the same fio on both sides): under TCG
         # the tick-sampled /proc/stat and fio's exact rusage do not subtract
         "cpu_us_per_io": (b1 - b0) / ios * 1e6}
    if pids:
        r["target_cpu_us_per_io"] = (p1 - p0) / ios * 1e6
    pct = side.get("clat_ns", {}).get("percentile", {})
    if pct:
        r["p50_us"] = pct.get("50.000000", 0) / 1000.0
        r["p99_us"] = pct.get("99.000000", 0) / 1000.0
    sync = j.get("sync") or {}
    if sync.get("total_ios"):
        r["fsyncs"] = sync["total_ios"]
        r["fsync_mean_us"] = sync.get("lat_ns", {}).get("mean", 0) / 1000.0
    if job.key == "sr128k":
        size = parse_size(opts.size)
        r["wrapped"] = side["io_bytes"] > size
    r["value"] = r["p99_us"] if job.lat else (r["iops"] if job.unit == "IOPS" else r["mibs"])
    return r


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.lower()
    return int(s[:-1]) * mult[s[-1]] if s[-1] in mult else int(s)


# ---- the two targets -------------------------------------------------------------------
class KernelSide(object):
    """nvmet-tcp: one subsystem (one namespace) per zvol, all on one port."""

    def __init__(self, devices, port=4421):
        self.devices = devices
        self.port = port
        self.portdir = os.path.join(NVMET, "ports", str(port))
        tag = uuid.uuid4().hex[:6]
        self.subs = [("nqn.2014-08.org.zfs-ng:kref-%s-%d" % (tag, i), str(uuid.uuid4()))
                     for i in range(len(devices))]

    def pids(self):
        return ()

    def start(self):
        def w(path, value):
            with open(path, "w") as f:
                f.write(str(value))
        os.mkdir(self.portdir)
        for k, v in (("addr_trtype", "tcp"), ("addr_adrfam", "ipv4"),
                     ("addr_traddr", "127.0.0.1"), ("addr_trsvcid", self.port)):
            w(os.path.join(self.portdir, k), v)
        for dev, (nqn, nsid) in zip(self.devices, self.subs):
            sub = os.path.join(NVMET, "subsystems", nqn)
            os.mkdir(sub)
            w(os.path.join(sub, "attr_allow_any_host"), 1)
            ns = os.path.join(sub, "namespaces", "1")
            os.mkdir(ns)
            w(os.path.join(ns, "device_path"), dev)
            w(os.path.join(ns, "device_uuid"), nsid)
            w(os.path.join(ns, "enable"), 1)
            os.symlink(sub, os.path.join(self.portdir, "subsystems", nqn))
        return self.subs

    def stop(self):
        for nqn, _ in self.subs:
            link = os.path.join(self.portdir, "subsystems", nqn)
            if os.path.islink(link):
                os.unlink(link)
        if os.path.isdir(self.portdir):
            os.rmdir(self.portdir)
        for nqn, _ in self.subs:
            sub = os.path.join(NVMET, "subsystems", nqn)
            ns = os.path.join(sub, "namespaces", "1")
            if os.path.isdir(ns):
                with open(os.path.join(ns, "enable"), "w") as f:
                    f.write("0")
                os.rmdir(ns)
            if os.path.isdir(sub):
                os.rmdir(sub)


class OursSide(object):
    """sr_tools target serve --workers N, from the checkout `root`."""

    def __init__(self, devices, tmp, name, workers, root=ROOT, port=4420):
        self.devices, self.workers, self.root, self.port = devices, workers, root, port
        self.state = os.path.join(tmp, name + ".db")
        self.sock = os.path.join(tmp, name + ".sock")
        self.proc = None
        tag = uuid.uuid4().hex[:6]
        self.subs = [("nqn.2014-08.org.zfs-ng:bench-%s-%d" % (tag, i), str(uuid.uuid4()))
                     for i in range(len(devices))]
        self.stats = None

    def pids(self):
        return tree(self.proc.pid)

    def counters(self):
        from nvmeof_target.control import Client
        return Client(self.sock).stats()

    def start(self):
        from nvmeof_target.control import Client, ControlError
        for p in (self.state, self.sock):
            if os.path.exists(p):
                os.unlink(p)
        env = dict(os.environ, PYTHONPATH=self.root)
        for attempt in range(3):     # under a loaded host 9p lookups have failed once
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
                 "127.0.0.1:%d" % self.port, "--state", self.state, "--socket", self.sock,
                 "--workers", str(self.workers)], cwd=self.root, env=env)
            while self.proc.poll() is None:
                try:
                    Client(self.sock).stats()
                    break
                except ControlError:
                    time.sleep(0.05)
            if self.proc.poll() is None:
                break
            log("target exited with %s: starting it again" % self.proc.returncode)
            time.sleep(1)
        else:
            raise SystemExit("target died")
        c = Client(self.sock)
        for dev, (nqn, nsid) in zip(self.devices, self.subs):
            c.add(nqn, dev, nsid, allow_any_host=True)
        return self.subs

    def stop(self):
        if self.proc is None:
            return
        try:
            from nvmeof_target.control import Client
            self.stats = Client(self.sock).stats()
        except Exception:
            pass
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.proc = None


def run_side(side, port, opts, pool):
    """Connect every namespace, run every job (cold before each), disconnect."""
    results = {}
    subs = side.start()
    try:
        devs = []
        for nqn, nsid in subs:
            connect(nqn, port)
            devs.append(find_namespace(nsid))
        devs = {"main": devs[0], "small": devs[1:]}
        for job in JOBS:
            cold(pool)
            results[job.key] = fio(job, devs, opts, side.pids(), getattr(side, "counters", None))
    finally:
        for nqn, _ in subs:
            disconnect(nqn)
        time.sleep(1)
        side.stop()
    return results


# ---- summary ---------------------------------------------------------------------------
def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0


def fmt(v, unit):
    return "%.0f" % v if unit in ("IOPS", "us") else "%.1f" % v


def goal_of(job, side):
    workers = int(side[4:-1]) if side.startswith("ours") and side[4:-1].isdigit() else 1
    return job.goal2 if job.goal2 and workers >= 2 else job.goal


def summarize(rounds, sides, opts, load):
    """rounds: [{side: {job: figures}}]; returns the JSON summary, prints tables."""
    summary = {"jobs": [], "sides": sides, "rounds": len(rounds), "runtime_s": opts.runtime,
               "size": opts.size, "small_size": opts.small_size, "arc": opts.arc,
               "numjobs": opts.numjobs, "loadavg": load, "argv": sys.argv[1:]}
    print()
    print("Per round (value: IOPS, MiB/s, or p99 us for QD1; order alternates each round)")
    for job in JOBS:
        for s in sides:
            vals = [r[s][job.key]["value"] for r in rounds]
            print("  %-30s %-10s %s" % (job.name, s, " ".join(fmt(v, job.unit) for v in vals)))
    print()
    hdr = ["job", "unit", KERNEL + " median (min..max)"]
    for s in sides[1:]:
        hdr += [s + " median (min..max)", "ratio", "goal"]
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    met = []
    for job in JOBS:
        row = {"job": job.name, "key": job.key, "unit": job.unit, "sides": {}}
        cells = [job.name, job.unit]
        kmed = None
        for s in sides:
            figs = [r[s][job.key] for r in rounds]
            vals = [f["value"] for f in figs]
            med = median(vals)
            entry = {"rounds": vals, "median": med, "min": min(vals), "max": max(vals),
                     "cpu_us_per_io": median([f["cpu_us_per_io"] for f in figs])}
            if "target_cpu_us_per_io" in figs[0]:
                entry["target_cpu_us_per_io"] = median([f["target_cpu_us_per_io"] for f in figs])
            if job.lat:
                entry["p50_us"] = median([f["p50_us"] for f in figs])
                entry["iops"] = median([f["iops"] for f in figs])
            if job.key == "sr128k":
                entry["wrapped"] = any(f["wrapped"] for f in figs)
            entry["round_figures"] = figs
            cell = "%s (%s..%s)%s" % (fmt(med, job.unit), fmt(min(vals), job.unit),
                                      fmt(max(vals), job.unit),
                                      " wrapped" if entry.get("wrapped") else "")
            if s == KERNEL:
                kmed = med
                cells.append(cell)
            else:
                ratio = med / kmed if kmed else 0.0
                entry["ratio"] = ratio
                g = goal_of(job, s)
                if g:
                    ok = ratio >= g[1] if g[0] == ">=" else ratio <= g[1]
                    entry["goal"] = "%s %.1f" % g
                    entry["goal_met"] = ok
                    met.append((job.name, s, ok))
                    gtext = "%s %.1f %s" % (g[0], g[1], "met" if ok else "MISSED")
                else:
                    gtext = "-"
                cells += [cell, "%.2f" % ratio, gtext]
            row["sides"][s] = entry
        print("| " + " | ".join(cells) + " |")
        summary["jobs"].append(row)
    print()
    for row in summary["jobs"]:
        if row["key"] == "qd1":
            print("4K randread QD1, median p50 latency (us) / IOPS: " + ", ".join(
                "%s %.0f / %.0f" % (s, row["sides"][s]["p50_us"], row["sides"][s]["iops"])
                for s in sides))
    print()
    print("CPU per I/O (us, median; the guest's busy time, fio included; ours: [target processes])")
    for row in summary["jobs"]:
        parts = []
        for s in sides:
            e = row["sides"][s]
            t = " [%.0f]" % e["target_cpu_us_per_io"] if "target_cpu_us_per_io" in e else ""
            parts.append("%s %.0f%s" % (s, e["cpu_us_per_io"], t))
        print("  %-30s %s" % (row["job"], ", ".join(parts)))
    print()
    print("goals met: %d of %d" % (sum(1 for m in met if m[2]), len(met)))
    for name, s, ok in met:
        if not ok:
            print("  missed: %s (%s)" % (name, s))
    print("load average (1/5/15 min) at start, end: %s ; %s" % (load[0], load[-1]))
    return summary


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- footprint with many volumes (--scale) -----------------------------------------------
def scale(tmp, n, port):
    from nvmeof_target.registry import Registry
    from nvmeof_target.control import Client
    state = os.path.join(tmp, "scale-%d.db" % n)
    reg = Registry(state)
    reg.add_many([("nqn.2014-08.org.zfs-ng:bench:vol-%06d" % i, "/dev/zvol/bench/vol-%06d" % i,
                   str(uuid.UUID(int=i + 1)), False, False, 512) for i in range(n)])
    reg.close()
    side = OursSide([], tmp, "scale-%d" % n, 1, port=port)
    side.state = state
    t0 = time.time()
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
                             "127.0.0.1:%d" % port, "--state", state, "--socket", side.sock],
                            cwd=ROOT, env=env)
    try:
        while True:
            try:
                stats = Client(side.sock).stats()
                break
            except Exception:
                if proc.poll() is not None:
                    raise SystemExit("target died")
                time.sleep(0.02)
        startup = time.time() - t0
        rss = 0
        with open("/proc/%d/status" % proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) / 1024.0
        fds = len(os.listdir("/proc/%d/fd" % proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print("target with %d configured volumes: startup %.2f s, RSS %.1f MiB, %d fds"
          % (stats["volumes"], startup, rss, fds))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", default="1g", help="the main zvol's working set (filled)")
    ap.add_argument("--small-size", default="32m", help="each of the 16 small zvols (filled)")
    ap.add_argument("--workers", default="1,2", help="our target's worker counts to run")
    ap.add_argument("--numjobs", type=int, default=1,
                    help="fio jobs on the main zvol (the host opens one I/O queue per CPU: "
                    "2 jobs can use 2 queues, so 2 workers)")
    ap.add_argument("--arc", choices=("metadata", "all"), default="metadata",
                    help="primarycache of the bench pool (metadata: no data cached in the ARC)")
    ap.add_argument("--jobs", help="only the jobs whose key is in this comma list (%s)"
                    % ",".join(j.key for j in JOBS))
    ap.add_argument("--base", help="also run the target of this other checkout (1 worker), "
                    "for a before/after in the same run")
    ap.add_argument("--json", help="write the summary and every round's figures here")
    ap.add_argument("--debug", action="store_true", help="print fio's per-job figures")
    ap.add_argument("--scale", type=int, default=0, metavar="N",
                    help="also print the target's footprint with N configured volumes")
    opts = ap.parse_args()
    if os.environ.get("ZFSNG_IN_VM") != "1":
        raise SystemExit("run it in the test VM: python3 tests/vm/vm.py run -- "
                         "python3 bench/nvmeof_bench.py")
    if opts.jobs:
        JOBS[:] = [j for j in JOBS if j.key in opts.jobs.split(",")]
    from bench._vm import DISKS
    tmp = tempfile.mkdtemp(prefix="nvmeof-bench-")
    pool = "bench%s" % uuid.uuid4().hex[:4]
    disks = [d for d in DISKS[:2] if os.path.exists(d)]
    load = [loadavg()]
    log("load average %s; %d vCPUs" % (load[0], os.cpu_count()))
    sh("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4",
       "-O", "primarycache=" + opts.arc, pool, *disks)
    try:
        names = ["v"] + ["s%02d" % i for i in range(NVOLS)]
        devices = []
        for name in names:
            size = opts.size if name == "v" else opts.small_size
            vsize = max(parse_size(size) * 2, 256 << 20) if name == "v" else parse_size(size)
            sh("zfs", "create", "-s", "-V", str(vsize), "-o", "volblocksize=16K",
               "%s/%s" % (pool, name))
            devices.append("/dev/zvol/%s/%s" % (pool, name))
        for d in devices:
            t = time.time() + 60
            while not os.path.exists(d):
                if time.time() > t:
                    raise SystemExit("%s did not appear" % d)
                sh("udevadm", "settle")
                time.sleep(0.2)
        t0 = time.time()
        for d in devices:   # incompressible data where every job reads
            size = opts.size if d == devices[0] else opts.small_size
            sh("fio", "--name=fill", "--filename=" + d, "--rw=write", "--bs=1m", "--size=" + size,
               "--ioengine=libaio", "--direct=1", "--iodepth=4", "--refill_buffers",
               "--output-format=json")
        log("filled %s + %d x %s in %.0f s" % (opts.size, NVOLS, opts.small_size,
                                               time.time() - t0))
        sides = [KERNEL] + ["ours%dw" % int(w) for w in opts.workers.split(",") if w]
        if opts.base:
            sides.append("base1w")

        def make(s, rnd):
            if s == KERNEL:
                return KernelSide(devices), 4421
            if s == "base1w":
                return OursSide(devices, tmp, "base-%d" % rnd, 1, os.path.abspath(opts.base)), 4420
            return OursSide(devices, tmp, "%s-%d" % (s, rnd), int(s[4:-1])), 4420

        rounds = []
        for rnd in range(opts.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            res = {}
            for s in order:
                side, port = make(s, rnd)
                log("round %d: %s (load %s)" % (rnd + 1, s, loadavg()))
                res[s] = run_side(side, port, opts, pool)
                if getattr(side, "stats", None):
                    res[s]["_stats"] = side.stats
                for job in JOBS:
                    f = res[s][job.key]
                    log("  %-30s %s %s, cpu %.0f us/io%s" % (
                        job.name, fmt(f["value"], job.unit), job.unit, f["cpu_us_per_io"],
                        " (runtime %d ms)" % f["runtime_ms"]))
            rounds.append(res)
        load.append(loadavg())
        print()
        print("fio libaio --direct=1, %ds a job, main zvol %s filled, %d x %s small zvols, "
              "volblocksize 16K lz4, primarycache=%s, caches dropped before every job, "
              "fio numjobs=%d" % (opts.runtime, opts.size, NVOLS, opts.small_size, opts.arc,
                                  opts.numjobs))
        summary = summarize(rounds, sides, opts, load)
        if opts.json:
            with open(opts.json, "w") as f:
                json.dump(summary, f, indent=1, default=str)
            print("JSON: " + opts.json)
        if opts.scale:
            for n in (0, opts.scale):
                scale(tmp, n, 4422)
    finally:
        subprocess.run(["nvme", "disconnect-all"], stdout=subprocess.PIPE)
        subprocess.run(["zpool", "destroy", "-f", pool])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
