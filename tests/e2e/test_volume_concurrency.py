"""xapi runs plugin scripts concurrently and may die at any point: 32 parallel
operations on one SR all succeed.  kill -9 in the middle of calls (create,
snapshot, clone, destroy, revert, resize, CBT), with each kill checked to have
happened: test_volume_kill9.py."""

from volume_calls import call, finish, start, zfs_names

MiB = 1 << 20


def zfs_truth(pool):
    """The volume keys ZFS holds, by the naming rules (names.classify)."""
    from plugins.volume import names
    out = {}
    for n in zfs_names(pool):
        kind, key = names.classify(n, pool)
        if kind in ("volume", "snapshot"):
            out[key] = kind
    return out


def ls_truth(pool):
    return {v["key"]: "volume" if v["read_write"] else "snapshot"
            for v in call("SR.ls", sr=pool)}


def run_all(procs):
    results = [finish(p) for p in procs]
    bad = [(rc, doc, err) for rc, doc, err in results if rc != 0]
    assert not bad, bad[:3]
    return [doc for _, doc, _ in results]


def test_32_parallel_creates_then_snapshots_and_destroys(sr):
    pool = sr
    vols = run_all([start("Volume.create", sr=pool, name="p%d" % i, description="",
                          size=MiB, sharable=False) for i in range(32)])
    keys = [v["key"] for v in vols]
    assert len(set(keys)) == 32
    assert sorted(v["name"] for v in vols) == sorted("p%d" % i for i in range(32))
    assert zfs_truth(pool) == dict((k, "volume") for k in keys)
    assert ls_truth(pool) == zfs_truth(pool)

    procs = [start("Volume.snapshot", sr=pool, key=k) for k in keys[:16]]
    procs += [start("Volume.destroy", sr=pool, key=k) for k in keys[16:]]
    out = run_all(procs)
    snaps = [s["key"] for s in out[:16]]
    assert out[16:] == [None] * 16
    want = dict((k, "volume") for k in keys[:16])
    want.update((k, "snapshot") for k in snaps)
    assert zfs_truth(pool) == want
    assert ls_truth(pool) == want
