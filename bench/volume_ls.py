#!/usr/bin/env python3
"""SR.ls and SR.attach at scale: N volumes+snapshots on a file-backed SR.
Figures: a walk of every dataset (zfs list -r), SR.ls after the pool changed
behind the index (rebuilt), SR.ls warm next to Plugin.Query (the fixed cost of
any call), Volume.create/snapshot/clone/destroy on a near-empty SR and at N,
and SR.attach + first SR.ls on a host that never saw the pool: after a clean
SR.detach (the index travels in the pool) and after a crash (the pool's
generation moved on without a copy: every dataset is read).  Run in the test
VM (needs ZFS and pyzfs):

    python3 tests/vm/vm.py run -- python3 bench/volume_ls.py -n 3000 --zvols 300

Volumes are made fast: --zvols zvols with lzc_create, and the rest as
snapshots in atomic lzc_snapshot batches (one snapshot of every zvol per
txg), each with its org.zfs-ng:name property, so the SR looks like one made by
the plugin.  --index-rows M then pads the last host's index with made-up rows
to M and times SR.ls there (a warm SR.ls reads no dataset, so that is its own
cost at M volumes even where M datasets cannot be made: 100k take hours of
lzc_create in TCG), then moves that index to another host (its SR.attach and
first SR.ls at M rows).  --profile moves the SR once more and prints where
the new host's calls spend their time.  Prints figures (--json FILE too);
asserts nothing about time.

Measured in the TCG guest (2 vCPU; one other test VM for the first minutes,
2026-12-04), N=10000 (500 zvols, 9500 snapshots), --index-rows 100000: making
them 142 + 205 s; a walk 82 s; SR.ls rebuilt 180 s; SR.ls warm 3.3-4.8 s
(Plugin.Query 1.8 s); create/snapshot/clone/destroy 3.3-5.4 s at 3 and
3.1-9.4 s at 10000 (single calls under load); the attach that pays the owed
sweep 117 s; new host after a clean move: SR.attach 38 s + first SR.ls 8.8 s;
after a crash: SR.attach 357 s + first SR.ls 14 s; 100k index rows: first
SR.ls 56 s (renders them), warm 11-14 s (46.5 MB of JSON).  Since (the
listing kept in /run, the template render; alone, -n 30 --index-rows 100000):
first SR.ls 25 s, warm Plugin.Query + 0.75..0.95 s (median +0.82 s); -n 3000:
new host after a clean move SR.attach 26.5 s (zpool import -N alone 15.5 s)
+ first SR.ls 4.3 s.

N=100000 for real (2026-12-05, alone, 8 GiB guest; the log is in the tenth
session's closing note):

    vm.py run --timeout 10800 --mem 8192 -- python3 bench/volume_ls.py \
        -n 100000 --zvols 1000 --disks --skip walk,crash

making 168.5 + 2465.7 s; SR.ls rebuilt (a full read) 1716 s; warm SR.ls
2.59-2.69 s against Plugin.Query 0.80-1.02 s (median +1.79 s);
create/snapshot/clone/destroy 1.91/2.04/2.31/2.76 s against 1.62/1.74/
1.97/2.43 s at 3 (1.13-1.18x); the attach that pays the owed sweep 893 s;
new host after a clean move: SR.detach 33.1 s, SR.attach 181.6 s (zpool
import -N alone 50.7 s) + first SR.ls 45.4 s.

Since the new host keeps each row's SR.ls text as it takes the carried index
(2026-12-05, eleventh session; the machine busy, 33% steal), N=10000 with
--index-rows 100000 --profile: the padded index moved to a new host: SR.detach
47.3 s, SR.attach 175.7 s + first SR.ls 16.8 s; warm SR.ls at 100k rows
Plugin.Query + 2.21 s (46.5 MB through a pipe alone: 2.3-3.3 s in the guest).
Interleaved in one guest against the code before (probe, one round each):
SR.attach + first SR.ls at 100k rows 323.6 + 57.3 s before, 147.1 + 18.9 s
after.

With the pool's journal and the carried deltas (2026-12-05, twelfth session;
two test guests beside it), `-n 10000 --zvols 500 --disks --skip walk
--index-rows 100000` (1075 s): a new host after a crash (the host before it
mutated, then died) SR.attach 23.1 s (`zpool import -N` alone 19.1 s) +
first SR.ls 1.6 s, 5 datasets read again; the same pool without a journal
(every dataset read, as before) 106.9 + 0.8 s.  At 100k rows: a whole copy
carried 11.2 s, a delta 1.1 s; that host dies, a new host SR.attach 72.7 s
+ first SR.ls 6.5 s (one delta, 1 dataset read again), against a clean
move's 74.7 + 10.0 s.  Then (362cab6, `--skip walk,fullread`, two test
guests beside it): the SR.ls after a mutation stopped between its bump and
its index update 4.13 s (5 datasets read again), against 89.8 s for the
full read in the same run.  The guest alone (after 9338501, `--skip walk`,
391 s): after a crash SR.attach 11.7 s (import 8.9 s) + first SR.ls 0.9 s,
without a journal 93.4 + 0.9 s; the SR.ls after a stopped mutation 1.24 s
against a full read's 57.1 s; warm SR.ls Plugin.Query + 0.15 s.

Thirteenth session, the guest alone, `-n 10000 --zvols 500 --disks --skip
walk --index-rows 100000` (526 s): at 10k after a crash SR.attach 11.24 s
(import 8.40 s) + first SR.ls 0.77 s (85.65 + 0.73 s without the journal);
warm SR.ls + 0.15 s; at 100,001 rows warm SR.ls + 0.38 s, a new host after
a crash 29.61 + 2.77 s, after a clean move 31.84 + 2.61 s; Volume.create/
snapshot/clone/destroy 1.29/0.74/0.71/0.94 s at 3, 1.73/0.75/0.73/0.95 s at
10k, 0.78/0.72/0.67/0.93 s at 100k rows.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench._vm import disks_sr, file_sr, plugin_call as script  # noqa: E402


def timed(argv):
    t = time.time()
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout
    return time.time() - t, out.count(b"\n")


def progress(fig, args, msg):
    """One line as soon as a figure is taken (a run at 100k takes hours in TCG:
    what it measured survives a stop), and the figures so far to --json."""
    print(msg, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(fig, f, indent=1)


def warm_rounds(env, pool, count, rounds=5):
    """[(Plugin.Query s, warm SR.ls s)] interleaved (the load moves), and the
    median of SR.ls over the fixed cost."""
    out = []
    for _ in range(rounds):
        _, q = script("Plugin.Query", env)
        vols, t = script("SR.ls", env, sr=pool)
        assert len(vols) == count, (len(vols), count)
        out.append((q, t))
    over = sorted(t - q for q, t in out)
    return out, over[len(over) // 2]


def ops(env, pool):
    """Seconds of Volume.create, snapshot, clone and destroy (of the clone,
    the snapshot and the volume), one each."""
    out = {}
    v, out["create"] = script("Volume.create", env, sr=pool, name="op", description="",
                              size=1 << 20, sharable=False)
    s, out["snapshot"] = script("Volume.snapshot", env, sr=pool, key=v["key"])
    c, out["clone"] = script("Volume.clone", env, sr=pool, key=s["key"])
    _, out["destroy"] = script("Volume.destroy", env, sr=pool, key=c["key"])
    script("Volume.destroy", env, sr=pool, key=s["key"])
    script("Volume.destroy", env, sr=pool, key=v["key"])
    return out


def profiled(method, env, out_dir, **params):
    """One plugin call under cProfile (its own figures are not the bench's:
    the profiler slows Python down); prints where its time went."""
    import pstats
    out = os.path.join(out_dir, method + ".prof")
    _, took = script(method, env, profile_to=out, **params)
    print("== %s under cProfile: %.2f s" % (method, took), flush=True)
    st = pstats.Stats(out, stream=sys.stdout)
    st.sort_stats("cumulative").print_stats(25)
    st.sort_stats("tottime").print_stats(12)
    sys.stdout.flush()


def profile_move(env_from, env_to, conf, pool, out_dir):
    """Another clean move, its SR.attach, first and warm SR.ls profiled."""
    script("SR.detach", env_from, sr=pool)
    profiled("SR.attach", env_to, out_dir, configuration=conf)
    profiled("SR.ls", env_to, out_dir, sr=pool)
    profiled("SR.ls", env_to, out_dir, sr=pool)
    profiled("Plugin.Query", env_to, out_dir)


def stopped_mutation(env, conf, pool, count):
    """(seconds, how the index was made whole) of the SR.ls after a mutation
    stopped between its generation bump and its index update (a kill, a
    timeout), left as such a mutation leaves it: one volume named in the
    pool's journal with the generation moved on, in one `zfs set`."""
    from plugins import zfs
    from plugins.volume import journal, names
    root = names.sr_root(pool)
    got = zfs.get([root], [zfs.uprop("generation"), zfs.uprop("journal")])[root]
    gen = int(zfs.decode(got[zfs.uprop("generation")]))
    base, named = journal.parse(zfs.decode(got.get(zfs.uprop("journal"), "null")), gen)
    assert base is not None, "no journal to catch up from"
    one = zfs.list_names(root, ("name",), types="volume", depth=1)[0][0]
    value = journal.build(base, named | {journal.name_of(root, one)}, gen + 1)
    zfs.set_props(root, {zfs.uprop("journal"): zfs.encode(value),
                         zfs.uprop("generation"): str(gen + 1)})
    vols, took = script("SR.ls", env, sr=pool)
    assert len(vols) == count, (len(vols), count)
    return took, built(env, conf)


