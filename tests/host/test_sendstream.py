"""plugins.volume.sendstream on streams built byte by byte (sendstream_records.py:
layouts from openzfs include/sys/zfs_ioctl.h); real `zfs send` streams are in
tests/e2e."""

import io
import struct

import pytest

from plugins.volume import sendstream as ss
from sendstream_records import (FROMGUID, MAGIC, TOGUID, begin, byref, embedded, end, free,
                                freeobjects, obj, object_range, rec, redact, spill, stream,
                                write)


def every_type(e):
    return [begin(e), obj(e), freeobjects(e, 3, 100), write(e, 0, 16384),
            write(e, 16384, 16384, comp=15, csize=4096), free(e, 32768, 65536),
            byref(e, 98304, 16384), spill(e, 512), spill(e, 1024, csize=200),
            embedded(e, 131072, 16384, 45), object_range(e, 0, 32), redact(e, 147456, 16384),
            free(e, 163840, ss.UINT64_MAX), end(e)]


def parse_all(data, chunk=None, **kw):
    p = ss.StreamParser(**kw)
    out = []
    if chunk is None:
        out += p.feed(data)
    else:
        for i in range(0, len(data), chunk):
            out += p.feed(data[i:i + chunk])
    p.close()
    return out, p


@pytest.mark.parametrize("e", ["<", ">"])
def test_every_record_type_and_payload_sizes(e):
    data = stream(e, every_type(e))
    recs, p = parse_all(data)
    assert [r.type for r in recs] == [0, 1, 2, 3, 3, 4, 6, 7, 7, 8, 9, 10, 4, 5]
    b = recs[0]
    assert b.info["magic"] == MAGIC and b.info["toguid"] == TOGUID
    assert b.info["fromguid"] == FROMGUID and b.info["toname"] == "p/v@b"
    assert b.info["type"] == 3 and b.info["hdrtype"] == 1
    assert recs[1].object == 1 and recs[1].payload_size == 8 and recs[1].info["blksz"] == 16384
    assert recs[1].info["maxblkid"] == 99
    assert (recs[2].offset, recs[2].length) == (3, 100)
    assert (recs[3].offset, recs[3].length, recs[3].payload_size) == (0, 16384, 16384)
    assert (recs[4].length, recs[4].payload_size) == (16384, 4096)
    assert recs[4].info["compression"] == 15
    assert (recs[5].offset, recs[5].length) == (32768, 65536)
    assert (recs[6].offset, recs[6].length, recs[6].info["refguid"]) == (98304, 16384, FROMGUID)
    assert [recs[7].payload_size, recs[8].payload_size] == [512, 200]
    assert (recs[9].offset, recs[9].length, recs[9].payload_size) == (131072, 16384, 48)
    assert (recs[10].offset, recs[10].length) == (0, 32)
    assert (recs[11].offset, recs[11].length) == (147456, 16384)
    assert recs[12].length == ss.UINT64_MAX
    assert recs[13].info["toguid"] == TOGUID
    assert p.done and p.bytes_seen == len(data)
    assert p.byteswapped == (e == ">")
    assert p.payload_bytes == 8 + 16384 + 4096 + 512 + 200 + 48


@pytest.mark.parametrize("chunk", [1, 7, 311, 312, 313, 4096])
def test_any_chunking_gives_the_same_records(chunk):
    data = stream("<", every_type("<"))
    assert parse_all(data, chunk)[0] == parse_all(data)[0]


def test_iter_records_reads_through_one_buffer():
    data = stream("<", every_type("<"))
    got = list(ss.iter_records(io.BytesIO(data), bufsize=1000))
    assert got == parse_all(data)[0]


def test_payload_is_never_drr_payloadlen():
    # a WRITE that lies in drr_payloadlen: sizes come from the type's fields
    w = write("<", 0, 16384)
    struct.pack_into("<I", w[0], 4, 999999)
    recs, _ = parse_all(stream("<", [begin("<"), w, end("<")]))
    assert recs[1].payload_size == 16384


@pytest.mark.parametrize("e", ["<", ">"])
def test_checksum_verification(e):
    good = stream(e, every_type(e), checksum=True)
    recs, _ = parse_all(good, chunk=1000, verify_checksum=True)
    assert len(recs) == 14
    bad = bytearray(good)
    bad[312 * 3 + 8 + 100] ^= 1          # flip a payload byte of the first WRITE
    with pytest.raises(ss.StreamError, match="checksum"):
        parse_all(bytes(bad), verify_checksum=True)
    # without verification the same stream parses (headers only)
    assert len(parse_all(bytes(bad))[0]) == 14


def test_begin_payload_native_nvlist():
    # nvlist_pack(NV_ENCODE_NATIVE), little endian: resume_object, resume_offset
    def pair(name, dtype, nelem, value):
        nb = name.encode() + b"\0"
        name_sz = len(nb)
        nb += b"\0" * (-len(nb) % 8)
        body = nb + value
        body += b"\0" * (-len(body) % 8)
        return struct.pack("<ihhii", 16 + len(body), name_sz, 0, nelem, dtype) + body
    nvl = (b"\x00\x01\x00\x00" + struct.pack("<iIQIi", 0, 1, 0, 0, 0)
           + pair("resume_object", 8, 1, struct.pack("<Q", 42))
           + pair("resume_offset", 8, 1, struct.pack("<Q", 1 << 20))
           + pair("redact_snaps", 16, 2, struct.pack("<QQ", 7, 8))
           + pair("name", 9, 1, b"p/v@a\0")
           + struct.pack("<i", 0))
    recs, _ = parse_all(stream("<", [begin("<", nvl), end("<")]), chunk=5)
    assert recs[0].info["payload"] == nvl
    assert ss.decode_nvlist(recs[0].info["payload"]) == {
        "resume_object": 42, "resume_offset": 1 << 20, "redact_snaps": [7, 8], "name": "p/v@a"}


