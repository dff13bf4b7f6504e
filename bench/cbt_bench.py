#!/usr/bin/env python3
"""CBT benchmark (run in the test VM: real ZFS).

    python3 tests/vm/vm.py run -- python3 bench/cbt_bench.py [--sizes 1,10]

For each size (GiB): a sparse zvol (volblocksize 16K, lz4) gets 2% random
data, snapshot A, 1% of its 64 KiB blocks rewritten with random data,
snapshot B.  Measured in the same run:
- list_changed_blocks(A, B) (map of A already built): wall time, bytes that
  came through the pipe, payload bytes, records;
- the references: `zfs send -c -e -L -i A B > /dev/null` (the kernel's cost
  alone), the same through a pipe into `dd` (kernel + pipe, a C reader), and
  the `zfs send -nvP` estimate;
- the naive bitmap (every FREE counted as changed) and how many bits it
  over-reports;
- the fast path (no change since B: `written#` read only).
Nothing is asserted: it prints figures (and --json).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plugins.volume import cbt  # noqa: E402
from bench._vm import GiB, pool as bench_pool, sh, zvol  # noqa: E402

K64 = 65536


def one(pool, gib, seed):
    size = gib * GiB
    ds, path = zvol(pool, "v%d" % gib, size)
    cbt.enable(ds)
    rnd = random.Random(seed)
    n = size // K64
    fd = os.open(path, os.O_RDWR)
    t0 = time.time()
    for blk in rnd.sample(range(n), n // 50):
        os.pwrite(fd, os.urandom(K64), blk * K64)
    os.fsync(fd)
    sh("zfs", "snapshot", ds + "@a")
    fill_s = time.time() - t0
    t0 = time.time()
    cbt.snapshot_taken(ds + "@a")
    map_a_s = time.time() - t0
    changed = rnd.sample(range(n), n // 100)
    for blk in changed:
        os.pwrite(fd, os.urandom(K64), blk * K64)
    os.fsync(fd)
    os.close(fd)
    sh("zfs", "snapshot", ds + "@b")
    a, b = ds + "@a", ds + "@b"

    t0 = time.time()
    with open(os.devnull, "wb") as null:
        subprocess.run(["zfs", "send", "-c", "-e", "-L", "-i", a, b], stdout=null, check=True)
    ref_s = time.time() - t0
    t0 = time.time()
    p1 = subprocess.Popen(["zfs", "send", "-c", "-e", "-L", "-i", a, b], stdout=subprocess.PIPE)
    subprocess.run(["dd", "of=/dev/null", "bs=1M"], stdin=p1.stdout,
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p1.stdout.close()
    p1.wait()
    pipe_s = time.time() - t0
    estimate = cbt.send_estimate(a, b)

    stats = {}
    t0 = time.time()
    bm = cbt.list_changed_blocks(a, b, 0, -1, None, stats)
    lcb_s = time.time() - t0
    got = set(cbt.bitmap_blocks(bm["bitmap"]))
    correct = got == set(changed)

    writes, frees, _ = cbt._send(a, b)
    naive = cbt.bitmap(cbt.to_extents(cbt.union(writes, frees)), size)
    naive_bits = len(cbt.bitmap_blocks(naive["bitmap"]))

    sh("zfs", "snapshot", ds + "@c")
    fstats = {}
    t0 = time.time()
    cbt.list_changed_blocks(b, ds + "@c", 0, -1, None, fstats)
    fast_s = time.time() - t0

    return {
        "size_gib": gib, "changed_blocks": len(changed), "changed_bytes": len(changed) * K64,
        "bitmap_correct": correct, "bitmap_bytes": len(bm["bitmap"]) * 3 // 4,
        "list_changed_blocks_s": round(lcb_s, 3), "send_and_parse_s": round(stats["send_s"], 3),
        "stream_bytes": stats["stream_bytes"],
        "payload_bytes": stats["payload_bytes"], "records": stats["records"],
        "zfs_send_to_devnull_s": round(ref_s, 3), "zfs_send_pipe_dd_s": round(pipe_s, 3), "zfs_send_nvP_estimate": estimate,
        "naive_bits": naive_bits, "naive_false_bits": naive_bits - len(changed),
        "fast_path": fstats.get("fast_path"), "fast_path_s": round(fast_s, 3),
        "build_map_of_A_s": round(map_a_s, 3), "fill_s": round(fill_s, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1,10", help="GiB, comma-separated")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with bench_pool("cbtbench", "cbt_bench.py") as pool:
        for i, g in enumerate(int(x) for x in args.sizes.split(",")):
            r = one(pool, g, i + 1)
            results.append(r)
            if not args.json:
                print("%2d GiB, 1%% changed (%d MiB): bitmap %s in %.2f s (send+parse %.2f s); "
                      "%.1f MiB through the "
                      "pipe (%.1f MiB payload, %d records); zfs send > /dev/null %.2f s, | dd %.2f s; "
                      "send -nvP %.1f MiB; naive FREE-as-changed: %d false bits of %d; "
                      "fast path %.2f s; map of A %.2f s"
                      % (g, r["changed_bytes"] >> 20, "correct" if r["bitmap_correct"] else
                         "WRONG", r["list_changed_blocks_s"], r["send_and_parse_s"],
                         r["stream_bytes"] / 2.0 ** 20,
                         r["payload_bytes"] / 2.0 ** 20, r["records"],
                         r["zfs_send_to_devnull_s"], r["zfs_send_pipe_dd_s"],
                         r["zfs_send_nvP_estimate"] / 2.0 ** 20,
                         r["naive_false_bits"], r["naive_bits"], r["fast_path_s"],
                         r["build_map_of_A_s"]), flush=True)
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
