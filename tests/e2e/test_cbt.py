"""CBT from real `zfs send` streams (ZFS 2.3 in the test VM): bitmaps checked
bit for bit against the writes made and against the snapshots' contents,
through data_destroy (snapshot -> bookmark -> snapshot), clones, and a 1%
change on a larger sparse zvol with the bytes that came through the pipe."""

import base64
import hashlib
import os
import random
import subprocess

import pytest

from conftest import TEST_DIR, Dev, make_vol, run, wait_for_path
from plugins.volume import cbt
from plugins.volume import sendstream as ss

K = 1024
K64 = 64 * K
MiB = 1 << 20


def snap(ds, name, dev):
    dev.sync()
    run("zfs", "snapshot", "%s@%s" % (ds, name))
    return "%s@%s" % (ds, name)


def block_hashes(snapname, size):
    """sha1 of every 64 KiB block of a snapshot's device (snapdev=visible)."""
    path = wait_for_path("/dev/zvol/" + snapname)
    out = []
    with open(path, "rb") as f:
        for _ in range(-(-size // K64)):
            out.append(hashlib.sha1(f.read(K64)).digest())
    return out


def blocks_of(extents):
    return set(b for o, n in extents for b in range(o // K64, -(-(o + n) // K64)))


def bits(result):
    assert result["granularity"] == 65536
    return set(cbt.bitmap_blocks(result["bitmap"]))


def test_bitmap_bit_for_bit_through_data_destroy_and_clone(zpool, tmp_path):
    size = 64 * MiB
    ds, path = make_vol(zpool, "v", size)
    state = str(tmp_path / "state")
    cbt.enable(ds, state)
    cbt.enable(ds, state)                               # idempotent
    assert cbt.is_enabled(ds)
    assert subprocess.run(["zfs", "list", "-t", "bookmark", "%s#%s" % (ds, cbt.ANCHOR)]).returncode == 0
    rnd = random.Random(1)
    dev = Dev(path)
    # --- before A: data at known places
    base = [(0, MiB), (4 * MiB, K64), (10 * MiB, 64 * K), (16 * MiB - 16 * K, 32 * K)]
    for off, n in base:
        dev.write(off, rnd.randbytes(n))
    a = snap(ds, "a", dev)
    assert cbt.snapshot_taken(a, state) == base

    # --- A -> B: every kind of change, and non-changes
    changes = [
        ("new data, never written, crossing 64K boundaries", 20 * MiB + 8 * K, 100 * K, True),
        ("overwrite across the 512K boundary", 512 * K - 4 * K, 8 * K, True),
        ("4K of zeros inside data (block rewritten)", 100 * K, 4 * K, True),
        ("full-block zeros over data (becomes a hole)", 4 * MiB, K64, True),
        ("zeros over never-written space (stays a hole)", 30 * MiB, K64, False),
    ]
    for what, off, n, _ in changes:
        zeros = "zeros" in what
        dev.write(off, bytes(n) if zeros else rnd.randbytes(n))
    dev.discard(10 * MiB + 16 * K, 32 * K)              # over data: changed
    dev.discard(40 * MiB, MiB)                          # never written: no change
    b = snap(ds, "b", dev)

    want = set()
    for what, off, n, changed in changes:
        if changed:
            want |= blocks_of([(off, n)])
    want |= blocks_of([(10 * MiB + 16 * K, 32 * K)])
    stats = {}
    got = bits(cbt.list_changed_blocks(a, b, 0, -1, state, stats))
    assert got == want, (sorted(got - want), sorted(want - got))
    # ... and the snapshots' contents agree: exactly these 64K blocks differ
    ha, hb = block_hashes(a, size), block_hashes(b, size)
    assert set(i for i in range(len(ha)) if ha[i] != hb[i]) == want
    assert not stats["fast_path"] and stats["sends"] == 1

    # the trap is real: the stream frees never-written ranges and the tail
    writes, frees, _ = cbt._send(a, b)
    naive = blocks_of(cbt.to_extents(cbt.union(writes, frees)))
    assert 40 * MiB // K64 in naive and (size - 1) // K64 in naive
    assert len(naive) > 10 * len(want)

    # window and length: bit i = block offset/64K + i
    win = cbt.list_changed_blocks(a, b, 16 * MiB, 8 * MiB, state)
    assert set(cbt.bitmap_blocks(win["bitmap"])) == \
        set(x - 16 * MiB // K64 for x in want if 256 <= x < 384)

    # allocation map of B against its content: holes read as zeros
    alloc_b = cbt.to_ranges(cbt.allocation_map(b, state))
    zero = hashlib.sha1(bytes(K64)).digest()
    for i, h in enumerate(hb):
        if h != zero:
            assert cbt.intersect(alloc_b, [(i * K64, (i + 1) * K64)]), "data outside the map"
    ext = cbt.allocation_extents(b, 0, size, state)
    assert ext[0] == (0, 1 * MiB, 0) and sum(n for _, n, _ in ext) == size
    assert (40 * MiB // K64) not in blocks_of([(o, n) for o, n, f in ext if f == 0])
    dirty = cbt.dirty_extents(a, b, 0, size, state)
    assert blocks_of([(o, n) for o, n, f in dirty if f == 1]) == want

    # fast path: nothing written since B
    c = snap(ds, "c", dev)
    stats = {}
    assert bits(cbt.list_changed_blocks(b, c, 0, -1, state, stats)) == set()
    assert stats["fast_path"] and stats.get("stream_bytes", 0) == 0

    # --- data_destroy: snapshot -> bookmark -> snapshot, from the in-pool maps
    assert cbt.data_destroy(a, state) == ds + "#a"
    assert cbt.data_destroy(a, state) == ds + "#a"     # idempotent
    assert subprocess.run(["zfs", "list", a], stderr=subprocess.DEVNULL).returncode != 0
    fresh = str(tmp_path / "fresh")                     # no file cache: properties only
    assert bits(cbt.list_changed_blocks(ds + "#a", b, 0, -1, fresh)) == want
    dev.write(33 * MiB, rnd.randbytes(16 * K))          # one more change after C
    dev.write(0, bytes(K64))                            # zeros over data
    d = snap(ds, "d", dev)
    cbt.data_destroy(b, state)
    hd = block_hashes(d, size)
    want_bd = set(i for i in range(len(hb)) if hb[i] != hd[i])
    assert want_bd == {33 * MiB // K64, 0}
    assert bits(cbt.list_changed_blocks(ds + "#b", d, 0, -1, str(tmp_path / "f2"))) == want_bd
    want_ad = set(i for i in range(len(ha)) if ha[i] != hd[i])
    assert bits(cbt.list_changed_blocks(ds + "#a", d, 0, -1, str(tmp_path / "f3"))) == want_ad

    # --- a clone starts from its origin's map
    clone = zpool + "/clone"
    run("zfs", "clone", "-o", "snapdev=visible", d, clone)
    cdev = Dev(wait_for_path("/dev/zvol/" + clone))
    cdev.write(5 * MiB, rnd.randbytes(K64))
    cdev.write(0, rnd.randbytes(4 * K))
    cdev.discard(16 * MiB - 16 * K, 32 * K)
    e = snap(clone, "e", cdev)
    he = block_hashes(e, size)
    want_de = set(i for i in range(len(hd)) if hd[i] != he[i])
    assert bits(cbt.list_changed_blocks(d, e, 0, -1, state)) == want_de
    cdev.close()
    dev.close()

    # --- disable removes the anchor and every map, leaves data_destroy bookmarks
    cbt.disable(ds, state)
    cbt.disable(ds, state)                              # idempotent
    assert not cbt.is_enabled(ds)
    left = run("zfs", "get", "-H", "-s", "local", "-o", "property", "all", ds).stdout
    assert "zfs-ng-cbt:" not in left
    names = run("zfs", "list", "-H", "-o", "name", "-t", "bookmark", "-d", "1", ds).stdout.split()
    assert sorted(names) == [ds + "#a", ds + "#b"]
    # without maps an interval from a bookmark is still safe (FREEs count as changed)
    assert bits(cbt.list_changed_blocks(ds + "#b", d, 0, -1, None)) >= want_bd


def test_enable_on_a_volume_with_data_and_live_interval(zpool, tmp_path):
    ds, path = make_vol(zpool, "w", 32 * MiB, bs="8K")
    dev = Dev(path)
    dev.write(MiB, os.urandom(3 * K64))
    dev.sync()
    stats = {}
    cbt.enable(ds, None, stats)                         # full header scan, once
    assert stats["sends"] == 1 and stats["payload_bytes"] >= 3 * K64
    a = snap(ds, "a", dev)
    dev.write(MiB + K64, bytes(K64))                    # zeros over data
    dev.write(2 * MiB, bytes(K64))                      # zeros over nothing
    dev.write(8 * MiB + 8 * K, os.urandom(8 * K))
    dev.sync()
    live = cbt.changed_extents(a, ds)                   # temporary snapshot
    assert blocks_of(live) == {MiB // K64 + 1, 8 * MiB // K64}
    assert run("zfs", "list", "-H", "-t", "snapshot", "-o", "name", "-d", "1", ds).stdout.split() \
        == [a]
    b = snap(ds, "b", dev)

    # real streams pass fletcher-4 verification; a flipped payload byte fails it
    for argv in (["-i", a, b], [b], ["-i", ds + "#" + cbt.ANCHOR, b]):
        data = run_bytes("zfs", "send", "-c", "-e", "-L", *argv)
        recs, p = parse(data, verify_checksum=True)
        assert recs[0].type == ss.DRR_BEGIN and recs[-1].type == ss.DRR_END
        assert recs[0].info["toname"] == b and p.bytes_seen == len(data)
        w = next(i for i, r in enumerate(recs) if r.type == ss.DRR_WRITE)
        pos = sum(312 + r.payload_size for r in recs[:w]) + 312 + 10
        bad = bytearray(data)
        bad[pos] ^= 0x40
        with pytest.raises(ss.StreamError, match="checksum"):
            parse(bytes(bad), verify_checksum=True)
    # a compound stream (zfs send -R): XDR nvlist header, substreams, final END
    data = run_bytes("zfs", "send", "-R", b)
    recs, p = parse(data, verify_checksum=True)
    assert recs[0].info["hdrtype"] == ss.DMU_COMPOUNDSTREAM and p.done
    nvl = ss.decode_nvlist(recs[0].info["payload"])
    assert nvl["tosnap"] == "b" and "fss" in nvl
    assert [r.info["toname"] for r in recs if r.type == ss.DRR_BEGIN][1:] == [a, b]

    # gc drops the maps of snapshots that are gone, keeps the anchor's
    cbt.snapshot_taken(b)
    run("zfs", "destroy", b)
    assert cbt.gc(ds) == 1
    assert cbt.gc(ds) == 0
    dev.close()
    # the maps travel with the pool: export, import, no state dir
    run("zpool", "export", zpool)
    run("zpool", "import", "-d", TEST_DIR, zpool)
    assert cbt.is_enabled(ds)
    assert cbt.allocation_map(ds + "#" + cbt.ANCHOR) == [(MiB, 3 * K64)]
    stats = {}
    assert bits(cbt.list_changed_blocks(ds + "#" + cbt.ANCHOR, a, 0, -1, None, stats)) == set()
    assert stats["fast_path"] and stats["sends"] == 0      # written#bookmark == 0
    # clean errors, no traceback material: missing ends, wrong order, other volumes
    for args, msg in [((ds + "@nope", a), "does not exist|cannot open"),
                      ((a, ds + "#" + cbt.ANCHOR), "must be a snapshot"),
                      ((ds + "#" + cbt.ANCHOR, a + "x"), "does not exist|cannot open")]:
        with pytest.raises(cbt.CbtError, match=msg):
            cbt.list_changed_blocks(*args)
    other, _p = make_vol(zpool, "other", 8 * MiB)
    run("zfs", "snapshot", other + "@o")
    with pytest.raises(cbt.CbtError):
        cbt.list_changed_blocks(a, other + "@o")
    same = cbt.list_changed_blocks(a, a)                # one point in time: no change
    assert bits(same) == set() and len(base64.b64decode(same["bitmap"])) == 32 * MiB // (2 * MiB) * 4


def run_bytes(*argv):
    return subprocess.run(list(argv), stdout=subprocess.PIPE, check=True).stdout


def parse(data, **kw):
    p = ss.StreamParser(**kw)
    recs = p.feed(data)
    p.close()
    return recs, p


def test_one_percent_of_a_sparse_1g_volume_reads_only_the_changes(zpool):
    size = 1 << 30
    ds, path = make_vol(zpool, "big", size, bs="16K")
    cbt.enable(ds)
    dev = Dev(path)
    rnd = random.Random(7)
    nblocks = size // K64
    for blk in rnd.sample(range(nblocks), nblocks // 50):          # 2% base data
        dev.write(blk * K64, os.urandom(K64))
    a = snap(ds, "a", dev)
    cbt.snapshot_taken(a)
    changed = set(rnd.sample(range(nblocks), nblocks // 100))      # 1% changed
    for blk in changed:
        dev.write(blk * K64, os.urandom(K64))
    b = snap(ds, "b", dev)
    estimate = cbt.send_estimate(a, b)
    stats = {}
    got = bits(cbt.list_changed_blocks(a, b, 0, -1, None, stats))
    assert got == changed
    changed_bytes = len(changed) * K64
    print("1 GiB, 1%% changed: %d bytes changed, %d through the pipe (%d payload, %d records), "
          "zfs send -nvP %d" % (changed_bytes, stats["stream_bytes"], stats["payload_bytes"],
                                stats["records"], estimate))
    assert changed_bytes <= stats["payload_bytes"] <= changed_bytes * 1.05
    assert stats["stream_bytes"] <= changed_bytes * 1.10 + MiB
    assert abs(stats["stream_bytes"] - estimate) <= 0.10 * estimate + MiB
    dev.close()


@pytest.mark.parametrize("bad", ["p/v@a;x", "-o", "p/v @a"])
def test_bad_names_never_reach_zfs(bad):
    with pytest.raises(cbt.CbtError, match="invalid dataset name"):
        cbt.list_changed_blocks(bad, "p/v@b")
