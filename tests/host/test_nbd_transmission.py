"""nbd_server.transmission and nbd_server.extents byte for byte (sans-IO) on
a real Backend over a sparse file."""

import os
import struct

import pytest

from blockio.backend import Backend
from nbd_server import constants as C
from nbd_server.exports import Export
from nbd_server.extents import DirtyBitmap, ExtentMap, default_allocation
from nbd_server.handshake import Ready
from nbd_server.transmission import (ProtocolError, RequestParser, Transmission, nbd_errno,
                                     normalize)

MiB = 1 << 20
SIZE = 4 * MiB


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(SIZE)
    return str(p)


def conn(image, structured=True, readonly=False, contexts=None):
    backend = Backend(image, readonly=readonly)
    export = Export("disk", image, readonly=readonly)
    if contexts is None:
        contexts = [(1, C.BASE_ALLOCATION, default_allocation)]
    return Transmission(Ready(export, backend, backend.size, 0, structured, contexts))


def req(type_, offset=0, length=0, flags=0, cookie=0x1122334455667788, data=b""):
    return struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, type_, cookie, offset, length) + data


def run(tr, raw):
    p = RequestParser()
    p.receive_data(raw)
    out = []
    while True:
        r = p.next_request()
        if r is None:
            return b"".join(bytes(b) for reply in out for b in reply)
        out.append(tr.handle(r))


