"""kill -9 of our NVMe/TCP target, again and again, under fio --verify from
the kernel initiator (issue 12, item 4b).

The host connects with --reconnect-delay/--ctrl-loss-tmo, so it reconnects by
itself each time the target comes back.  fio writes (4K random, crc32c verify
headers, an fsync every 16 writes) all along; between two kills the test waits
until writes completed on the NVMe device since the last restart (I/O went
through the new target process), kills the target with SIGKILL while fio is
still writing, and checks the pid it killed died of SIGKILL and the next one
is a new process.  After the kills fio finishes (0 errors), then a second fio
reads back and verifies every block.

ZFSNG_KILL9_RESTARTS sets the number of kills (CI: 3, the issue's figure: 10):
    python3 tests/vm/vm.py run -- env ZFSNG_KILL9_RESTARTS=10 \\
        python3 -m pytest -s -q tests/e2e/test_nvmeof_kill9.py
"""

import glob
import json
import os
import re
import signal
import subprocess
import time

from user_target import FIO, SOCK, Vol, pool_fixture, target_fixture

pool, target = pool_fixture("nvt"), target_fixture()

RESTARTS = int(os.environ.get("ZFSNG_KILL9_RESTARTS", "3"))
MiB = 1 << 20


def writes_done(dev):
    """Writes completed on the namespace (the larger count of the multipath
    head and its per-path nodes: which one accounts I/O depends on the kernel)."""
    name = os.path.basename(dev)                       # nvme0n1 -> nvme0n1, nvme0c*n1
    m = re.match(r"^nvme(\d+)n(\d+)$", name)
    paths = ["/sys/class/block/%s/stat" % name]
    paths += glob.glob("/sys/class/block/nvme*c*n%s/stat" % m.group(2))
    best = 0
    for p in paths:
        try:
            best = max(best, int(open(p).read().split()[4]))
        except (OSError, IndexError, ValueError):
            pass
    return best


def fio_json(out):
    """The JSON report of an --output-format=json run (warnings may precede it)."""
    return json.loads(out[out.index("{"):])


def test_kill_9_restarts_under_fio_verify_host_reconnects(pool, target):
    size = (8 + 4 * RESTARTS) * MiB
    v = Vol(pool, "kill9", size="%dM" % (size // MiB + 16))
    dev = v.connect("--reconnect-delay=1", "--ctrl-loss-tmo=600")
    # thinktime caps the rate (no catch-up burst after a stall as with --rate),
    # so fio is still writing at the last kill
    job = ["--name=kill9", "--rw=randwrite", "--bs=4k", "--size=%d" % size, "--iodepth=8",
           "--verify=crc32c", "--fsync=16"]
    load = subprocess.Popen(FIO + ["--filename=" + dev, "--output-format=json",
                                   "--thinktime=40000", "--thinktime_blocks=8",
                                   "--do_verify=0"] + job,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    kills = []
    t0 = time.time()
    try:
        for i in range(RESTARTS):
            before = writes_done(dev)
            deadline = time.time() + 180
            while writes_done(dev) < before + 64:      # 256 KiB through this target process
                assert load.poll() is None, "fio ended before kill %d:\n%s" % (
                    i + 1, load.stdout.read())
                assert time.time() < deadline, "no I/O after restart %d" % i
                time.sleep(0.1)
            assert load.poll() is None, "fio finished before kill %d: make it longer" % (i + 1)
            old = target.proc
            done = writes_done(dev)
            os.kill(old.pid, signal.SIGKILL)
            assert old.wait(30) == -signal.SIGKILL
            assert load.poll() is None                  # fio was writing when it died
            kills.append((old.pid, done - before, round(time.time() - t0, 1)))
            os.unlink(SOCK)                             # stale: a SIGKILL leaves it behind
            target.start()
            assert target.proc.pid != old.pid
        out, _ = load.communicate(timeout=900)
    finally:
        if load.poll() is None:
            load.kill()
            load.communicate()
    try:
        print("kills (pid, writes through it, t):", kills)
        assert load.returncode == 0, out
        rep = fio_json(out)["jobs"][0]
        assert rep["error"] == 0 and rep["write"]["io_bytes"] == size, rep
        print("fio: %d bytes written, %d write ios, err=%d, %.0f s" % (
            rep["write"]["io_bytes"], rep["write"]["total_ios"], rep["error"],
            time.time() - t0))
        assert len(kills) == RESTARTS and len(set(k[0] for k in kills)) == RESTARTS
        # every block read back over the target (the last process) and verified
        r = subprocess.run(FIO + ["--filename=" + dev, "--output-format=json",
                                  "--verify_only=1"] + job,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           universal_newlines=True)
        assert r.returncode == 0, r.stdout
        rep = fio_json(r.stdout)["jobs"][0]
        assert rep["error"] == 0 and rep["read"]["io_bytes"] == size, rep
        print("verify: %d bytes read and verified, err=%d" % (rep["read"]["io_bytes"],
                                                              rep["error"]))
    finally:
        v.disconnect()
