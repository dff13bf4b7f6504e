"""Power cut: no acknowledged write is lost (issue 12, item 4, first bullet).

Real QEMU, real guest kernel, real ZFS, our real NVMe/TCP target and the
kernel's NVMe/TCP initiator; nothing is mocked.  The pool lives on a raw file
on the host that persists across boots, attached with a cache mode that honours
flushes (ZFSNG_POWER_CUT_CACHE: `writeback`, the default, or `none`): QEMU
answers a guest flush only after fdatasync() of that file.

One round: the guest (tests/vm/power_cut_guest.py) writes 4 KiB records
concurrently to a local zvol and, through our target over loopback, to a
second zvol (O_DIRECT; fsync on /dev/nvmeXnY sends NVMe Flush since the target
advertises a volatile write cache), printing `ACK DEV s` only after fdatasync
returned.  After a random 5-30 s of writing (ZFSNG_POWER_CUT_SECONDS=MIN,MAX)
the host SIGKILLs QEMU: the power cut.  The next boot imports the pool and
checks each block against the acknowledgements the host saw, then writes the
next round; N cuts take N+1 boots.

A pass means: for every device and every cut, every write the guest
acknowledged (fsync returned, then ACK) is on the volume after `zpool import`
-- each block holds its newest acknowledged record or a newer one, never an
older one, zeros or garbage; garbage is tolerated only in a block that a write
issued after the last visible ACK was going to (a torn in-flight write).  A
third zvol written without fsync (`ctl`, acknowledgements that are lies) must
lose writes: that shows the cut really drops what was not flushed (ZFS's open
transaction group in guest RAM), i.e. that this test can fail.

What the cut simulates: the guest's RAM (page cache, ZFS's ARC and open
transaction groups, the target's and the initiator's buffers) and QEMU's
in-flight requests vanish at an arbitrary instant.  What it does not: the host
kernel does not crash, so the host's page cache survives; a write QEMU already
handed to the host file is kept even when no flush followed.  So this checks
the ordering of the guest stack (ZFS's ZIL, our target's Flush/FUA, the
initiator) -- an acknowledgement before the data reached the virtual disk is
caught -- not a disk's or the host's own flush.

CI runs one cut (`./run-tests`); the long run is ZFSNG_POWER_CUTS=5 (or
`python3 tests/vm/test_power_cut.py --cuts 5`), which prints a table per cut.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import power_cut_guest as pcg  # noqa: E402
import vm  # noqa: E402

GUEST_DISK = "/dev/disk/by-id/virtio-zfsng-p0"
POOL = "pcut"
BLOCKS = 256             # 1 MiB per device: blocks are overwritten within a round
EVERY = 8                # writes per fdatasync + ACK
DEVICES = ("local", "nvme", "ctl")
BOOT_TIMEOUT = 900       # a boot to the end of its command or to the cut


def log(msg):
    print("power-cut: " + msg, file=sys.stderr, flush=True)


def read_lines(path):
    """Complete lines of the guest's output file (a line cut short is skipped)."""
    try:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return data.split("\n")[:-1]


def tail(lines, n=40):
    """The guest's last lines that are not ACKs (what explains a failure)."""
    return "\n".join([line for line in lines if not line.startswith("ACK ")][-n:])


def acks(lines):
    seen = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0] == "ACK" and parts[2].isdigit():
            seen[parts[1]] = max(seen.get(parts[1], 0), int(parts[2]))
    return seen


