#!/usr/bin/env python3
"""Run the VM tests (tests/e2e) in several test VMs at once.

    shards.py [--guests N] [--timeout S] [PYTEST ARGS...]

One TCG guest keeps about 1.2 of the machine's cores busy: its work is mostly
one process at a time (a plugin call, a zfs command, a target).  On CI's
2-core machine the suite alone took 4200+ s in one guest and hit its guard
(stop 20).  Two guests, each with its own ZFS, kernel NVMe/NBD peers, disks
and network, run disjoint halves of the test files side by side and share
nothing, so no test can see another's pools, ports or devices.

Test files (not tests: module fixtures stay in one guest) are dealt out
greedily, longest first, by the seconds each took in a measured run
(WEIGHTS, from the guests' durations logs; a file not listed counts as the
mean).  The weights only steer the balance: a stale table makes one guest
finish later, never skips a test.  Every guest runs under the same --timeout
(vm.py's guard), so the step lasts at most that long.

Each guest's output goes to its own log, printed whole when all are done,
followed by every guest's pytest verdict lines, so the end of a long CI log
says what failed and where.  Exit code: 0 when every guest's pytest passed,
else the first failing one (overall_rc).  Dev tool: runs on the host's Python.
"""

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import vm

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(os.path.dirname(HERE))
E2E = "tests/e2e"

# Seconds per test file with two guests side by side on CI's 2-core machine,
# from fresh11 (2026-12-05, a fresh clone run alone: 103 VM tests passed in
# 3066 s; 5667 s of test time in all).  Only the balance matters.  Re-measure
# after adding a long test: shards.py ends with the table, ready to paste.
WEIGHTS = {
    "tests/e2e/test_toolstack.py": 848,
    "tests/e2e/test_datapath_nbdtls.py": 483,
    "tests/e2e/test_volume_kill9.py": 416,
    "tests/e2e/test_shared_sr.py": 400,
    "tests/e2e/test_sr_export_import.py": 268,
    "tests/e2e/test_volume_concurrency.py": 257,
    "tests/e2e/test_sr_plugin.py": 239,
    "tests/e2e/test_shared_migration.py": 225,
    "tests/e2e/test_datapath_raw.py": 211,
    "tests/e2e/test_backup.py": 206,
    "tests/e2e/test_volume_plugin.py": 192,
    "tests/e2e/test_nvme_auth.py": 191,
    "tests/e2e/test_nvmeof_load.py": 187,
    "tests/e2e/test_datapath_nvme.py": 171,
    "tests/e2e/test_nvmeof_kill9.py": 163,
    "tests/e2e/test_datapath_nbd.py": 161,
    "tests/e2e/test_volume_cbt.py": 150,
    "tests/e2e/test_cbt.py": 147,
    "tests/e2e/test_datapath_remote.py": 133,
    "tests/e2e/test_rpm_payload.py": 112,
    "tests/e2e/test_nvmeof.py": 111,
    "tests/e2e/test_nbd_kernel.py": 90,
    "tests/e2e/test_sr_cli.py": 85,
    "tests/e2e/test_backup_sr.py": 72,
    "tests/e2e/test_harness_nvmet.py": 34,
    "tests/e2e/test_nbd_cbt.py": 33,
    "tests/e2e/test_datapath_cli.py": 32,
    "tests/e2e/test_libzfs.py": 29,
    "tests/e2e/test_nbd_nbdkit.py": 21,
}


def test_files(root=CHECKOUT):
    """tests/e2e/test_*.py, as paths relative to the checkout, sorted."""
    paths = glob.glob(os.path.join(root, E2E, "test_*.py"))
    return sorted(os.path.relpath(p, root) for p in paths)


def named_tests(args, root=CHECKOUT):
    """(the test files or node ids named in args, the other args): a run of a
    few files deals those, not the whole of tests/e2e."""
    named, rest = [], []
    for x in args:
        path = x.split("::", 1)[0]
        if not x.startswith("-") and path.endswith(".py") \
                and os.path.isfile(os.path.join(root, path)):
            named.append(x)
        else:
            rest.append(x)
    return named, rest


def split(files, n, weights=WEIGHTS):
    """Deal files into n lists of about equal total weight (longest first to
    the lightest list; ties by name, so the result is the same every run).
    Each list keeps the files in name order."""
    if n < 1:
        raise ValueError("n must be at least 1")
    known = [weights[f] for f in files if f in weights]
    default = sum(known) / len(known) if known else 1.0
    order = sorted(files, key=lambda f: (-weights.get(f, default), f))
    bins = [[] for _ in range(n)]
    load = [0.0] * n
    for f in order:
        i = min(range(n), key=lambda k: (load[k], k))
        bins[i].append(f)
        load[i] += weights.get(f, default)
    return [sorted(b) for b in bins if b]


