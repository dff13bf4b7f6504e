"""nbd_server.handshake byte for byte (sans-IO, no sockets)."""

import struct

import pytest

from nbd_server import constants as C
from nbd_server.exports import Export, ExportTable
from nbd_server.extents import DirtyBitmap
from nbd_server.handshake import Closed, Handshake, Ready, StartTLS

SIZE = 1 << 20


@pytest.fixture
def table(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"")
    with open(img, "r+b") as f:
        f.truncate(SIZE)
    t = ExportTable([
        Export("disk", str(img), description="a disk"),
        Export("snap", str(img), readonly=True, bitmaps={"b1": DirtyBitmap(b"\x80")}),
    ])
    yield t
    t.close_all()


def opt(option, data=b""):
    return struct.pack(">QII", C.IHAVEOPT, option, len(data)) + data


def rep(option, type_, data=b""):
    return struct.pack(">QIII", C.REPLY_MAGIC, option, type_, len(data)) + data


def go_data(name, infos=()):
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_data(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q)) + q.encode()
    return out


def started(table, cflags=C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES, **kw):
    hs = Handshake(table, **kw)
    assert hs.data_to_send() == b"NBDMAGICIHAVEOPT\x00\x03"
    hs.receive_data(struct.pack(">I", cflags))
    return hs


def exchange(hs, data):
    hs.receive_data(data)
    ev = hs.next_event()
    return ev, hs.data_to_send()


def err_reply(out, option, type_):
    magic, o, t, n = struct.unpack(">QIII", out[:20])
    assert (magic, o, t) == (C.REPLY_MAGIC, option, type_)
    assert len(out) == 20 + n
    return out[20:].decode()