def one_boot(image, accel, workdir, disk, cache, n, argv, cut_after=None):
    """Boot, run argv in the guest; with cut_after (seconds), SIGKILL QEMU that
    long after every device acknowledged once.  Returns (lines, figures)."""
    rundir = os.path.join(workdir, "boot%d" % n)
    os.makedirs(rundir)
    with open(os.path.join(rundir, "argv.json"), "w") as f:
        json.dump(argv, f)
    out = os.path.join(rundir, "output")
    t0 = time.time()
    guest = vm.start_guest(image, rundir, accel, 4096, 2, 0, 0, out,
                           persistent=[(disk, cache)])
    fig = {"boot_s": round(time.time() - t0, 1)}
    try:
        first_ack = None
        while True:
            lines = read_lines(out)
            if any(line.startswith("RESULT ") for line in lines) and "verify_s" not in fig:
                fig["verify_s"] = round(time.time() - t0, 1)
            if cut_after is not None:
                seen = acks(lines)
                if first_ack is None and all(d in seen for d in DEVICES):
                    first_ack = time.time()
                    fig["writing_from_s"] = round(first_ack - t0, 1)
                if first_ack is not None and time.time() - first_ack >= cut_after:
                    guest.kill()                 # the power cut: SIGKILL, no warning
                    fig["cut_after_s"] = round(time.time() - first_ack, 1)
                    break
            elif os.path.exists(os.path.join(rundir, "rc")):
                break
            broken = [line for line in lines if line.startswith(("Traceback", "WRITER-EXPIRED"))]
            if broken:
                raise AssertionError("boot %d: the guest side failed: %s\n%s" % (
                    n, broken[0], tail(lines)))
            if not guest.alive():
                raise AssertionError("QEMU exited before the %s (boot %d):\n%s\n%s" % (
                    "cut" if cut_after is not None else "command ended", n,
                    tail(lines), guest.console_text()[-3000:]))
            if time.time() - t0 > BOOT_TIMEOUT:
                raise AssertionError("boot %d: no %s after %d s:\n%s" % (
                    n, "ACK from every device" if cut_after is not None else "end",
                    BOOT_TIMEOUT, tail(lines)))
            time.sleep(0.2)
    finally:
        guest.kill()
    lines = read_lines(out)
    if cut_after is None:
        rc = open(os.path.join(rundir, "rc")).read().strip()
        assert rc == "0", "boot %d: guest command failed (rc %s):\n%s" % (
            n, rc, tail(lines))
    for line in lines:
        if line.startswith(("WRITER-EXPIRED", "Traceback")):
            raise AssertionError("boot %d: %s\n%s" % (n, line, tail(lines)))
    return lines, fig


def power_cut_run(cuts, cache="writeback", seconds=(5.0, 30.0), seed=None, workdir=None):
    """cuts rounds of write + power cut + import + verify; returns one row per cut."""
    image = vm.image_dir()
    accel = vm.choose_accel(image)
    seed = seed if seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="zfsng-power-cut-")
    disk = os.path.join(workdir, "pool.raw")
    with open(disk, "wb") as f:
        f.truncate(2 << 30)
    log("%d cut(s), cache=%s, %s, seed %d, run folder %s" % (cuts, cache, accel, seed, workdir))
    rows = []
    seen = None
    t_start = time.time()
    ok = False
    try:
        for n in range(1, cuts + 2):
            argv = ["python3", "tests/vm/power_cut_guest.py", "boot", "--disk", GUEST_DISK,
                    "--pool", POOL, "--round", str(n), "--blocks", str(BLOCKS),
                    "--every", str(EVERY)]
            if seen is not None:
                argv += ["--verify", json.dumps({"round": n - 1, "acks": seen,
                                                 "blocks": BLOCKS, "every": EVERY})]
            cut_after = None
            if n <= cuts:
                argv.append("--write")
                cut_after = rng.uniform(*seconds)
            lines, fig = one_boot(image, accel, workdir, disk, cache, n, argv, cut_after)
            if seen is not None:
                res = [json.loads(line[7:]) for line in lines if line.startswith("RESULT ")]
                assert len(res) == 1, "boot %d: no verification result:\n%s" % (
                    n, tail(lines))
                row = rows[-1]
                row.update(import_s=res[0]["import_s"], check_s=res[0]["verify_s"],
                           devices=res[0]["devices"])
                log(format_row(row))
            if cut_after is not None:
                seen = acks(lines)
                assert all(seen.get(d, 0) > 0 for d in DEVICES), seen
                rows.append({"cut": n, "cut_after_s": fig["cut_after_s"], "acks": seen,
                             "boot_s": fig["boot_s"]})
        ok = True
    finally:
        log("wall time %.0f s" % (time.time() - t_start))
        if own and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log("run folder kept: " + workdir)
    return rows