def test_xdr_nvlist_skips_nested():
    def xstr(s):
        b = s.encode()
        return struct.pack(">I", len(b)) + b + b"\0" * (-len(b) % 4)

    def pair(name, dtype, nelem, value):
        body = xstr(name) + struct.pack(">ii", dtype, nelem) + value
        return struct.pack(">ii", 8 + len(body), 0) + body
    nested = struct.pack(">iI", 0, 1) + pair("x", 8, 1, struct.pack(">Q", 1)) + b"\0" * 8
    nvl = (b"\x01\x01\x00\x00" + struct.pack(">iI", 0, 1)
           + pair("fromsnap", 9, 1, xstr("a"))
           + pair("fss", 19, 1, nested)
           + pair("guid", 8, 1, struct.pack(">Q", TOGUID))
           + pair("flag", 5, 1, struct.pack(">i", -3))
           + b"\0" * 8)
    assert ss.decode_nvlist(nvl) == {"fromsnap": "a", "fss": None, "guid": TOGUID, "flag": -3}


def test_compound_stream():
    e = "<"
    parts = [begin(e, b"\x01\x01\x00\x00" + struct.pack(">iI", 0, 1) + b"\0" * 8, hdrtype=2),
             end(e), begin(e), write(e, 0, 512), end(e), begin(e), free(e, 0, 512), end(e),
             end(e, toguid=0)]
    recs, p = parse_all(stream(e, parts), chunk=100)
    assert [r.type for r in recs] == [0, 5, 0, 3, 5, 0, 4, 5, 5]
    assert p.done


@pytest.mark.parametrize("cut", [0, 1, 311, 312, 400, 312 * 2 + 100, -1])
def test_truncated_streams_fail_cleanly(cut):
    data = stream("<", every_type("<"))
    if cut == -1:
        cut = len(data) - 312             # everything but END
    p = ss.StreamParser()
    p.feed(data[:cut])
    with pytest.raises(ss.StreamError, match="empty|truncated"):
        p.close()


@pytest.mark.parametrize("garbage", [
    b"\0" * 312,                                    # no magic
    b"hello world" * 100,
    bytes(range(256)) * 2,
])
def test_garbage_is_refused(garbage):
    with pytest.raises(ss.StreamError, match="not a ZFS send stream"):
        ss.StreamParser().feed(garbage)


def test_bad_records_are_refused():
    e = "<"
    bad_type = rec(e, 77, b"")
    with pytest.raises(ss.StreamError, match="unknown record type 77"):
        parse_all(stream(e, [begin(e), [bad_type], end(e)]))
    with pytest.raises(ss.StreamError, match="trailing"):
        parse_all(stream(e, [begin(e), end(e)]) + stream(e, [write(e, 0, 512)]))
    with pytest.raises(ss.StreamError, match="outside BEGIN"):     # between substreams
        parse_all(stream(e, [begin(e, hdrtype=2), end(e), write(e, 0, 512)]))
    with pytest.raises(ss.StreamError, match="BEGIN"):
        parse_all(stream(e, [begin(e), begin(e), end(e)]))
    with pytest.raises(ss.StreamError, match="trailing"):
        parse_all(stream(e, [begin(e), end(e)]) + b"x")
    b = begin(e)
    struct.pack_into(e + "Q", b[0], 8, 0x2F5BACBAD)     # magic off by one after detection
    with pytest.raises(ss.StreamError):
        parse_all(stream(e, [b, end(e)]))


@pytest.mark.parametrize("make", [
    lambda e: write(e, 0, 1 << 40, pl=False),                  # 1 TiB block
    lambda e: write(e, 0, 16384, comp=2, csize=(1 << 64) - 1, pl=False),
    lambda e: spill(e, 1 << 62, pl=False),
    lambda e: embedded(e, 0, 16384, (1 << 32) - 1, pl=False),
    lambda e: obj(e, bonuslen=(1 << 32) - 1, pl=False),
    lambda e: obj(e, raw_bonuslen=1 << 30, pl=False),
    lambda e: [begin(e)[0]],
])
def test_huge_declared_lengths_are_refused_at_the_header(make):
    e = "<"
    parts = make(e)
    if parts[0][0] == ss.DRR_BEGIN:
        struct.pack_into(e + "I", parts[0], 4, 0xFFFFFFFF)
        data = stream(e, [parts])
    else:
        data = stream(e, [begin(e), parts])
    p = ss.StreamParser()
    with pytest.raises(ss.StreamError):
        p.feed(data)
    assert p.payload_bytes == 0


def test_memory_stays_bounded_on_a_big_stream():
    # 2000 WRITEs of 128 KiB (250 MiB declared) fed in 1 MiB pieces: nothing kept
    e = "<"
    one = stream(e, [write(e, 0, 131072)])
    p = ss.StreamParser()
    p.feed(stream(e, [begin(e)]))
    n = 0
    for i in range(2000):
        n += len(p.feed(one))
    p.feed(stream(e, [end(e)]))
    p.close()
    assert n == 2000 and p.payload_bytes == 2000 * 131072
    assert len(p._hdr) == 0 and p._payload is None
