#!/usr/bin/env python3
"""Backup benchmark (run in the test VM: real ZFS).

    python3 tests/vm/vm.py run -- python3 bench/backup_bench.py [--sizes 1,10] [--json]

For each size (GiB): a sparse zvol (volblocksize 16K, lz4) gets random data
in 1% of its 64 KiB blocks, a full backup (sr_tools.backup.engine) is taken,
then 1% of the blocks are rewritten.  Measured in the same run:
- the CBT bitmap since the full backup's anchor (a bookmark by then):
  list_changed_blocks wall time and zfs send stream bytes;
- the incremental backup: wall time, bytes read from the snapshot device,
  bytes written, extents, and the stream bytes of its own CBT query;
- a restore of the incremental point (bytes read, time) and the full
  backup's figures for comparison.
Nothing is asserted: it prints figures (and --json)."""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins.volume import cbt  # noqa: E402
from sr_tools.backup import engine  # noqa: E402
from bench._vm import GiB, pool as bench_pool, sh, zvol  # noqa: E402

K64 = 65536


def scribble(path, blocks):
    fd = os.open(path, os.O_RDWR)
    try:
        for blk in blocks:
            os.pwrite(fd, os.urandom(K64), blk * K64)
        os.fsync(fd)
    finally:
        os.close(fd)


def one(pool, gib, seed, workdir):
    size = gib * GiB
    ds, path = zvol(pool, "v%d" % gib, size)
    rnd = random.Random(seed)
    n = size // K64
    scribble(path, rnd.sample(range(n), n // 100))
    repo = os.path.join(workdir, "repo%d" % gib)
    t0 = time.time()
    full = engine.backup("full", ds, repo)
    full_s = time.time() - t0
    changed = rnd.sample(range(n), n // 100)
    scribble(path, changed)

    sh("zfs", "snapshot", ds + "@bench")
    stats = {}
    t0 = time.time()
    bm = cbt.list_changed_blocks(full["anchor"]["bookmark"], ds + "@bench", 0, -1, None, stats)
    bitmap_s = time.time() - t0
    bits = set(cbt.bitmap_blocks(bm["bitmap"]))
    sh("zfs", "destroy", ds + "@bench")

    t0 = time.time()
    inc = engine.backup("incr", ds, repo)
    incr_s = time.time() - t0
    t0 = time.time()
    rest = engine.restore(os.path.join(repo, inc["id"]), os.path.join(workdir, "r%d.img" % gib))
    restore_s = time.time() - t0
    os.unlink(os.path.join(workdir, "r%d.img" % gib))
    st = inc["stats"]
    return {
        "size_gib": gib, "changed_blocks": len(changed), "changed_bytes": len(changed) * K64,
        "bitmap_correct": bits == set(changed), "bitmap_s": round(bitmap_s, 3),
        "bitmap_stream_bytes": stats["stream_bytes"],
        "incr_s": round(incr_s, 3), "incr_bytes_read": st["bytes_read"],
        "incr_bytes_written": st["bytes_written"], "incr_extents": len(inc["extents"]),
        "incr_cbt_stream_bytes": st["cbt"].get("stream_bytes"),
        "full_s": round(full_s, 3), "full_bytes_read": full["stats"]["bytes_read"],
        "restore_s": round(restore_s, 3), "restore_bytes_read": rest["bytes_read"],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,10", help="GiB, comma-separated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with bench_pool("backupbench", "backup_bench.py") as pool:
        workdir = tempfile.mkdtemp(prefix="backup-bench-", dir="/var/tmp")
        try:
            for i, g in enumerate(int(x) for x in args.sizes.split(",")):
                r = one(pool, g, i + 1, workdir)
                results.append(r)
                if not args.json:
                    print("%2d GiB, 1%% changed (%d MiB): bitmap %s in %.2f s (%.1f MiB of zfs "
                          "send stream); incr %.2f s, read %.1f MiB (%.2f%% of the volume), "
                          "wrote %.1f MiB, %d extents; full %.2f s read %.1f MiB; restore %.2f s "
                          "read %.1f MiB"
                          % (g, r["changed_bytes"] >> 20, "correct" if r["bitmap_correct"]
                             else "WRONG", r["bitmap_s"], r["bitmap_stream_bytes"] / 2.0 ** 20,
                             r["incr_s"], r["incr_bytes_read"] / 2.0 ** 20,
                             100.0 * r["incr_bytes_read"] / (g * GiB),
                             r["incr_bytes_written"] / 2.0 ** 20, r["incr_extents"], r["full_s"],
                             r["full_bytes_read"] / 2.0 ** 20, r["restore_s"],
                             r["restore_bytes_read"] / 2.0 ** 20), flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