def format_row(r):
    d = r["devices"]
    return ("cut %d after %5.1f s writing | import %5.1f s | "
            "local acked %6d lost %d | nvme acked %6d lost %d | ctl (no fsync) acked %6d lost %d"
            % (r["cut"], r["cut_after_s"], r["import_s"],
               d["local"]["acked"], d["local"]["lost"], d["nvme"]["acked"], d["nvme"]["lost"],
               d["ctl"]["acked"], d["ctl"]["lost"]))


def summary(rows, cache):
    head = ("| cut | writing before cut (s) | import (s) | local: acked writes / blocks checked"
            " / lost | nvme/tcp: acked / blocks / lost | newer unacked (local, nvme) "
            "| torn in flight | control (no fsync): acked / lost |")
    lines = ["power cut summary (cache=%s, %d KiB records, fdatasync every %d writes)"
             % (cache, 4, EVERY), head, "|" + "---|" * 8]
    for r in rows:
        d = r["devices"]
        lines.append("| %d | %.1f | %.1f | %d / %d / %d | %d / %d / %d | %d, %d | %d | %d / %d |" % (
            r["cut"], r["cut_after_s"], r["import_s"],
            d["local"]["acked"], d["local"]["blocks_with_acked_write"], d["local"]["lost"],
            d["nvme"]["acked"], d["nvme"]["blocks_with_acked_write"], d["nvme"]["lost"],
            d["local"]["newer_unacked"], d["nvme"]["newer_unacked"],
            d["local"]["torn_in_flight"] + d["nvme"]["torn_in_flight"],
            d["ctl"]["acked"], d["ctl"]["lost"]))
    tot = {k: sum(r["devices"][k]["acked"] for r in rows) for k in DEVICES}
    lost = {k: sum(r["devices"][k]["lost"] for r in rows) for k in DEVICES}
    lines.append("total: %d cuts; acked writes verified: local %d (%.1f MiB), nvme %d (%.1f MiB); "
                 "lost: local %d, nvme %d; control lost %d of %d"
                 % (len(rows), tot["local"], tot["local"] / 256.0, tot["nvme"],
                    tot["nvme"] / 256.0, lost["local"], lost["nvme"], lost["ctl"], tot["ctl"]))
    return "\n".join(lines)


def check(rows):
    """The pass criteria, for pytest and the long-run script alike."""
    for r in rows:
        for name in ("local", "nvme"):
            d = r["devices"][name]
            assert d["lost"] == 0 and d["invalid"] == 0, (
                "cut %d, %s: %d acknowledged writes lost, %d invalid blocks: %s"
                % (r["cut"], name, d["lost"], d["invalid"], d["bad"]))
        # The control lies (ACK without fsync): a cut that drops guest RAM
        # loses some of its writes.  If it never does, the cut is not biting.
        assert r["devices"]["ctl"]["lost"] > 0, (
            "cut %d: the no-fsync control lost nothing: the power cut did not drop "
            "unflushed writes, so this test could not have failed" % r["cut"])


def settings():
    cuts = int(os.environ.get("ZFSNG_POWER_CUTS", 1))
    cache = os.environ.get("ZFSNG_POWER_CUT_CACHE", "writeback")
    lo, hi = (float(x) for x in os.environ.get("ZFSNG_POWER_CUT_SECONDS", "5,30").split(","))
    seed = os.environ.get("ZFSNG_POWER_CUT_SEED")
    return cuts, cache, (lo, hi), int(seed) if seed else None


