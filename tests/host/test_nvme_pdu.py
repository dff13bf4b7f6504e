"""NVMe/TCP PDU codec: known vectors, round trips, byte-by-byte reassembly,
malformed PDUs (each must become a PduError naming the bad field, never an
unexpected exception), and a time-bounded hypothesis fuzz of the parser."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from nvmeof_target import pdu
from nvmeof_target.command import Command, build_sqe
from nvmeof_target.crc import crc32c, crc32c_pure, digest
from nvmeof_target.queue import Queue
from nvmeof_target.registry import Registry
from nvmeof_target.target import Target


def live_parser(hdgst=False, ddgst=False):
    p = pdu.Parser(max_cmd_data=8192, max_h2c_data=1 << 20)
    p.feed(pdu.icreq(dgst=(1 if hdgst else 0) | (2 if ddgst else 0)))
    assert p.next_pdu().type == pdu.ICREQ
    return p


def test_crc32c_vectors_fast_and_pure():
    for fn in (crc32c, crc32c_pure):
        assert fn(b"123456789") == 0xE3069283
        assert fn(b"56789", fn(b"1234")) == 0xE3069283
    assert digest(bytes(4096)) == bytes.fromhex("8941f998")
    assert digest([b"1234", b"56789"]) == struct.pack("<I", 0xE3069283)


def test_capsule_resp_header_digest_matches_the_reference_example():
    raw = pdu.capsule_resp(cid=1, status=0, sqid=0, sqhd=1, hdgst=True)
    assert raw[:24] == bytes.fromhex("0501180" "01c000000") + bytes(8) + bytes.fromhex(
        "0100000001000000")
    assert raw[24:] == bytes.fromhex("04c57a1d")


def test_status_goes_on_the_wire_shifted():
    raw = pdu.capsule_resp(cid=7, status=0x4002, sqid=1, sqhd=3)
    assert struct.unpack_from("<HHHH", raw, 16) == (3, 1, 7, 0x8004)


def test_icresp_layout():
    raw = pdu.icresp(dgst=3, maxh2cdata=1 << 20)
    assert len(raw) == 128 and raw[:8] == bytes([1, 0, 128, 0, 128, 0, 0, 0])
    assert pdu.IC.unpack(raw)[5:] == (0, 0, 3, 1 << 20)


def test_c2h_data_and_r2t_layout():
    data = os.urandom(4096)
    bufs = pdu.c2h_data(9, data, hdgst=True, ddgst=True)
    raw = b"".join(bytes(b) for b in bufs)
    ptype, flags, hlen, pdo, plen = pdu.CH.unpack_from(raw)
    assert (ptype, flags, hlen, pdo, plen) == (7, 0x07, 24, 28, 28 + 4096 + 4)
    assert raw[28:-4] == data and raw[-4:] == digest(data)
    assert pdu.parse_stream_host(bytearray(raw), True, True)[0][3] == data
    r = pdu.r2t(9, 5, 0, 131072)
    assert r == bytes.fromhex("0900180018000000") + struct.pack("<HHII4x", 9, 5, 0, 131072)


def test_capsule_round_trip_with_digests_byte_by_byte():
    p = live_parser(True, True)
    sqe = build_sqe(0x01, 77, nsid=1, cdw10=5, cdw12=7, sgl_len=4096, sgl_id=1)
    data = os.urandom(4096)
    raw = pdu.capsule_cmd(sqe, data, True, True)
    for i in range(len(raw)):
        p.feed(raw[i:i + 1])
        if i < len(raw) - 1:
            assert p.next_pdu() is None
    got = p.next_pdu()
    assert got.type == pdu.CMD and got.ddgst_ok and bytes(got.data) == data
    cmd = Command(got.header[8:72])
    assert (cmd.opcode, cmd.cid, cmd.nsid, cmd.cdw10, cmd.cdw12, cmd.sgl_len, cmd.sgl_id) == \
        (1, 77, 1, 5, 7, 4096, 1)


def test_several_pdus_in_one_feed():
    p = live_parser()
    raw = b"".join(pdu.capsule_cmd(build_sqe(0x18, cid)) for cid in range(5))
    raw += pdu.h2c_data(3, 1, b"x" * 100)
    p.feed(raw)
    got = [p.next_pdu() for _ in range(6)]
    assert [g.type for g in got] == [4] * 5 + [6] and bytes(got[5].data) == b"x" * 100
    assert pdu.parse_data_hdr(got[5]) == (3, 1, 0, 100)


def test_bad_data_digest_is_reported_not_fatal():
    p = live_parser(False, True)
    raw = bytearray(pdu.h2c_data(1, 0, b"abcd" * 10, ddgst=True))
    raw[30] ^= 1
    p.feed(raw)
    assert p.next_pdu().ddgst_ok is False


def _ch(ptype, flags, hlen, pdo, plen):
    return pdu.CH.pack(ptype, flags, hlen, pdo, plen)


@pytest.mark.parametrize("raw,fes,fei,live", [
    (_ch(pdu.CMD, 0, 72, 0, 72) + bytes(64), pdu.FES_SEQUENCE, 0, False),      # before ICReq
    (pdu.icreq(), pdu.FES_SEQUENCE, 0, True),                                   # ICReq twice
    (_ch(0x0B, 0, 24, 0, 24), pdu.FES_INVALID_HEADER, 0, True),                 # unknown type
    (_ch(pdu.RSP, 0, 24, 0, 24), pdu.FES_INVALID_HEADER, 0, True),              # C2H type
    (_ch(pdu.CMD, 0, 70, 0, 72), pdu.FES_INVALID_HEADER, 2, True),              # wrong hlen
    (_ch(pdu.CMD, 0, 72, 0, 80), pdu.FES_INVALID_HEADER, 4, True),              # plen, no data
    (_ch(pdu.CMD, 0, 72, 70, 200), pdu.FES_INVALID_HEADER, 3, True),            # pdo < hlen
    (_ch(pdu.CMD, 0, 72, 74, 200), pdu.FES_INVALID_HEADER, 3, True),            # unaligned pdo
    (_ch(pdu.CMD, 0, 72, 72, 72), pdu.FES_INVALID_HEADER, 4, True),             # pdo, no data
    (_ch(pdu.CMD, 0, 72, 72, 72 + 9000), pdu.FES_OUT_OF_RANGE, 4, True),        # too much data
    (_ch(pdu.CMD, pdu.F_HDGST, 72, 0, 76), pdu.FES_INVALID_HEADER, 1, True),    # digest not negotiated
    (_ch(pdu.CMD, pdu.F_LAST, 72, 0, 72), pdu.FES_INVALID_HEADER, 1, True),     # flag not allowed
    (_ch(pdu.CMD, pdu.F_DDGST, 72, 0, 72), pdu.FES_INVALID_HEADER, 1, True),    # ddgst, no data
    (_ch(pdu.H2C_DATA, 0, 24, 0, 24), pdu.FES_INVALID_HEADER, 3, True),         # H2CData, no data
    (_ch(pdu.H2C_DATA, 0, 24, 24, 24 + (2 << 20)), pdu.FES_LIMIT, 4, True),     # > MAXH2CDATA
    (_ch(pdu.ICREQ, 0, 128, 0, 129), pdu.FES_INVALID_HEADER, 4, False),         # ICReq plen
    (_ch(pdu.H2C_TERM, 0, 24, 0, 400), pdu.FES_INVALID_HEADER, 4, True),        # TermReq plen
])
def test_malformed_headers(raw, fes, fei, live):
    p = live_parser() if live else pdu.Parser()
    with pytest.raises(pdu.PduError) as e:
        p.feed(raw)
    assert (e.value.fes, e.value.fei) == (fes, fei)
    assert e.value.header[:8] == raw[:8]


def test_bad_header_digest_is_fatal():
    p = live_parser(True, False)
    raw = bytearray(pdu.capsule_cmd(build_sqe(0x18, 1), b"", True))
    raw[10] ^= 0x40
    with pytest.raises(pdu.PduError) as e:
        p.feed(raw)
    assert e.value.fes == pdu.FES_HDGST


def test_queue_answers_fatal_errors_with_c2h_term_req_and_closes():
    q = Queue(Target(Registry()))
    q.data_received(pdu.icreq())
    del q.out[:]
    bad = _ch(pdu.CMD, 0, 71, 0, 72) + bytes(64)
    q.data_received(bad)
    term = b"".join(bytes(b) for b in q.out)
    assert term[0] == pdu.C2H_TERM and term[2] == 24 and len(term) == 24 + 8   # the CH it saw
    assert struct.unpack_from("<HI", term, 8) == (pdu.FES_INVALID_HEADER, 2)
    assert term[24:] == bad[:8] and q.closing
    q.data_received(pdu.icreq())          # ignored once closing
    assert len(q.out) == 1


@pytest.mark.parametrize("field,value,fei", [("pfv", 1, 8), ("hpda", 1, 10)])
def test_icreq_fields_we_cannot_honour(field, value, fei):
    q = Queue(Target(Registry()))
    q.data_received(pdu.icreq(**{field: value}))
    term = b"".join(bytes(b) for b in q.out)
    assert term[0] == pdu.C2H_TERM and struct.unpack_from("<I", term, 10)[0] == fei


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(hs.lists(hs.binary(min_size=0, max_size=300), min_size=1, max_size=8),
       hs.booleans(), hs.booleans())
def test_fuzz_parser_never_raises_anything_but_pdu_error(chunks, hdgst, ddgst):
    p = live_parser(hdgst, ddgst)
    try:
        for c in chunks:
            p.feed(c)
            while p.next_pdu() is not None:
                pass
    except pdu.PduError:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(hs.binary(min_size=8, max_size=200), hs.integers(0, 255), hs.integers(0, 255))
def test_fuzz_queue_with_mutated_capsules(sqe_tail, opcode, flags):
    """Random capsules on a live admin queue: the target answers or terminates,
    it never raises."""
    target = Target(Registry())
    q = Queue(target)
    q.data_received(pdu.icreq())
    sqe = bytes([opcode, flags]) + (sqe_tail + bytes(62))[:62]
    q.data_received(pdu.capsule_cmd(sqe))
    q.data_received(pdu.capsule_cmd(sqe, sqe_tail))
    assert q.out


def _live_io_queue(path):
    from nvme_peer import HOSTNQN, Host, QueueTransport
    nqn = "nqn.2014-08.org.zfs-ng:fuzz:v"
    target = Target(Registry())
    target.add(nqn, path, "0f4a3b3e-9c7c-4d3a-8d8e-1a2b3c4d5e6f", allowed_hosts=[HOSTNQN])
    admin = Host(QueueTransport(Queue(target)))
    admin.icreq()
    cntlid = admin.connect(nqn)
    admin.enable()
    admin.set_features(0x07, 0)
    q = Queue(target)
    io = Host(QueueTransport(q))
    io.icreq()
    io.connect(nqn, qid=1, cntlid=cntlid, kato=0)
    del q.out[:]
    return q


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(hs.sampled_from([0x00, 0x01, 0x02, 0x08, 0x09, 0x7F, 0x05]), hs.integers(0, 2**64 - 1),
       hs.integers(0, 0xFFFF), hs.integers(0, 2**32 - 1), hs.integers(0, 3),
       hs.binary(max_size=600), hs.sampled_from([1, 0x5A, 0x00]))
def test_fuzz_io_commands_stay_inside_the_namespace(opcode, slba, nlb, cdw11, nsid, data,
                                                    sgl_id):
    """Random I/O commands (LBAs, lengths, SGLs, payloads) on a live I/O queue:
    each gets an answer, and the backing file never grows: no byte is ever
    written outside the namespace."""
    import tempfile
    with tempfile.NamedTemporaryFile() as f:
        f.truncate(1 << 20)
        q = _live_io_queue(f.name)
        sqe = build_sqe(opcode, 9, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                        cdw12=nlb | (cdw11 & 0xFFFF0000), sgl_len=len(data) or nlb * 512,
                        sgl_id=sgl_id)
        q.data_received(pdu.capsule_cmd(sqe, data))
        out = b"".join(bytes(b) for b in q.out)
        assert out and out[0] in (pdu.RSP, pdu.R2T, pdu.C2H_DATA, pdu.C2H_TERM)
        assert os.path.getsize(f.name) == 1 << 20


def test_icreq_is_the_128_byte_layout_of_the_spec():
    raw = pdu.icreq(dgst=3)
    assert len(raw) == 128 and raw[:8] == bytes([0, 0, 128, 0, 128, 0, 0, 0]) and raw[11] == 3
