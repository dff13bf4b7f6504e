"""plugins.volume.cbt pure parts: ranges, the FREE rule on synthetic streams,
bitmap encoding (per smapiv3.md / nbd.md), map encodings, NBD extent windows.
The zfs side runs against real ZFS in tests/e2e/test_cbt.py."""

import base64

import pytest
from hypothesis import given, settings, strategies as st

from plugins.volume import cbt
from plugins.volume import sendstream as ss

from sendstream_records import begin, embedded, end, free, obj, stream, write

K64 = 65536
MiB = 1 << 20


def as_set(ranges):
    out = set()
    for s, e in ranges:
        out.update(range(s, e))
    return out


ranges_st = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)).map(
    lambda t: (t[0], t[0] + t[1])), max_size=12)


@settings(max_examples=300, deadline=None)
@given(ranges_st, ranges_st)
def test_range_algebra_matches_sets(a, b):
    na, nb = cbt.normalize(a), cbt.normalize(b)
    for r in (na, nb):
        assert all(s < e for s, e in r)
        assert all(r[i][1] < r[i + 1][0] for i in range(len(r) - 1))   # disjoint, not touching
    assert as_set(na) == as_set(a)
    assert as_set(cbt.union(na, nb)) == as_set(a) | as_set(b)
    assert as_set(cbt.intersect(na, nb)) == as_set(a) & as_set(b)
    assert as_set(cbt.subtract(na, nb)) == as_set(a) - as_set(b)
    assert cbt.subtract(na, nb) == cbt.normalize(cbt.subtract(na, nb))


def bits_of(result):
    assert result["granularity"] == K64
    raw = base64.b64decode(result["bitmap"])
    assert len(raw) % 4 == 0
    return raw


def test_bitmap_bit_order_msb_first():
    raw = bits_of(cbt.bitmap([(0, 1)], 64 * K64))
    assert raw[0] == 0x80 and not any(raw[1:])
    raw = bits_of(cbt.bitmap([(7 * K64, K64)], 64 * K64))
    assert raw[0] == 0x01
    raw = bits_of(cbt.bitmap([(9 * K64 + 5, 1)], 64 * K64))
    assert raw[1] == 0x40
    assert cbt.bitmap_blocks(cbt.bitmap([(9 * K64, 1)], 64 * K64)["bitmap"]) == [9]


@pytest.mark.parametrize("size,nbytes", [
    (1, 4), (K64, 4), (K64 + 1, 4), (32 * K64, 4), (32 * K64 + 1, 8),
    (2 * MiB, 4), (2 * MiB + 512, 8), (1 << 30, 2048), (10 << 30, 20480), (0, 0)])
def test_bitmap_length_is_ceil_size_over_2mib_times_4(size, nbytes):
    raw = bits_of(cbt.bitmap([], size))
    assert len(raw) == nbytes == -(-size // (2 * MiB)) * 4
    assert not any(raw)


def test_bitmap_crossing_boundaries_and_partial_last_block():
    size = 10 * K64 + 4096                       # not a multiple of 64 KiB: 11 bits
    ext = [(K64 - 512, 1024),                    # crosses the 0/1 boundary
           (10 * K64, 4096)]                     # the partial last block
    assert cbt.bitmap_blocks(cbt.bitmap(ext, size)["bitmap"]) == [0, 1, 10]
    # extents past the end are clipped, not encoded
    assert cbt.bitmap_blocks(cbt.bitmap([(size, K64 * 4)], size)["bitmap"]) == []


def test_bitmap_long_runs_fill_whole_bytes():
    assert cbt.bitmap_blocks(cbt.bitmap([(3 * K64, 100 * K64)], 1 << 30)["bitmap"]) == \
        list(range(3, 103))


def test_bitmap_offset_length_window():
    ext = [(0, K64), (5 * K64, 2 * K64), (40 * K64, 1)]
    size = 64 * K64
    # window [4*64K, 8*64K): bit i = block 4 + i
    assert cbt.bitmap_blocks(cbt.bitmap(ext, size, 4 * K64, 4 * K64)["bitmap"]) == [1, 2]
    raw = bits_of(cbt.bitmap(ext, size, 4 * K64, 4 * K64))
    assert len(raw) == 4
    # length < 0: to the end of the volume
    assert cbt.bitmap_blocks(cbt.bitmap(ext, size, 32 * K64, -1)["bitmap"]) == [8]
    assert cbt.bitmap(ext, size, 0, -1) == cbt.bitmap(ext, size)
    # a window past the end is empty; a window beyond volsize is clipped to it
    assert bits_of(cbt.bitmap(ext, size, 2 * size, 10)) == b""
    assert len(bits_of(cbt.bitmap(ext, size, 0, 10 * size))) == 8
    with pytest.raises(ValueError):
        cbt.bitmap(ext, size, -1, 10)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5 * MiB), st.integers(1, 300 * 1024)), max_size=8),
       st.integers(1, 5 * MiB))