def test_export_name_old_style_with_124_zeroes(table):
    # Xen Orchestra: fixed newstyle only (no NO_ZEROES), EXPORT_NAME.
    hs = started(table, cflags=C.FLAG_C_FIXED_NEWSTYLE)
    ev, out = exchange(hs, opt(C.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(ev, Ready) and ev.export.name == "disk" and not ev.structured
    flags = (C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA | C.FLAG_SEND_TRIM
             | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_CAN_MULTI_CONN)
    assert out == struct.pack(">QH", SIZE, flags) + bytes(124)
    assert len(out) == 134
    assert table.open_count("disk") == 1
    table.release("disk")
    assert table.open_count("disk") == 0


def test_export_name_no_zeroes_and_read_only_flags(table):
    hs = started(table)
    ev, out = exchange(hs, opt(C.OPT_EXPORT_NAME, b"snap"))
    assert isinstance(ev, Ready)
    assert out == struct.pack(">QH", SIZE, C.FLAG_HAS_FLAGS | C.FLAG_READ_ONLY | C.FLAG_SEND_FLUSH
                              | C.FLAG_CAN_MULTI_CONN)
    table.release("snap")


def test_export_name_unknown_disconnects(table):
    ev, out = exchange(started(table), opt(C.OPT_EXPORT_NAME, b"nope"))
    assert isinstance(ev, Closed) and out == b""


def test_unknown_client_flags_disconnect(table):
    hs = started(table, cflags=0x4)
    assert isinstance(hs.next_event(), Closed)


def test_bad_option_magic_disconnects(table):
    ev, _ = exchange(started(table), struct.pack(">QII", 0x1234, C.OPT_LIST, 0))
    assert isinstance(ev, Closed)


def test_non_fixed_client_may_only_send_export_name(table):
    ev, _ = exchange(started(table, cflags=0), opt(C.OPT_LIST))
    assert isinstance(ev, Closed)


def test_list(table):
    ev, out = exchange(started(table), opt(C.OPT_LIST))
    assert ev is None
    assert out == (rep(C.OPT_LIST, C.REP_SERVER, b"\0\0\0\x04disk" + b"a disk")
                   + rep(C.OPT_LIST, C.REP_SERVER, b"\0\0\0\x04snap")
                   + rep(C.OPT_LIST, C.REP_ACK))


def test_list_with_data_is_invalid(table):
    ev, out = exchange(started(table), opt(C.OPT_LIST, b"x"))
    assert ev is None
    err_reply(out, C.OPT_LIST, C.REP_ERR_INVALID)


def test_unknown_option_unsupported_and_haggling_goes_on(table):
    hs = started(table)
    ev, out = exchange(hs, opt(99, b"junk"))
    assert ev is None
    err_reply(out, 99, C.REP_ERR_UNSUP)
    ev, out = exchange(hs, opt(C.OPT_LIST))
    assert out.endswith(rep(C.OPT_LIST, C.REP_ACK))


def test_info_then_go_byte_for_byte(table):
    hs = started(table)
    ev, out = exchange(hs, opt(C.OPT_INFO, go_data("disk", [C.INFO_NAME, C.INFO_DESCRIPTION,
                                                            C.INFO_BLOCK_SIZE])))
    assert ev is None and table.open_count("disk") == 0   # INFO holds no fd
    flags = (C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_SEND_FUA | C.FLAG_SEND_TRIM
             | C.FLAG_SEND_WRITE_ZEROES | C.FLAG_CAN_MULTI_CONN)
    assert out == (rep(C.OPT_INFO, C.REP_INFO, struct.pack(">HQH", 0, SIZE, flags))
                   + rep(C.OPT_INFO, C.REP_INFO, b"\0\x01disk")
                   + rep(C.OPT_INFO, C.REP_INFO, b"\0\x02a disk")
                   + rep(C.OPT_INFO, C.REP_INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
                   + rep(C.OPT_INFO, C.REP_ACK))
    ev, out = exchange(hs, opt(C.OPT_STRUCTURED_REPLY))
    assert out == rep(C.OPT_STRUCTURED_REPLY, C.REP_ACK)
    ev, out = exchange(hs, opt(C.OPT_GO, go_data("disk")))
    assert isinstance(ev, Ready) and ev.structured and ev.size == SIZE
    assert ev.flags == flags | C.FLAG_SEND_DF
    assert out == (rep(C.OPT_GO, C.REP_INFO, struct.pack(">HQH", 0, SIZE, ev.flags))
                   + rep(C.OPT_GO, C.REP_INFO, struct.pack(">HIII", 3, 1, 4096, 32 << 20))
                   + rep(C.OPT_GO, C.REP_ACK))
    assert table.open_count("disk") == 1
    table.release("disk")


def test_go_unknown_export_and_malformed(table):
    hs = started(table)
    _, out = exchange(hs, opt(C.OPT_GO, go_data("nope")))
    assert "nope" in err_reply(out, C.OPT_GO, C.REP_ERR_UNKNOWN)
    _, out = exchange(hs, opt(C.OPT_GO, b"\0\0\0\x09disk"))           # name longer than data
    err_reply(out, C.OPT_GO, C.REP_ERR_INVALID)
    _, out = exchange(hs, opt(C.OPT_GO, go_data("disk") + b"\0"))     # trailing byte
    err_reply(out, C.OPT_GO, C.REP_ERR_INVALID)
    _, out = exchange(hs, opt(C.OPT_GO, b"\0\0\0\x02\xff\xfe\0\0"))   # not UTF-8
    err_reply(out, C.OPT_GO, C.REP_ERR_INVALID)
    assert table.open_count("disk") == 0


def test_default_export_is_the_only_one(tmp_path):
    img = tmp_path / "x.img"
    img.write_bytes(bytes(4096))
    t = ExportTable([Export("only", str(img))])
    ev, _ = exchange(started(t), opt(C.OPT_GO, go_data("")))
    assert isinstance(ev, Ready) and ev.export.name == "only"
    t.release("only")


def test_structured_reply_with_data_is_invalid(table):
    _, out = exchange(started(table), opt(C.OPT_STRUCTURED_REPLY, b"x"))
    err_reply(out, C.OPT_STRUCTURED_REPLY, C.REP_ERR_INVALID)


def test_meta_contexts_list_and_set(table):
    hs = started(table)
    _, out = exchange(hs, opt(C.OPT_SET_META_CONTEXT, meta_data("snap", ["base:allocation"])))
    err_reply(out, C.OPT_SET_META_CONTEXT, C.REP_ERR_INVALID)      # before STRUCTURED_REPLY
    _, out = exchange(hs, opt(C.OPT_LIST_META_CONTEXT, meta_data("snap", [])))
    assert out == (rep(C.OPT_LIST_META_CONTEXT, C.REP_META_CONTEXT, b"\0\0\0\x01base:allocation")
                   + rep(C.OPT_LIST_META_CONTEXT, C.REP_META_CONTEXT,
                         b"\0\0\0\x02qemu:dirty-bitmap:b1")
                   + rep(C.OPT_LIST_META_CONTEXT, C.REP_ACK))
    _, out = exchange(hs, opt(C.OPT_LIST_META_CONTEXT, meta_data("snap", ["qemu:dirty-bitmap:"])))
    assert out == (rep(C.OPT_LIST_META_CONTEXT, C.REP_META_CONTEXT,
                       b"\0\0\0\x02qemu:dirty-bitmap:b1")
                   + rep(C.OPT_LIST_META_CONTEXT, C.REP_ACK))
    exchange(hs, opt(C.OPT_STRUCTURED_REPLY))
    _, out = exchange(hs, opt(C.OPT_SET_META_CONTEXT,
                              meta_data("snap", ["qemu:dirty-bitmap:b1", "x:unknown"])))
    assert out == (rep(C.OPT_SET_META_CONTEXT, C.REP_META_CONTEXT,
                       b"\0\0\0\x02qemu:dirty-bitmap:b1")
                   + rep(C.OPT_SET_META_CONTEXT, C.REP_ACK))
    ev, _ = exchange(hs, opt(C.OPT_GO, go_data("snap")))
    assert [(cid, name) for cid, name, _ in ev.contexts] == [(2, "qemu:dirty-bitmap:b1")]
    table.release("snap")


def test_meta_context_selection_does_not_carry_to_another_export(table):
    hs = started(table)
    exchange(hs, opt(C.OPT_STRUCTURED_REPLY))
    exchange(hs, opt(C.OPT_SET_META_CONTEXT, meta_data("snap", ["base:allocation"])))
    ev, _ = exchange(hs, opt(C.OPT_GO, go_data("disk")))
    assert ev.contexts == []
    table.release("disk")


def test_meta_context_malformed(table):
    hs = started(table)
    _, out = exchange(hs, opt(C.OPT_LIST_META_CONTEXT, meta_data("snap", []) [:-1]))
    err_reply(out, C.OPT_LIST_META_CONTEXT, C.REP_ERR_INVALID)
    _, out = exchange(hs, opt(C.OPT_LIST_META_CONTEXT, b"\0\0\0\x04snap\0\0\0\x01\0\0\x10\x01"))
    err_reply(out, C.OPT_LIST_META_CONTEXT, C.REP_ERR_TOO_BIG)       # 4097-byte query


def test_oversized_option_is_skipped_with_too_big(table):
    hs = started(table)
    big = opt(77, bytes(C.MAX_OPTION_DATA + 10))
    # Fed in pieces: the payload is dropped as it arrives, never buffered.
    out = b""
    for i in range(0, len(big), 1000):
        hs.receive_data(big[i:i + 1000])
        assert hs.next_event() is None
        assert len(hs._in) <= 1000
        out += hs.data_to_send()
    err_reply(out, 77, C.REP_ERR_TOO_BIG)
    _, out = exchange(hs, opt(C.OPT_LIST))
    assert out.endswith(rep(C.OPT_LIST, C.REP_ACK))


def test_abort_acks_and_closes(table):
    ev, out = exchange(started(table), opt(C.OPT_ABORT))
    assert isinstance(ev, Closed) and out == rep(C.OPT_ABORT, C.REP_ACK)


def test_starttls(table):
    _, out = exchange(started(table), opt(C.OPT_STARTTLS))
    err_reply(out, C.OPT_STARTTLS, C.REP_ERR_UNSUP)                  # no certificate configured
    hs = started(table, tls=True, tls_required=True)
    _, out = exchange(hs, opt(C.OPT_GO, go_data("disk")))
    err_reply(out, C.OPT_GO, C.REP_ERR_TLS_REQD)
    exchange(hs, opt(C.OPT_STRUCTURED_REPLY))                          # refused too
    ev, out = exchange(hs, opt(C.OPT_STARTTLS))
    assert isinstance(ev, StartTLS) and out == rep(C.OPT_STARTTLS, C.REP_ACK)
    assert not hs.structured
    ev, out = exchange(hs, opt(C.OPT_GO, go_data("disk")))
    assert isinstance(ev, Ready)
    table.release("disk")


def test_export_name_before_required_tls_disconnects(table):
    ev, _ = exchange(started(table, tls=True, tls_required=True), opt(C.OPT_EXPORT_NAME, b"disk"))
    assert isinstance(ev, Closed)


def test_requests_pipelined_behind_go_are_kept(table):
    hs = started(table)
    ev, _ = exchange(hs, opt(C.OPT_GO, go_data("disk")) + b"REQ")
    assert isinstance(ev, Ready) and hs.leftover() == b"REQ"
    table.release("disk")


def test_byte_at_a_time(table):
    hs = Handshake(table)
    hs.data_to_send()
    data = struct.pack(">I", 3) + opt(C.OPT_LIST) + opt(C.OPT_GO, go_data("disk"))
    events = []
    for b in data:
        hs.receive_data(bytes([b]))
        ev = hs.next_event()
        if ev is not None:
            events.append(ev)
    assert len(events) == 1 and isinstance(events[0], Ready)
    table.release("disk")
