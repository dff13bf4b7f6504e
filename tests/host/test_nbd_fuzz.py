"""Malformed input never crashes the sans-IO NBD parsers: arbitrary bytes give
events, error replies or a ProtocolError (disconnect), nothing else."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_server import constants as C
from nbd_server.exports import Export, ExportTable
from nbd_server.handshake import Closed, Handshake, Ready, StartTLS
from nbd_server.transmission import ProtocolError, RequestParser, Transmission


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    img = tmp_path_factory.mktemp("fuzz") / "d.img"
    img.write_bytes(bytes(65536))
    t = ExportTable([Export("d", str(img)), Export("r", str(img), readonly=True)])
    yield t
    t.close_all()


def option(draw_opt, data):
    return struct.pack(">QII", C.IHAVEOPT, draw_opt, len(data)) + data


options = st.builds(
    option,
    st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 0xFFFFFFFF]),
    st.binary(max_size=64))
streams = st.tuples(st.integers(0, 3), st.lists(st.one_of(options, st.binary(max_size=40)),
                                                max_size=8))


@settings(max_examples=300, deadline=None)
@given(streams, st.integers(1, 17))
def test_handshake_survives_anything(table, stream, step):
    cflags, parts = stream
    hs = Handshake(table, tls=True)
    hs.data_to_send()
    data = struct.pack(">I", cflags) + b"".join(parts)
    for i in range(0, len(data), step):
        hs.receive_data(data[i:i + step])
        ev = hs.next_event()
        hs.data_to_send()
        if isinstance(ev, Ready):
            table.release(ev.export.name)
            break
        if isinstance(ev, Closed):
            break
        assert ev is None or isinstance(ev, StartTLS)
    assert table.open_count("d") == 0 and table.open_count("r") == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.builds(lambda f, t, o, n: struct.pack(">IHHQQI", C.REQUEST_MAGIC, f, t, 1, o, n),
              st.integers(0, 0xFFFF), st.integers(0, 10), st.one_of(st.integers(0, 70000), st.integers(0, 2 ** 64 - 1)),
              st.integers(0, 5000)),
    st.binary(max_size=64)), max_size=6), st.integers(1, 50))
def test_requests_survive_anything(table, parts, step):
    backend = table.acquire("d")
    ready = Ready(table.get("d"), backend, backend.size, 0, True,
                  [(1, C.BASE_ALLOCATION, table.get("d").contexts[C.BASE_ALLOCATION])])
    try:
        _requests(parts, step, Transmission(ready))
    finally:
        table.release("d")


def _requests(parts, step, tr):
    p = RequestParser(max_payload=1024)
    data = b"".join(parts)
    try:
        for i in range(0, len(data), step):
            p.receive_data(data[i:i + step])
            while True:
                r = p.next_request()
                if r is None:
                    break
                if r.type == C.CMD_WRITE and not r.error:
                    assert len(r.data) == r.length <= 1024
                reply = tr.handle(r)             # never raises
                assert all(isinstance(b, (bytes, bytearray)) for b in reply)
                if tr.closed:
                    return
    except ProtocolError:
        pass