def test_bitmap_matches_a_per_block_model(ext, size):
    blocks = cbt.bitmap_blocks(cbt.bitmap(ext, size)["bitmap"])
    clipped = [(o, min(o + n, size)) for o, n in ext if o < size]
    want = sorted(set(b for o, e in clipped for b in range(o // K64, -(-e // K64))))
    assert blocks == want


def records(parts):
    p = ss.StreamParser()
    out = p.feed(stream("<", parts))
    p.close()
    return out


def test_free_is_changed_only_where_the_base_had_data():
    """The trap of zfs.md section 4: an incremental stream frees never-written
    ranges and the tail to UINT64_MAX; only FREE n allocated(A) changed."""
    e = "<"
    vol = 1 << 30
    alloc_a = [(0, MiB)]                                # 1 MiB of data before A
    recs = records([begin(e), obj(e), free(e, 0, K64),  # zeroed/discarded, had data
                    free(e, MiB, 7 * MiB),              # never written: re-sent hole
                    write(e, 8 * MiB, K64),             # new data
                    embedded(e, 9 * MiB, 16384, 40),    # tiny compressed block
                    write(e, 0, K64, objnum=2),         # other objects are ignored
                    free(e, 0, ss.UINT64_MAX, objnum=2),
                    free(e, 9 * MiB + 16384, ss.UINT64_MAX),   # past the last block
                    end(e)])
    writes, frees, info = cbt.scan_records(recs, vol)
    assert writes == [(8 * MiB, 8 * MiB + K64), (9 * MiB, 9 * MiB + 16384)]
    assert frees == [(0, K64), (MiB, 8 * MiB), (9 * MiB + 16384, vol)]   # clipped to volsize
    assert info["toguid"]
    changed, alloc_b = cbt.apply_interval(alloc_a, writes, frees)
    assert changed == [(0, K64), (8 * MiB, 8 * MiB + K64), (9 * MiB, 9 * MiB + 16384)]
    assert alloc_b == [(K64, MiB), (8 * MiB, 8 * MiB + K64), (9 * MiB, 9 * MiB + 16384)]
    # the naive reading (every FREE changed) would claim ~1 GiB
    naive, unknown = cbt.apply_interval(None, writes, frees)
    assert cbt.total(naive) > 1000 * MiB and unknown is None
    assert cbt.total(changed) == K64 + K64 + 16384


def test_adjacent_writes_coalesce():
    e = "<"
    recs = records([begin(e)] + [write(e, i * 16384, 16384, comp=15, csize=100)
                                 for i in range(64)] + [end(e)])
    writes, frees, _ = cbt.scan_records(recs, 1 << 30)
    assert writes == [(0, MiB)] and frees == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("wf"), st.integers(0, 63), st.integers(1, 8)),
                max_size=20),
       st.lists(st.tuples(st.integers(0, 63), st.integers(1, 8)), max_size=10))
