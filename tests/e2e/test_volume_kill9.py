"""kill -9 at random points of plugin calls (issue 12, item 4c): create,
snapshot, clone, destroy, revert, resize, enable_cbt and disable_cbt on one SR,
three calls in four SIGKILLed after a random delay (seeded, printed) drawn
from that call's measured duration, so a good share really die mid-way
(returncode -9, asserted); every fourth call runs to its end, must succeed
after the kills before it, and its time becomes the method's duration (a call
after a kill also finishes the killed one's work, and the machine's load
changes: a duration measured once, up front, made a CI run kill 19 of 20).  After every call ZFS is compared with what the call may have
done: no key appears but from a create/snapshot/clone (at most one, the one it
returned if it completed), none disappears but the one a destroy named.  At
the end the host dies: the pool goes to a new host (no SR.detach, no local
index; copies of the index were carried into the pool every few mutations on
the way, a small ZFSNG_JOURNAL_LIMIT, so kills hit those too), whose SR.attach
catches up from the pool's copy and journal (or reads every dataset where
they cannot be used) and resets what the dead host left; then: SR.ls == ZFS, every volume that
completed still there with its size and data (first MiB hashed through its
device), no leftovers (revert clones, read-only clones, CBT temporary or
anchor snapshots, holds, hidden datasets nothing depends on), CBT state
consistent, and once every VDI is destroyed the SR root is empty.

ZFSNG_KILL9_CALLS (default 20: CI's short run; the long run is 100) and
ZFSNG_KILL9_SEED (default: random, printed) make a run repeatable."""

import hashlib
import os
import random
import signal
import subprocess
import time

from volume_calls import call, index_built, start, wait_zfs_idle, zfs_names, zget

MiB = 1 << 20
CALLS = int(os.environ.get("ZFSNG_KILL9_CALLS", "20"))
SEED = int(os.environ.get("ZFSNG_KILL9_SEED", str(random.randrange(1 << 30))))
ZERO_MIB = hashlib.sha256(bytes(MiB)).hexdigest()


def truth(pool):
    """{key: (kind, dataset)} by the naming rules; an interrupted revert's
    r-KEY stands for KEY when KEY is gone (the next call finishes it)."""
    from plugins.volume import names
    out, reverting = {}, {}
    for n in zfs_names(pool):
        kind, key = names.classify(n, pool)
        if kind in ("volume", "snapshot"):
            out[key] = (kind, n.split("@", 1)[0])
        elif kind == "reverting":
            reverting[key] = n
    for key, n in reverting.items():
        out.setdefault(key, ("volume", n))
    return out


def ls(pool):
    return {v["key"]: v for v in call("SR.ls", sr=pool)}


def ls_kinds(pool):
    return {k: "volume" if v["read_write"] else "snapshot" for k, v in ls(pool).items()}


def generation(pool):
    return int(zget(pool + "/zfs-ng", "org.zfs-ng:generation") or 0)


def read_mib(pool, key):
    """sha256 of the first MiB of a volume or snapshot, through its device."""
    from plugins.volume import volume
    dev = volume.activate_device(pool, key)["device"]
    try:
        fd = os.open(dev, os.O_RDONLY)
        try:
            data = os.pread(fd, MiB, 0)
        finally:
            os.close(fd)
    finally:
        volume.deactivate_device(pool, key)
    return hashlib.sha256(data).hexdigest()


def write_mib(pool, key, data):
    from plugins.volume import volume
    dev = volume.activate_device(pool, key)["device"]
    try:
        fd = os.open(dev, os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, 0) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        volume.deactivate_device(pool, key)


def run_call(method, params, delay):
    """Start a plugin call, SIGKILL it after delay s (None: never) if still
    running: ('killed', None) / ('ok', result) / ('error', error JSON)."""
    import json
    p = start(method, **params)
    if delay is None:
        p.wait()
    deadline = time.time() + (delay or 0)
    while p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    out = p.stdout.read()
    err = p.stderr.read()
    p.wait()
    p.stdout.close()
    p.stderr.close()
    if p.returncode == -signal.SIGKILL:
        return "killed", None
    doc = json.loads(out.splitlines()[0]) if out.strip() else err
    return ("ok" if p.returncode == 0 else "error"), doc