def simple(error, cookie=0x1122334455667788):
    return struct.pack(">IIQ", C.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(type_, payload, flags=C.REPLY_FLAG_DONE, cookie=0x1122334455667788):
    return struct.pack(">IHHQI", C.STRUCTURED_REPLY_MAGIC, flags, type_, cookie,
                       len(payload)) + payload


def error_chunk(error, message):
    m = message.encode()
    return chunk(C.REPLY_TYPE_ERROR, struct.pack(">IH", error, len(m)) + m)


def test_write_then_read_simple_replies(image):
    tr = conn(image, structured=False)
    data = os.urandom(8192)
    assert run(tr, req(C.CMD_WRITE, 4096, 8192, C.CMD_FLAG_FUA, data=data)) == simple(0)
    assert run(tr, req(C.CMD_READ, 4096, 8192)) == simple(0) + data
    assert run(tr, req(C.CMD_FLUSH)) == simple(0)
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(8192) == data


def test_structured_read_is_one_offset_data_chunk(image):
    tr = conn(image)
    run(tr, req(C.CMD_WRITE, MiB, 5, data=b"hello"))
    out = run(tr, req(C.CMD_READ, MiB, 5, C.CMD_FLAG_DF))
    assert out == chunk(C.REPLY_TYPE_OFFSET_DATA, struct.pack(">Q", MiB) + b"hello")


def test_empty_reads(image):
    assert run(conn(image), req(C.CMD_READ, 512, 0)) == chunk(C.REPLY_TYPE_NONE, b"")
    assert run(conn(image, structured=False), req(C.CMD_READ, 512, 0)) == simple(0)


def test_errors(image):
    tr = conn(image)
    assert run(tr, req(C.CMD_READ, SIZE - 4096, 8192)) == error_chunk(
        C.EINVAL, "request beyond the end of the export")
    assert run(tr, req(C.CMD_WRITE, SIZE, 1, data=b"x")).startswith(
        chunk(C.REPLY_TYPE_ERROR, b"")[:8])
    assert run(tr, req(42)) == error_chunk(C.EINVAL, "unsupported command 42")
    assert run(tr, req(C.CMD_CACHE, 0, 4096)) == error_chunk(C.EINVAL, "unsupported command 5")
    assert run(tr, req(C.CMD_READ, 0, 512, C.CMD_FLAG_NO_HOLE)) == error_chunk(
        C.EINVAL, "invalid flags 0x2 for READ")
    assert run(tr, req(C.CMD_WRITE_ZEROES, 0, 512, C.CMD_FLAG_FAST_ZERO)) == error_chunk(
        C.EINVAL, "invalid flags 0x10 for WRITE_ZEROES")
    assert run(tr, req(C.CMD_READ, 0, 33 * MiB)) == error_chunk(
        C.EINVAL, "request beyond the end of the export")
    # offset + length overflowing 64 bits is still just "beyond the end"
    assert run(tr, req(C.CMD_TRIM, (1 << 64) - 512, 1024)) == error_chunk(
        C.EINVAL, "request beyond the end of the export")


def test_simple_reply_errors_carry_only_the_errno(image):
    tr = conn(image, structured=False)
    assert run(tr, req(C.CMD_READ, SIZE, 512)) == simple(C.EINVAL)
    assert run(tr, req(C.CMD_BLOCK_STATUS, 0, 512)) == simple(C.EINVAL)   # needs structured


def test_read_only_refuses_writes_with_eperm(image):
    tr = conn(image, structured=False, readonly=True)
    assert run(tr, req(C.CMD_WRITE, 0, 3, data=b"abc")) == simple(C.EPERM)
    assert run(tr, req(C.CMD_TRIM, 0, 4096)) == simple(C.EPERM)
    assert run(tr, req(C.CMD_WRITE_ZEROES, 0, 4096)) == simple(C.EPERM)
    assert run(tr, req(C.CMD_FLUSH)) == simple(0)
    assert run(tr, req(C.CMD_READ, 0, 3)) == simple(0) + bytes(3)


def test_oversized_write_payload_is_dropped_and_refused(image):
    tr = conn(image, structured=False)
    p = RequestParser(max_payload=1024)
    raw = req(C.CMD_WRITE, 0, 4096, data=b"\xaa" * 4096) + req(C.CMD_READ, 0, 4, cookie=7)
    got = []
    for i in range(0, len(raw), 100):          # arrives in pieces, never buffered whole
        p.receive_data(raw[i:i + 100])
        r = p.next_request()
        while r is not None:
            got.append(r)
            r = p.next_request()
        assert len(p._in) <= 100
    r1, r2 = got
    assert b"".join(tr.handle(r1)) == simple(C.EINVAL)
    assert bytes(b"".join(tr.handle(r2))) == simple(0, cookie=7) + bytes(4)
    assert open(image, "rb").read(4096) == bytes(4096)


def test_parser_byte_at_a_time_and_bad_magic():
    p = RequestParser()
    raw = req(C.CMD_WRITE, 512, 3, data=b"xyz") + req(C.CMD_DISC)
    got = []
    for b in raw:
        p.receive_data(bytes([b]))
        r = p.next_request()
        if r:
            got.append(r)
    assert [(r.type, r.offset, r.length, bytes(r.data) if r.data else None) for r in got] == [
        (C.CMD_WRITE, 512, 3, b"xyz"), (C.CMD_DISC, 0, 0, None)]
    p.receive_data(b"\0" * 28)
    with pytest.raises(ProtocolError):
        p.next_request()


def test_trim_and_write_zeroes(image):
    tr = conn(image, structured=False)
    run(tr, req(C.CMD_WRITE, 0, MiB, data=b"\xff" * MiB))
    assert run(tr, req(C.CMD_TRIM, 0, 256 * 1024, C.CMD_FLAG_FUA)) == simple(0)
    assert run(tr, req(C.CMD_WRITE_ZEROES, 256 * 1024, 4096, C.CMD_FLAG_NO_HOLE)) == simple(0)
    data = open(image, "rb").read(MiB)
    assert data[:256 * 1024 + 4096] == bytes(256 * 1024 + 4096)
    assert data[256 * 1024 + 4096:] == b"\xff" * (MiB - 256 * 1024 - 4096)


def test_disc_closes_without_reply(image):
    tr = conn(image)
    assert run(tr, req(C.CMD_DISC)) == b"" and tr.closed


def extents_payload(cid, descs):
    return struct.pack(">I", cid) + b"".join(struct.pack(">II", n, f) for n, f in descs)


def test_block_status_base_allocation_and_bitmap(image):
    bitmap = DirtyBitmap(bytes([0b01100000]))      # blocks 1 and 2 dirty
    tr = conn(image, contexts=[(1, C.BASE_ALLOCATION, default_allocation),
                               (2, "qemu:dirty-bitmap:b", bitmap)])
    run(tr, req(C.CMD_WRITE, MiB, 4096, data=b"\1" * 4096))
    out = run(tr, req(C.CMD_BLOCK_STATUS, 0, 2 * MiB))
    assert out == (chunk(C.REPLY_TYPE_BLOCK_STATUS,
                         extents_payload(1, [(MiB, 3), (4096, 0), (MiB - 4096, 3)]), flags=0)
                   + chunk(C.REPLY_TYPE_BLOCK_STATUS,
                           extents_payload(2, [(65536, 0), (131072, 1), (2 * MiB - 196608, 0)])))
    out = run(tr, req(C.CMD_BLOCK_STATUS, 70000, 1000, C.CMD_FLAG_REQ_ONE))
    assert out == (chunk(C.REPLY_TYPE_BLOCK_STATUS, extents_payload(1, [(1000, 3)]), flags=0)
                   + chunk(C.REPLY_TYPE_BLOCK_STATUS, extents_payload(2, [(1000, 1)])))
    assert run(tr, req(C.CMD_BLOCK_STATUS, 0, 0)) == error_chunk(
        C.EINVAL, "empty block status request")


def test_block_status_without_context_and_provider_failure(image):
    assert run(conn(image, contexts=[]), req(C.CMD_BLOCK_STATUS, 0, 512)) == error_chunk(
        C.EINVAL, "no metadata context negotiated")

    def broken(backend, offset, length):
        return [(0, 0)]
    tr = conn(image, contexts=[(1, C.BASE_ALLOCATION, broken)])
    assert run(tr, req(C.CMD_BLOCK_STATUS, 0, 512)) == error_chunk(
        C.EIO, "base:allocation: cannot compute extents")


def test_normalize():
    assert normalize([(10, 0), (5, 0), (100, 3)], 20) == [(15, 0), (5, 3)]
    assert normalize([(10, 0), (5, 1)], 20, req_one=True) == [(10, 0)]
    assert normalize([(1, 0), (1, 1), (1, 0)], 3, max_extents=2) == [(1, 0), (1, 1)]
    with pytest.raises(ValueError):
        normalize([], 10)
    with pytest.raises(ValueError):
        normalize([(-1, 0)], 10)


def test_dirty_bitmap_runs():
    g = 65536
    bm = DirtyBitmap(b"\xff\xff\x00\x01")           # blocks 0-15 and 31 dirty
    assert bm(None, 0, 40 * g) == [(16 * g, 1), (15 * g, 0), (g, 1), (8 * g, 0)]
    assert bm(None, 100, 10) == [(10, 1)]
    assert bm(None, 31 * g + 5, g) == [(g - 5, 1), (5, 0)]
    assert bm(None, 1000 * g, g) == [(g, 0)]       # past the bitmap: clean
    assert DirtyBitmap.from_base64("gAAAAA==")(None, 0, 2 * g) == [(g, 1), (g, 0)]
    with pytest.raises(ValueError):
        DirtyBitmap(b"", granularity=1000)


def test_extent_map():
    m = ExtentMap.from_allocated([(4096, 4096), (65536, 512)])
    assert m(None, 0, 70000) == [(4096, 3), (4096, 0), (65536 - 8192, 3), (512, 0),
                                 (70000 - 66048, 3)]
    assert m(None, 5000, 100) == [(100, 0)]
    with pytest.raises(ValueError):
        ExtentMap([(0, 10, 0), (5, 10, 0)])


def test_file_allocation_on_a_sparse_file(image):
    with Backend(image) as b:
        assert default_allocation(b, 0, SIZE) == [(SIZE, 3)]
        b.write(2 * MiB, b"x" * 4096)
        assert default_allocation(b, 0, SIZE) == [(2 * MiB, 3), (4096, 0), (2 * MiB - 4096, 3)]
        assert default_allocation(b, 2 * MiB + 100, 50) == [(50, 0)]


def test_errno_mapping():
    import errno
    assert nbd_errno(errno.EROFS) == C.EPERM
    assert nbd_errno(errno.EDQUOT) == C.ENOSPC
    assert nbd_errno(errno.EFBIG) == C.ENOSPC
    assert nbd_errno(errno.EOPNOTSUPP) == C.ENOTSUP
    assert nbd_errno(errno.ENOENT) == C.EIO