def test_interval_rule_matches_a_block_model(ops, base):
    """Model: per block (512 B here, to keep streams small), data or hole in A,
    ops give B; changed = blocks whose state or content changed (a write
    always changes content)."""
    bs = 512
    vol = 64 * bs
    a = set(b for o, n in base for b in range(o, min(o + n, 64)))
    alloc_a = cbt.normalize([(b * bs, (b + 1) * bs) for b in a])
    # a stream never frees and writes the same block: the last op wins
    last = {}
    for kind, o, n in ops:
        for b in range(o, min(o + n, 64)):
            last[b] = kind
    parts = [begin("<")]
    for b in sorted(last):
        parts.append(write("<", b * bs, bs) if last[b] == "w" else free("<", b * bs, bs))
    parts.append(end("<"))
    writes, frees, _ = cbt.scan_records(records(parts), vol)
    changed, alloc_b = cbt.apply_interval(alloc_a, writes, frees)
    want_b = (a - set(b for b, k in last.items() if k == "f")) | \
        set(b for b, k in last.items() if k == "w")
    want_changed = set(b for b, k in last.items() if k == "w" or b in a)
    assert as_set(alloc_b) == as_set([(b * bs, (b + 1) * bs) for b in want_b])
    assert as_set(changed) == as_set([(b * bs, (b + 1) * bs) for b in want_changed])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 25), st.integers(1, 1 << 20)), max_size=50))
def test_map_roundtrip_and_property_chunks(raw):
    ranges = cbt.normalize([(o * 512, (o + n) * 512) for o, n in raw])
    assert cbt.decode_map(cbt.encode_map(ranges)) == ranges
    props = cbt.map_to_props(1234567890123, ranges)
    assert all(len(v) <= cbt.CHUNK for v in props.values())
    assert all(k.startswith("zfs-ng-cbt:map.1234567890123.") for k in props)
    assert cbt.map_from_props(1234567890123, props) == ranges
    assert cbt.map_from_props(42, props) is None


def test_big_map_spans_many_chunks_and_detects_damage():
    import random
    rnd = random.Random(5)
    ranges = cbt.normalize((b * 16384, (b + 1) * 16384)
                           for b in rnd.sample(range(1 << 20), 40000))
    props = cbt.map_to_props(7, ranges)
    assert len(props) > 10
    assert cbt.map_from_props(7, props) == ranges
    missing = dict(props)
    missing.pop("zfs-ng-cbt:map.7.3")
    assert cbt.map_from_props(7, missing) is None
    damaged = dict(props)
    damaged["zfs-ng-cbt:map.7.2"] = "A" + damaged["zfs-ng-cbt:map.7.2"][1:]
    assert cbt.map_from_props(7, damaged) is None
    with pytest.raises(cbt.CbtError):
        cbt.decode_map(b"not zlib")


def test_allocation_and_dirty_windows():
    alloc = [(16384, 16384), (MiB, MiB)]            # (offset, length)
    vol = 4 * MiB
    assert cbt.allocation_window(alloc, vol, 0, vol) == [
        (0, 16384, 3), (16384, 16384, 0), (32768, MiB - 32768, 3), (MiB, MiB, 0),
        (2 * MiB, 2 * MiB, 3)]
    assert cbt.allocation_window(alloc, vol, 20000, 100, thick=True) == [(20000, 100, 0)]
    assert cbt.allocation_window(alloc, vol, 3 * MiB, 10 * MiB, thick=True) == [(3 * MiB, MiB, 2)]
    # dirty extents round out to the 64 KiB bitmap blocks
    assert cbt.dirty_window([(K64 + 4096, 4096)], vol, 0, 4 * K64) \
        == [(0, K64, 0), (K64, K64, 1), (2 * K64, 2 * K64, 0)]
    assert cbt.dirty_window([], vol, 100, 50) == [(100, 50, 0)]
    for ext in (cbt.allocation_window(alloc, vol, 5000, 3 * MiB),
                cbt.dirty_window(alloc, vol, 5000, 3 * MiB)):
        pos = 5000
        for o, n, _f in ext:                       # contiguous, from offset on
            assert o == pos and n > 0
            pos += n
        assert pos == 5000 + 3 * MiB


def test_names_are_validated_before_zfs():
    for bad in ["-rf", "p/v@", "p//v", "p/v@a@b", "p/v;rm", "", "p/v@a b", 5]:
        with pytest.raises(cbt.CbtError, match="invalid dataset name"):
            cbt._check_name(bad)
    for good in ["p/v", "p/zfs-ng/3f2a@s1", "p/v#zfsng-cbt-anchor", "tank/a.b:c_d"]:
        assert cbt._check_name(good) == good