def test_the_checker_finds_every_kind_of_loss(tmp_path):
    """The guest's checker, on a file written by the writer's own record code:
    a complete image passes; an older record, zeros or garbage where an
    acknowledged write belongs count as lost; garbage is tolerated only where
    an unacknowledged write was in flight; a foreign record is invalid."""
    dev, rnd, blocks, acked, every = pcg.DEVICES["nvme"], 7, 512, 200, 8
    img = str(tmp_path / "vol.img")
    recs = {}
    with open(img, "wb") as f:
        f.truncate(blocks * pcg.BS)
        for s in range(1, acked + every + 1):
            b = pcg.block_of(dev, rnd, s, blocks)
            recs.setdefault(b, []).append(s)
            f.seek(b * pcg.BS)
            f.write(pcg.record(dev, rnd, s, b))
    r = pcg.check_volume(img, dev, rnd, blocks, acked, every)
    written = {b for b, ss in recs.items() if min(ss) <= acked}
    assert (r["lost"], r["invalid"], r["blocks_with_acked_write"]) == (0, 0, len(written))
    assert r["newer_unacked"] == len({pcg.block_of(dev, rnd, s, blocks)
                                      for s in range(acked + 1, acked + every + 1)})

    def put(b, data):
        with open(img, "r+b") as f:
            f.seek(b * pcg.BS)
            f.write(data)

    newest = {b: max(s for s in ss if s <= acked) for b, ss in recs.items() if min(ss) <= acked}
    twice = [b for b, ss in recs.items() if len([s for s in ss if s <= acked]) >= 2
             and max(ss) <= acked]
    assert twice, "no block was overwritten: the checker's stale case is untested"
    put(twice[0], pcg.record(dev, rnd, min(recs[twice[0]]), twice[0]))     # older record
    zeroed = sorted(set(newest) - {twice[0]} - {
        pcg.block_of(dev, rnd, s, blocks) for s in range(acked + 1, acked + every + 1)})[0]
    put(zeroed, bytes(pcg.BS))                                            # zeros
    inflight_only = [b for b, ss in recs.items() if min(ss) > acked]
    untouched = sorted(set(range(blocks)) - set(recs))
    assert inflight_only and len(untouched) >= 2
    put(inflight_only[0], os.urandom(pcg.BS))                             # torn in flight
    put(untouched[0], os.urandom(pcg.BS))                                 # garbage
    put(untouched[1], pcg.record(pcg.DEVICES["local"], rnd, 1, untouched[1]))  # foreign
    r = pcg.check_volume(img, dev, rnd, blocks, acked, every)
    assert (r["lost"], r["stale"], r["invalid"], r["torn_in_flight"]) == (2, 1, 2, 1), r
    assert sorted(b[0] for b in r["bad"]) == sorted([twice[0], zeroed] + untouched[:2])


@pytest.mark.skipif(os.geteuid() != 0, reason="the image build needs root")
def test_no_acknowledged_write_is_lost_at_a_power_cut():
    cuts, cache, seconds, seed = settings()
    rows = power_cut_run(cuts, cache, seconds, seed)
    report = summary(rows, cache)
    print(report)
    check(rows)


def main():
    cuts, cache, seconds, seed = settings()
    p = argparse.ArgumentParser(description="the power-cut test's long run")
    p.add_argument("--cuts", type=int, default=max(cuts, 5))
    p.add_argument("--cache", default=cache, choices=["writeback", "none"])
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--report", help="also write the summary (and JSON rows) here")
    a = p.parse_args()
    t0 = time.time()
    rows = power_cut_run(a.cuts, a.cache, seconds, a.seed)
    report = summary(rows, a.cache) + "\nwall time %.0f s" % (time.time() - t0)
    print(report)
    if a.report:
        with open(a.report, "w") as f:
            f.write(report + "\n\n" + json.dumps(rows, indent=1, sort_keys=True) + "\n")
    check(rows)
    print("PASS: 0 acknowledged writes lost over %d cuts" % len(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