def file_times(paths):
    """Seconds per test file, summed from guests' durations logs
    (vm.read_durations); missing logs are skipped."""
    times = {}
    for path in paths:
        for seconds, nodeid in vm.read_durations(path):
            name = nodeid.split("::", 1)[0]
            times[name] = times.get(name, 0.0) + seconds
    return times


# pytest's last line, bare with -q ("6 passed, 46 deselected in 60.75s"), else in "="
COUNTS = re.compile(r"^(\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)"
                    r"|no tests ran)\b.* in [\d.]+s\b")


def verdicts(text):
    """The lines that say how a guest's run ended: pytest's FAILED/ERROR
    lines, its final count line, vm.py's own 'vm:' result lines."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if line.startswith(vm.VERDICTS):
            keep.append(line)
        elif COUNTS.match(s.strip("= ")):
            keep.append(s.strip("= "))
        elif s.startswith(("vm: timeout", "vm: guest finished", "vm: QEMU exited",
                           "vm: the guest failed")):
            keep.append(s)
    return keep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--guests", type=int, default=int(os.environ.get("ZFSNG_VM_GUESTS", 2)))
    p.add_argument("--timeout", type=int, default=4500)
    a, pytest_args = p.parse_known_args(argv)
    # SIGTERM (a CI timeout, a kill) unwinds through main's finally, which
    # stops every guest's vm.py, which kills its QEMU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    named, pytest_args = named_tests(pytest_args)
    shares = split(named or test_files(), a.guests)
    logdir = tempfile.mkdtemp(prefix="zfsng-shards-")
    procs = []
    t0 = time.time()
    for i, files in enumerate(shares, 1):
        log = os.path.join(logdir, "guest%d.log" % i)
        tsv = os.path.join(logdir, "guest%d.tsv" % i)
        print("shards: guest %d of %d runs %d files: %s"
              % (i, len(shares), len(files), " ".join(os.path.basename(f) for f in files)),
              flush=True)
        out = open(log, "wb")
        procs.append((i, log, out, subprocess.Popen(
            [sys.executable, os.path.join(HERE, "vm.py"), "pytest", "--timeout", str(a.timeout),
             "--durations-to", tsv]
            + pytest_args + files, cwd=CHECKOUT, stdout=out, stderr=subprocess.STDOUT)))
    rcs = {}
    try:
        while len(rcs) < len(procs):
            for i, _, _, proc in procs:
                if i not in rcs and proc.poll() is not None:
                    rcs[i] = proc.returncode
                    print("shards: guest %d finished rc=%d at %.0f s"
                          % (i, proc.returncode, time.time() - t0), flush=True)
            time.sleep(1)
    finally:
        for _, _, out, proc in procs:
            if proc.poll() is None:
                proc.terminate()   # vm.py kills its QEMU on SIGTERM
                proc.wait()
            out.close()
        if len(rcs) < len(procs):   # stopped from outside: say where the logs are
            print("shards: stopped after %.0f s; each guest's log is in %s"
                  % (time.time() - t0, logdir), flush=True)
            for i, log, _, _ in procs:
                with open(log, "rb") as f:
                    tail = f.read().decode("utf-8", "replace").splitlines()[-15:]
                print("--- guest %d, last lines:\n    %s" % (i, "\n    ".join(tail)), flush=True)
    summary = []
    for i, log, _, _ in procs:
        with open(log, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        print("\n--- guest %d of %d (%s)" % (i, len(procs), log))
        sys.stdout.write(text)
        summary += ["guest %d: %s" % (i, line) for line in verdicts(text)]
    times = file_times(os.path.join(logdir, "guest%d.tsv" % i) for i, _, _, _ in procs)
    print("\nshards: seconds per test file (WEIGHTS):")
    for name, seconds in sorted(times.items(), key=lambda kv: (-kv[1], kv[0])):
        print("    %r: %d," % (name, round(seconds)))
    print("\nshards: %d guests in %.0f s; how each ended:\n    %s"
          % (len(procs), time.time() - t0, "\n    ".join(summary)))
    return overall_rc([rcs[i] for i, _, _, _ in procs])


def overall_rc(rcs):
    """The run's exit code from the guests': 0 when all passed; pytest's 5 (no
    test collected) from a guest whose files a -k expression emptied is no
    failure while another guest ran tests, but is when every guest says 5."""
    bad = [rc for rc in rcs if rc not in (0, 5)]
    if bad:
        return bad[0]
    return 0 if 0 in rcs else 5


if __name__ == "__main__":
    sys.exit(main())