def carried_max_deltas():
    from plugins.volume import carried
    return carried.MAX_DELTAS


def built(env, conf):
    """How host env's index of the SR was last made whole (Index.built)."""
    from plugins.volume import metadata
    from plugins.volume.sr import configured_uuid
    idx = metadata.Index.for_sr(configured_uuid(conf), env["ZFSNG_STATE_DIR"])
    try:
        return idx.built()
    finally:
        idx.close()


def pad_index(fig, env, conf, pool, extra):
    """Made-up volume rows added to host env's index of the SR at its current
    generation, so a warm SR.ls lists N + extra volumes.  Their datasets do
    not exist: what this times is SR.ls's own work on a big index (a warm
    SR.ls reads no dataset), not ZFS's."""
    from plugins.volume import metadata, names
    from plugins.volume.sr import configured_uuid
    idx = metadata.Index.for_sr(configured_uuid(conf), env["ZFSNG_STATE_DIR"])
    rows = []
    for i in range(extra):
        k = names.new_key()
        rows.append({"key": k, "zname": names.volume_dataset(pool, k), "kind": "volume",
                     "name": "padding %d" % i, "description": "", "keys": {},
                     "sharable": False, "virtual_size": 1 << 20, "physical_utilisation": 0,
                     "volblocksize": 16384, "origin": "", "createtxg": 10 ** 9 + i})
    idx.commit(idx.generation(), upsert=rows)
    fig["padded"] = idx.count()
    out, fig["ls_padded_first"] = script("SR.ls", env, sr=pool)
    assert len(out) == fig["padded"], (len(out), fig["padded"])
    fig["ls_padded_bytes"] = len(json.dumps(out))
    fig["padded_rounds"], fig["ls_padded_over_median"] = warm_rounds(env, pool, fig["padded"])
    # a clean move of that index: the new host's own share of SR.attach and
    # its first SR.ls at N + extra rows (the pool imports N datasets)
    env_q = dict(env, ZFSNG_STATE_DIR=env["ZFSNG_STATE_DIR"] + "-moved")
    fig["padded_carry"] = carry_once(env, pool, whole=True)
    _, fig["padded_detach"] = script("SR.detach", env, sr=pool)
    _, fig["padded_attach"] = script("SR.attach", env_q, configuration=conf)
    out, fig["padded_ls_first"] = script("SR.ls", env_q, sr=pool)
    assert len(out) == fig["padded"], (len(out), fig["padded"])
    # that host works on (a delta carried, as a full journal would), then
    # dies (no SR.detach): a new host takes the copy the detach left, the
    # delta, and reads again what the journal names since
    fig["padded_ops"] = ops(env_q, pool)
    kept = [script("Volume.create", env_q, sr=pool, name="after the move", description="",
                   size=1 << 20, sharable=False)[0]]
    fig["padded_delta"] = carry_once(env_q, pool, whole=False)
    kept += [script("Volume.create", env_q, sr=pool, name="after the delta", description="",
                    size=1 << 20, sharable=False)[0]]
    subprocess.run(["zpool", "export", pool], check=True)
    env_r = dict(env, ZFSNG_STATE_DIR=env["ZFSNG_STATE_DIR"] + "-crashed")
    _, fig["padded_attach_crashed"] = script("SR.attach", env_r, configuration=conf)
    out, fig["padded_ls_first_crashed"] = script("SR.ls", env_r, sr=pool)
    assert len(out) == fig["padded"] + 2 and set(v["key"] for v in kept) <= \
        set(v["key"] for v in out)
    fig["padded_crashed_built"] = built(env_r, conf)