def pick(rng, t, base):
    """(method, params, acts) for the next call, from the current ZFS truth."""
    vols = sorted(k for k, (kind, _) in t.items() if kind == "volume")
    snaps = sorted(k for k, (kind, _) in t.items() if kind == "snapshot")
    revertible = [s for s in snaps if t[s][1].rsplit("/", 1)[1] in vols]
    ops = [("create", 2)]
    if vols:
        ops += [("snapshot", 3), ("clone", 2), ("resize", 1), ("enable_cbt", 1.5),
                ("disable_cbt", 1)]
    if t:
        ops += [("destroy", 2 if len(t) < 20 else 6)]
    if revertible:
        ops += [("revert", 2)]
    r = rng.uniform(0, sum(w for _, w in ops))
    for op, w in ops:
        r -= w
        if r <= 0:
            break
    if op == "create":
        return "Volume.create", dict(name="k", description="", size=2 * MiB, sharable=False)
    if op == "snapshot":
        return "Volume.snapshot", dict(key=rng.choice(vols + snaps[:len(snaps) // 3]))
    if op == "clone":
        return "Volume.clone", dict(key=rng.choice(vols + snaps))
    if op == "destroy":
        return "Volume.destroy", dict(key=rng.choice(sorted(t)))
    if op == "revert":
        s = rng.choice(revertible)
        return "Volume.revert", dict(snapshot=s, key=t[s][1].rsplit("/", 1)[1])
    if op == "resize":
        k = rng.choice(vols)
        return "Volume.resize", dict(key=k, new_size=int(zget(t[k][1], "volsize")) + MiB)
    return "Volume." + op, dict(key=rng.choice(vols))


def test_kill_9_at_random_points_of_plugin_calls(sr, sr_vdev, tmp_path, monkeypatch):
    pool = sr
    # copies of the index carried into the pool every few mutations (a small
    # journal), so kills land in them too, and the new host below starts from one
    monkeypatch.setenv("ZFSNG_JOURNAL_LIMIT", "500")
    rng = random.Random(SEED)
    print("\nseed %d (ZFSNG_KILL9_SEED), %d calls" % (SEED, CALLS))
    # volumes with known data, and every operation once to measure its duration
    content = {}                      # key -> set of acceptable sha256 of the first MiB
    sizes = {}                        # key -> set of acceptable volsizes
    base = []
    for i in range(3):
        k = call("Volume.create", sr=pool, name="b%d" % i, description="", size=4 * MiB,
                 sharable=False)["key"]
        data = os.urandom(MiB)
        write_mib(pool, k, data)
        content[k] = {hashlib.sha256(data).hexdigest()}
        sizes[k] = {4 * MiB}
        base.append(k)
    dur = {}

    def timed(method, **params):
        t0 = time.time()
        r = call(method, sr=pool, **params)
        dur[method] = time.time() - t0
        return r

    s0 = timed("Volume.snapshot", key=base[0])["key"]
    c0 = timed("Volume.clone", key=base[0])["key"]
    timed("Volume.enable_cbt", key=base[1])
    timed("Volume.disable_cbt", key=base[1])
    timed("Volume.enable_cbt", key=base[1])
    timed("Volume.resize", key=base[2], new_size=5 * MiB)
    sizes[base[2]] = {5 * MiB}
    timed("Volume.revert", snapshot=s0, key=base[0])
    k = timed("Volume.create", name="t", description="", size=MiB, sharable=False)["key"]
    timed("Volume.destroy", key=k)
    content[s0] = content[c0] = content[base[0]]
    sizes[s0] = sizes[c0] = {4 * MiB}
    print("call durations (s):", dict((m, round(d, 2)) for m, d in sorted(dur.items())))

    made = set(content)               # every key a call of ours created
    log = []                          # (i, method, params, delay, outcome, mutated)
    t = truth(pool)
    assert set(t) == set(content)
    for i in range(CALLS):
        method, params = pick(rng, t, base)
        # most of a call is the interpreter starting: aim at its second half,
        # where the ZFS work is; every fourth call runs to its end and is timed
        full = i % 4 == 3
        delay = None if full else round(rng.uniform(0.5, 1.05) * dur[method], 3)
        gen0 = generation(pool)
        t0 = time.time()
        outcome, doc = run_call(method, dict(params, sr=pool), delay)
        if full:
            dur[method] = time.time() - t0
            assert outcome == "ok", "call %d %s %r after kills: %s" % (i, method, params, doc)
        wait_zfs_idle()               # the killed script's zfs children finish on their own
        after = truth(pool)
        mutated = generation(pool) != gen0
        log.append((i, method, params, delay, outcome, mutated))
        where = "call %d %s %r (delay %s s, %s)" % (i, method, params, delay, outcome)
        assert outcome != "error", "%s failed: %s" % (where, doc)
        new, gone = set(after) - set(t), set(t) - set(after)
        key = params.get("key")
        if method in ("Volume.create", "Volume.snapshot", "Volume.clone"):
            assert len(new) <= 1 and not gone, (where, new, gone)
            want_kind = "snapshot" if method == "Volume.snapshot" else "volume"
            for n in new:
                assert after[n][0] == want_kind, (where, after[n])
            if outcome == "ok":
                assert new == {doc["key"]}, (where, new, doc)
            for n in new:
                made.add(n)
                if method == "Volume.create":
                    content[n], sizes[n] = {ZERO_MIB}, {2 * MiB}
                elif key in content:
                    content[n], sizes[n] = set(content[key]), set(sizes[key])
        elif method == "Volume.destroy":
            assert not new and gone <= {key}, (where, new, gone)
            if outcome == "ok":
                assert gone == {key}, where
            for n in gone:
                content.pop(n, None)
                sizes.pop(n, None)
        else:
            assert not new and not gone, (where, new, gone)
            if method == "Volume.revert":
                snap = params["snapshot"]
                was, now = content.get(key, set()), content.get(snap, set())
                # unknown (empty) when either side is: its data is then not checked
                content[key] = set(now) if outcome == "ok" else (was | now if was and now
                                                                 else set())
                sizes[key] = set(sizes.get(snap, ())) | (set() if outcome == "ok"
                                                         else sizes.get(key, set()))
            elif method == "Volume.resize" and key in sizes:
                sizes[key] = ({params["new_size"]} if outcome == "ok"
                              else sizes[key] | {params["new_size"]})
        t = after
        if i % 10 == 9:               # the index agrees without any attach
            assert ls_kinds(pool) == dict((k, v[0]) for k, v in t.items()), where
    killed = [e for e in log if e[4] == "killed"]
    print("calls: %d, killed: %d (%d after the SR generation moved: mid-mutation), "
          "completed: %d" % (len(log), len(killed), sum(1 for e in killed if e[5]),
                             len(log) - len(killed)))
    for e in log:
        print("  %3d %-20s delay %8s s  %-6s %s" % (e[0], e[1], e[3] or "-", e[4],
                                                     "mutated" if e[5] else ""))
    assert len(killed) >= CALLS * 3 // 10, "too few calls killed mid-way"
    # the calls that ran to their end, at least one in four, all succeeded
    # (asserted above); of the killed-at-random others some may complete too
    # kills inside a mutation: a fraction that depends on the machine's load
    # (8-13 of 100 seen under TCG).  The long run (>= 50 calls) must have at
    # least one in 20; a short CI run of 20 has none with ~7% chance, so
    # there it is printed (above), and the killed share is what must hold
    if CALLS >= 50:
        assert sum(1 for e in killed if e[5]) >= CALLS // 20, "too few kills inside a mutation"

    # the host dies: another one takes the pool (no SR.detach, no local
    # index, nothing in /run): its SR.attach catches up from the pool's
    # carried index and journal, or reads everything where those cannot be
    # used, and resets what the dead host left; then everything must agree
    subprocess.run(["udevadm", "settle", "--timeout=30"])
    for _ in range(20):
        if subprocess.run(["zpool", "export", pool]).returncode == 0:
            break
        time.sleep(0.5)
    for var in ("ZFSNG_STATE_DIR", "ZFSNG_RUN_DIR", "ZFSNG_NODE_RUN_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "new-host" / var))
    call("SR.attach", configuration={"pool": pool, "device": sr_vdev})
    from plugins.volume import sr as sr_mod
    print("the new host's index:", index_built(sr_mod.read_root_props(pool)["sr-uuid"],
                                               str(tmp_path / "new-host" / "ZFSNG_STATE_DIR")))
    listed = ls(pool)
    t = truth(pool)
    assert dict((k, "volume" if v["read_write"] else "snapshot") for k, v in listed.items()) \
        == dict((k, v[0]) for k, v in t.items())
    assert set(listed) <= made                             # nothing invented
    assert set(content) == set(listed)                     # nothing lost
    from plugins.volume import names
    everything = zfs_names(pool, "filesystem,volume,snapshot,bookmark")
    leftovers = []
    for n in everything:
        kind, _ = names.classify(n, pool)
        if kind in ("reverting", "readonly", "session"):
            leftovers.append(n)
        if "@zfsng-cbt-" in n:                             # anchors are bookmarks only
            leftovers.append(n)
    assert not leftovers, leftovers
    holds = subprocess.run(["zfs", "list", "-H", "-p", "-t", "snapshot", "-o", "name,userrefs",
                            "-r", pool], stdout=subprocess.PIPE, universal_newlines=True,
                           check=True).stdout.split("\n")
    assert not [h for h in holds if h and h.split("\t")[1] != "0"], holds
    origins = set(subprocess.run(["zfs", "list", "-H", "-o", "origin", "-r", pool + "/zfs-ng"],
                                 stdout=subprocess.PIPE, universal_newlines=True,
                                 check=True).stdout.split())
    for n in everything:
        if names.classify(n, pool)[0] != "hidden" or "#" in n:    # (a bookmark of one)
            continue
        if "@" in n:
            assert n in origins, "hidden snapshot %s has no clone" % n
        else:
            assert any(x.startswith(n + "@") or x.startswith(n + "#") for x in everything), \
                "hidden dataset %s holds nothing" % n
    # sizes, CBT state and data of every volume that is left
    for k, v in sorted(listed.items()):
        assert v["virtual_size"] in sizes[k], (k, v["virtual_size"], sizes[k])
        assert int(zget(t[k][1] if v["read_write"] else "%s@%s" % (t[k][1], k), "volsize")) \
            == v["virtual_size"]
        if v["read_write"]:
            on = zget(t[k][1], "zfs-ng-cbt:enabled") == "on"
            assert v["cbt_enabled"] == on, (k, v["cbt_enabled"])
            if on:                                         # tracking has its anchor
                assert t[k][1] + "#zfsng-cbt-anchor" in everything, k
    checked = 0
    for k in sorted(listed):
        if content.get(k):
            got = read_mib(pool, k)
            assert got in content[k], (k, listed[k]["read_write"])
            checked += 1
    print("after SR.attach: %d VDIs, %d with their data checked" % (len(listed), checked))
    # nothing leaked: with every VDI destroyed the SR root is empty
    for k in listed:
        call("Volume.destroy", sr=pool, key=k)
    call("SR.attach", configuration={"pool": pool})
    assert zfs_names(pool, "volume,snapshot,bookmark") == set()


def test_attach_drops_snapshots_of_interrupted_cbt_calls(sr):
    """What a Volume.enable_cbt killed between its anchor snapshot and the
    snapshot's destroy leaves (V@zfsng-cbt-anchor), and a list_changed_blocks
    killed while a live volume had its temporary snapshot
    (V@zfsng-cbt-tmp-HEX): SR.attach destroys both.  Before, they stayed, and
    once the volume was destroyed it was kept hidden for good (it had a
    snapshot), found by test_kill_9_at_random_points_of_plugin_calls.
    SR.attach sweeps only where a kill leaves a trace, so each kill is modelled
    with the trace its call leaves before making the snapshot (sr.py attach;
    the random kills above do it for real): enable_cbt runs inside a mutation,
    whose generation bump the index never caught up with; list_changed_blocks
    with a live end marks the index first (cbt_methods.list_changed_blocks)."""
    from plugins.volume import metadata
    pool = sr
    k = call("Volume.create", sr=pool, name="a", description="", size=MiB,
             sharable=False)["key"]
    ds = "%s/zfs-ng/%s" % (pool, k)
    # enable_cbt killed: generation bumped, the index not committed
    subprocess.run(["zfs", "snapshot", ds + "@zfsng-cbt-anchor"], check=True)
    subprocess.run(["zfs", "set", "org.zfs-ng:generation=%d" % (generation(pool) + 1),
                    pool + "/zfs-ng"], check=True)
    call("SR.attach", configuration={"pool": pool})
    assert zfs_names(pool, "volume,snapshot,bookmark") == {ds}
    # list_changed_blocks killed: its mark, then its temporary snapshot
    sr_uuid = zget(pool + "/zfs-ng", "org.zfs-ng:sr-uuid").strip('"')
    metadata.Index.for_sr(sr_uuid).want_sweep("live CBT interval of %s" % k)
    subprocess.run(["zfs", "snapshot", ds + "@zfsng-cbt-tmp-0123456789ab"], check=True)
    call("SR.attach", configuration={"pool": pool})
    assert zfs_names(pool, "volume,snapshot,bookmark") == {ds}
    assert metadata.Index.for_sr(sr_uuid).sweeps_wanted() == []
    call("Volume.enable_cbt", sr=pool, key=k)               # still works afterwards
    assert ls(pool)[k]["cbt_enabled"]
    call("Volume.destroy", sr=pool, key=k)
    call("SR.attach", configuration={"pool": pool})
    assert zfs_names(pool, "volume,snapshot,bookmark") == set()


def test_a_destroy_killed_before_its_deferred_destroy_leaves_nothing_for_good(sr):
    """Volume.destroy of a snapshot with a clone renames it hidden (V@h-...)
    and then marks it for destruction with its last clone (`zfs destroy -d`,
    volume.py _destroy_snapshot).  Killed between the two, the snapshot stays
    without the mark; the SR.attach after the kill keeps it (its clone still
    needs it) and sweeps no more, so once the clone went it stayed for good,
    and held its volume hidden after that volume's destroy too (CI, stop 19;
    a fresh clone, seed 1070240819).  The kill is modelled by the trace it
    leaves: the rename done, the generation bumped, the index behind."""
    pool = sr
    for volume_first in (False, True):
        v = call("Volume.create", sr=pool, name="v", description="", size=MiB,
                 sharable=False)["key"]
        s = call("Volume.snapshot", sr=pool, key=v)["key"]
        c = call("Volume.clone", sr=pool, key=s)["key"]
        ds = "%s/zfs-ng/%s" % (pool, v)
        subprocess.run(["zfs", "rename", "%s@%s" % (ds, s), ds + "@h-0123456789abcdef0123456789abcdef"],
                       check=True)
        subprocess.run(["zfs", "set", "org.zfs-ng:generation=%d" % (generation(pool) + 1),
                        pool + "/zfs-ng"], check=True)
        call("SR.attach", configuration={"pool": pool})            # the crash reset
        assert set(ls(pool)) == {v, c}
        if volume_first:
            call("Volume.destroy", sr=pool, key=v)     # hidden: its snapshot has a clone
            call("Volume.destroy", sr=pool, key=c)
            assert zfs_names(pool, "volume,snapshot,bookmark") == set()
        else:
            call("Volume.destroy", sr=pool, key=c)
            assert zfs_names(pool, "volume,snapshot,bookmark") == {ds}
            call("Volume.destroy", sr=pool, key=v)
            assert zfs_names(pool, "volume,snapshot,bookmark") == set()
        assert ls(pool) == {}