def carry_once(env, pool, whole):
    """Seconds of one copy of host env's index into the pool under the SR lock
    (carried.carry_index): whole, what SR.detach pays (and a mutation once
    deltas pile up), or a delta, what a mutation with a full journal pays."""
    code = ("import sys, time; from plugins.volume import carried, lock, sr; "
            "pool = sys.argv[1]\n"
            "with lock.sr_lock(pool):\n"
            "    h = sr.SR.open(pool); t = time.time()\n"
            "    ok = carried.carry_index(h, whole=%r)\n"
            "    print(time.time() - t if ok else -1)" % whole)
    out = subprocess.run([sys.executable, "-c", code, pool], env=dict(env, PYTHONPATH=ROOT),
                         stdout=subprocess.PIPE, check=True).stdout
    took = float(out.split()[-1])
    assert took >= 0, "the index was not carried"
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10000, help="volumes + snapshots (default 10000)")
    ap.add_argument("--zvols", type=int, default=500, help="how many of them are zvols")
    ap.add_argument("--index-rows", type=int, default=0,
                    help="then pad the last host's index to this many rows (made-up volumes "
                    "without datasets: a warm SR.ls reads no dataset) and time SR.ls")
    ap.add_argument("--keep", action="store_true", help="keep the pool")
    ap.add_argument("--disks", action="store_true", help="the SR on the VM's four disks, not "
                    "on a file in /tmp (RAM in the guest: use it from 100k)")
    ap.add_argument("--json", help="write the figures here too (after each step)")
    ap.add_argument("--profile", action="store_true", help="then move the SR once more to a "
                    "new host and print cProfile's view of its SR.attach, first and warm "
                    "SR.ls and a Plugin.Query (not timed figures: the profiler slows Python)")
    ap.add_argument("--skip", default="", help="comma list of steps not to run: walk (the "
                    "zfs list -r), crash (a new host after a crash: the pool's journal), "
                    "fullread (a new host after a crash without a journal: every dataset "
                    "read, half an hour at 100k in TCG)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"walk", "crash", "fullread"}:
        ap.error("--skip takes walk, crash, fullread")
    import libzfs_core as lzc
    from plugins import zfs
    from plugins.volume import names

    state = tempfile.mkdtemp(prefix="zfsng-bench-")
    env = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host-a"))
    env_b = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host-b"))
    env_c = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host-c"))
    if args.disks:
        conf, pool = disks_sr(env)
        search = "/dev/disk/by-id"
    else:
        conf, pool = file_sr(state, env, 8 << 30)
        search = state
    fig = {"n": args.n}
    try:
        fig["ops_small"] = ops(env, pool)
        progress(fig, args, "ops at 3: %s" % fig["ops_small"])
        zvols = min(args.zvols, args.n)
        t = time.time()
        keys = []
        for i in range(zvols):
            k = names.new_key()
            ds = names.volume_dataset(pool, k).encode()
            lzc.lzc_create(ds, ds_type="zvol", props={
                b"volsize": 1 << 20, b"volblocksize": 16384,
                zfs.uprop("name").encode(): zfs.encode("bench %d" % i).encode()})
            keys.append(ds)
        fig["make_zvols"] = time.time() - t
        progress(fig, args, "made %d zvols: %.1f s" % (zvols, fig["make_zvols"]))
        t = time.time()
        left = args.n - zvols
        while left > 0:
            # one atomic batch (one txg) takes one snapshot of each zvol
            batch = min(left, len(keys))
            snaps = [ds + b"@" + names.new_key().encode() for ds in keys[:batch]]
            lzc.lzc_snapshot(snaps, {zfs.uprop("name").encode(): b'"bench snap"'})
            left -= batch
        fig["make_snapshots"] = time.time() - t
        progress(fig, args, "made %d snapshots: %.1f s" % (args.n - zvols, fig["make_snapshots"]))
        # the pool changed behind the plugin's back: its generation tells it
        zfs.zfs("set", "%s=%d" % (zfs.uprop("generation"), 10 ** 6), names.sr_root(pool))
        root = names.sr_root(pool)
        if "walk" not in skip:
            fig["zfs_list_all"], rows = timed(["zfs", "list", "-H", "-p", "-o", "name", "-t",
                                               "volume,snapshot", "-r", root])
            progress(fig, args, "walk: %.1f s, %d rows" % (fig["zfs_list_all"], rows))
        vols, fig["ls_rebuilt"] = script("SR.ls", env, sr=pool)
        assert len(vols) == args.n, (len(vols), args.n)
        progress(fig, args, "SR.ls rebuilt: %.1f s" % fig["ls_rebuilt"])
        fig["warm_rounds"], fig["ls_warm_over_median"] = warm_rounds(env, pool, args.n)
        progress(fig, args, "warm rounds (Plugin.Query, SR.ls): %s, median over +%.2f s"
                 % (fig["warm_rounds"], fig["ls_warm_over_median"]))
        fig["ops_large"] = ops(env, pool)
        progress(fig, args, "ops at %d: %s" % (args.n, fig["ops_large"]))
        fig["ls_after_stop"], fig["after_stop_built"] = stopped_mutation(env, conf, pool,
                                                                         args.n)
        progress(fig, args, "SR.ls after a mutation stopped mid-way: %.1f s (%s)"
                 % (fig["ls_after_stop"], fig["after_stop_built"]))
        # the rebuild left a sweep owed (a changed pool looks like a crash):
        # the next SR.attach pays it, here on the same host
        script("SR.detach", env, sr=pool)
        _, fig["attach_sweeping"] = script("SR.attach", env, configuration=conf)
        progress(fig, args, "SR.attach paying the sweep: %.1f s" % fig["attach_sweeping"])
        # another host, after a clean SR.detach (the index travels in the pool)
        _, fig["detach"] = script("SR.detach", env, sr=pool)
        _, fig["attach_carried"] = script("SR.attach", env_b, configuration=conf)
        vols, fig["ls_first_carried"] = script("SR.ls", env_b, sr=pool)
        assert len(vols) == args.n, (len(vols), args.n)
        progress(fig, args, "new host, clean move: SR.detach %.1f s, SR.attach %.1f s, first "
                 "SR.ls %.1f s" % (fig["detach"], fig["attach_carried"], fig["ls_first_carried"]))
        # `zpool import -N` alone, the part of every new host's SR.attach
        # that is ZFS's own (the same pool, the same caches as the move above)
        script("SR.detach", env_b, sr=pool)
        fig["zpool_import"], _ = timed(["zpool", "import", "-N", "-d", search, pool])
        progress(fig, args, "zpool import -N alone: %.1f s" % fig["zpool_import"])
        script("SR.attach", env_b, configuration=conf)
        last = env_b
        count = args.n
        if "crash" not in skip:
            # host B works on, then dies (no SR.detach): what it changed is in
            # the pool's journal, so host C reads those datasets again and
            # takes the rest from the copy A's SR.detach left in the pool
            ops(env_b, pool)
            kept, _ = script("Volume.create", env_b, sr=pool, name="after the move",
                             description="", size=1 << 20, sharable=False)
            count += 1
            subprocess.run(["zpool", "export", pool], check=True)
            _, fig["attach_crashed"] = script("SR.attach", env_c, configuration=conf)
            vols, fig["ls_first_crashed"] = script("SR.ls", env_c, sr=pool)
            assert len(vols) == count and kept["key"] in set(v["key"] for v in vols)
            fig["crashed_built"] = built(env_c, conf)
            progress(fig, args, "new host after a crash: SR.attach %.1f s + first SR.ls %.1f s "
                     "(%s)" % (fig["attach_crashed"], fig["ls_first_crashed"],
                               fig["crashed_built"]))
            last = env_c
        if "fullread" not in skip:
            # the same without a journal (a pool from before it, or one whose
            # copy could not be carried): every dataset is read
            zfs.zfs("inherit", zfs.uprop("journal"), names.sr_root(pool))
            zfs.zfs("set", "%s=%d" % (zfs.uprop("generation"), 2 * 10 ** 6),
                    names.sr_root(pool))
            subprocess.run(["zpool", "export", pool], check=True)
            env_d = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host-d"))
            _, fig["attach_fullread"] = script("SR.attach", env_d, configuration=conf)
            vols, fig["ls_first_fullread"] = script("SR.ls", env_d, sr=pool)
            assert len(vols) == count, (len(vols), count)
            fig["fullread_built"] = built(env_d, conf)
            progress(fig, args, "new host after a crash, no journal: SR.attach %.1f s + first "
                     "SR.ls %.1f s (%s)" % (fig["attach_fullread"], fig["ls_first_fullread"],
                                            fig["fullread_built"]))
            last = env_d
        if args.profile:
            env_p = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(state, "host-p"))
            profile_move(last, env_p, conf, pool, state)
            last = env_p
        if args.index_rows > args.n:
            pad_index(fig, last, conf, pool, args.index_rows - args.n)
        print("N=%d (%d zvols, %d snapshots)" % (args.n, zvols, args.n - zvols))
        print("  make: lzc_create %.1f s, lzc_snapshot batches %.1f s"
              % (fig["make_zvols"], fig["make_snapshots"]))
        if "zfs_list_all" in fig:
            print("  zfs list -r -o name (a walk of every dataset): %.2f s, %d rows"
                  % (fig["zfs_list_all"], rows))
        print("  SR.ls after the pool changed behind the index: %.2f s" % fig["ls_rebuilt"])
        for q, t in fig["warm_rounds"]:
            print("  Plugin.Query %.2f s, warm SR.ls %.2f s (+%.2f s)" % (q, t, t - q))
        print("  warm SR.ls over the fixed cost, median: +%.2f s" % fig["ls_warm_over_median"])
        for k in ("create", "snapshot", "clone", "destroy"):
            print("  Volume.%-8s at 3: %.2f s   at %d: %.2f s" % (
                k, fig["ops_small"][k], args.n, fig["ops_large"][k]))
        print("  SR.ls after a mutation stopped between its bump and its index update: %.2f s "
              "(%s)" % (fig["ls_after_stop"], fig["after_stop_built"]))
        print("  same host, SR.attach that pays the sweep the rebuild owes: %.2f s"
              % fig["attach_sweeping"])
        print("  new host, clean move: SR.attach %.2f s + first SR.ls %.2f s"
              % (fig["attach_carried"], fig["ls_first_carried"]))
        print("    of which zpool import -N, timed alone: %.2f s" % fig["zpool_import"])
        if "attach_crashed" in fig:
            print("  new host, after a crash: SR.attach %.2f s + first SR.ls %.2f s (%s)"
                  % (fig["attach_crashed"], fig["ls_first_crashed"], fig["crashed_built"]))
        if "attach_fullread" in fig:
            print("  new host, after a crash without a journal: SR.attach %.2f s + first "
                  "SR.ls %.2f s (%s)" % (fig["attach_fullread"], fig["ls_first_fullread"],
                                         fig["fullread_built"]))
        if "padded" in fig:
            print("  index padded to %d rows (%.1f MB of JSON): first SR.ls %.2f s (renders the"
                  " new rows)" % (fig["padded"], fig["ls_padded_bytes"] / 1e6,
                                  fig["ls_padded_first"]))
            for q, t in fig["padded_rounds"]:
                print("    Plugin.Query %.2f s, warm SR.ls %.2f s (+%.2f s)" % (q, t, t - q))
            print("    warm SR.ls over the fixed cost, median: +%.2f s"
                  % fig["ls_padded_over_median"])
            print("    moved to a new host: SR.detach %.2f s, SR.attach %.2f s + first SR.ls "
                  "%.2f s" % (fig["padded_detach"], fig["padded_attach"],
                              fig["padded_ls_first"]))
            print("    carried into the pool: a whole copy %.2f s (SR.detach, a mutation "
                  "after %d deltas), a delta %.2f s (a mutation with a full journal)"
                  % (fig["padded_carry"], carried_max_deltas(), fig["padded_delta"]))
            for k in ("create", "snapshot", "clone", "destroy"):
                print("    Volume.%-8s at %d rows: %.2f s" % (k, fig["padded"],
                                                           fig["padded_ops"][k]))
            print("    that host dies, a new host: SR.attach %.2f s + first SR.ls %.2f s (%s)"
                  % (fig["padded_attach_crashed"], fig["padded_ls_first_crashed"],
                     fig["padded_crashed_built"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(fig, f, indent=1)
    finally:
        if not args.keep:
            subprocess.run(["zpool", "destroy", "-f", pool])
            subprocess.run(["rm", "-rf", state])


if __name__ == "__main__":
    main()
