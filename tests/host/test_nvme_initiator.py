"""A tiny NVMe/TCP host written for the tests (not shipped): ICReq, Connect,
properties, Identify, Read/Write with in-capsule data or R2T + H2CData.  It
runs over any byte transport: a real socket, or the sans-IO Queue directly.
Strict: it checks what the Linux host checks (hlen, digests, cid echo)."""

import socket
import struct

from nvmeof_target import pdu
from nvmeof_target.command import build_sqe

CONNECT_DATA = struct.Struct("<16sH238x256s256s256x")
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


class QueueTransport(object):
    """Bytes straight into a nvmeof_target.queue.Queue, and back out."""

    def __init__(self, queue):
        self.queue = queue

    def send(self, data):
        self.queue.data_received(data)

    def recv(self):
        out = b"".join(bytes(b) for b in self.queue.out)
        del self.queue.out[:]
        if not out:
            raise EOFError("queue has nothing to say")
        return out


class SocketTransport(object):
    def __init__(self, addr, timeout=10.0):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data):
        self.sock.sendall(data)

    def recv(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed by the target")
        return data

    def close(self):
        self.sock.close()


class NvmeStatus(Exception):
    def __init__(self, status, dw0=0):
        Exception.__init__(self, "NVMe status %#x (dw0 %#x)" % (status, dw0))
        self.status = status
        self.dw0 = dw0


class Host(object):
    def __init__(self, transport, hdgst=False, ddgst=False, inline=8192):
        self.t = transport
        self.hdgst, self.ddgst = hdgst, ddgst
        self.inline = inline
        self.buf = bytearray()
        self.cid = 0
        self.pdus = []
        self.maxh2cdata = None

    # -- framing ----------------------------------------------------------------------
    def next_pdu(self):
        while not self.pdus:
            self.buf += self.t.recv()
            self.pdus.extend(pdu.parse_stream_host(self.buf, self.hdgst, self.ddgst))
        return self.pdus.pop(0)

    def icreq(self, **kw):
        self.t.send(pdu.icreq(dgst=(1 if self.hdgst else 0) | (2 if self.ddgst else 0), **kw))
        ptype, flags, header, _ = self.next_pdu()
        assert ptype == pdu.ICRESP, "expected ICResp, got type %d" % ptype
        _, _, hlen, _, plen, pfv, cpda, dgst, maxh2c = pdu.IC.unpack(header)
        assert (hlen, plen, pfv, cpda) == (128, 128, 0, 0)
        assert dgst == (1 if self.hdgst else 0) | (2 if self.ddgst else 0)
        assert maxh2c % 4 == 0 and maxh2c >= 4096
        self.maxh2cdata = maxh2c
        return header

    def submit(self, sqe_fields, data=None, read_len=0):
        """Send one command; returns (status, dw0, dw1, data read)."""
        self.cid = (self.cid + 1) & 0xFFFF
        cid = self.cid
        data = bytes(data) if data is not None else None
        if data is not None and len(data) <= self.inline:
            sqe = build_sqe(cid=cid, sgl_len=len(data), sgl_id=pdu.SGL_INLINE, **sqe_fields)
            self.t.send(pdu.capsule_cmd(sqe, data, self.hdgst, self.ddgst))
        else:
            n = len(data) if data is not None else read_len
            sqe = build_sqe(cid=cid, sgl_len=n, sgl_id=pdu.SGL_TRANSPORT, **sqe_fields)
            self.t.send(pdu.capsule_cmd(sqe, b"", self.hdgst, self.ddgst))
        got = bytearray()
        while True:
            ptype, flags, header, payload = self.next_pdu()
            if ptype == pdu.R2T:
                cccid, ttag, r2to, r2tl = pdu.DATA_HDR.unpack(header)[5:9]
                assert cccid == cid and r2to == 0 and r2tl == len(data)
                chunk = self.maxh2cdata
                for off in range(0, r2tl, chunk):
                    part = data[off:off + chunk]
                    self.t.send(pdu.h2c_data(cid, ttag, part, off, off + chunk >= r2tl,
                                             self.hdgst, self.ddgst))
            elif ptype == pdu.C2H_DATA:
                cccid, _, datao, datal = pdu.DATA_HDR.unpack(header)[5:9]
                assert cccid == cid and datao == len(got) and datal == len(payload)
                got += payload
            elif ptype == pdu.RSP:
                dw0, dw1, sqhd, sqid, rcid, status = struct.unpack_from("<IIHHHH", header, 8)
                assert rcid == cid, "cid %d echoed as %d" % (cid, rcid)
                return status >> 1, dw0, dw1, bytes(got)
            elif ptype == pdu.C2H_TERM:
                fes, fei = struct.unpack_from("<HI", header, 8)
                raise EOFError("C2HTermReq fes=%d fei=%d" % (fes, fei))
            else:
                raise AssertionError("unexpected PDU type %d" % ptype)

    def ok(self, sqe_fields, data=None, read_len=0):
        status, dw0, dw1, got = self.submit(sqe_fields, data, read_len)
        if status:
            raise NvmeStatus(status, dw0)
        return dw0, dw1, got

    # -- fabrics ------------------------------------------------------------------------
    def connect(self, subnqn, hostnqn=HOSTNQN, qid=0, cntlid=0xFFFF, sqsize=31, kato=5000,
                hostid=b"\x01" * 16):
        data = CONNECT_DATA.pack(hostid, cntlid, subnqn.encode(), hostnqn.encode())
        cdw10 = qid << 16            # recfmt 0 | qid
        cdw11 = sqsize               # sqsize | cattr << 16
        dw0, _, _ = self.ok(dict(opcode=0x7F, nsid=0x01, cdw10=cdw10, cdw11=cdw11,
                                 cdw12=kato), data)
        return dw0 & 0xFFFF

    def prop_get(self, offset, size8=False):
        dw0, dw1, _ = self.ok(dict(opcode=0x7F, nsid=0x04, cdw10=1 if size8 else 0,
                                   cdw11=offset))
        return dw0 | (dw1 << 32) if size8 else dw0

    def prop_set(self, offset, value):
        self.ok(dict(opcode=0x7F, nsid=0x00, cdw10=0, cdw11=offset, cdw12=value))

    def enable(self):
        cc = (6 << 16) | (4 << 20)
        self.prop_set(0x14, cc)
        self.prop_set(0x14, cc | 1)
        assert self.prop_get(0x1C) & 1

    def identify(self, cns, nsid=0):
        return self.ok(dict(opcode=0x06, nsid=nsid, cdw10=cns), read_len=4096)[2]

    def get_log(self, lid, length, offset=0, nsid=0xFFFFFFFF, rae=False):
        numd = length // 4 - 1
        cdw10 = lid | (0x8000 if rae else 0) | ((numd & 0xFFFF) << 16)
        return self.ok(dict(opcode=0x02, nsid=nsid, cdw10=cdw10, cdw11=numd >> 16,
                            cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32), read_len=length)[2]

    def set_features(self, fid, value):
        return self.ok(dict(opcode=0x09, cdw10=fid, cdw11=value))[0]

    # -- I/O ------------------------------------------------------------------------------
    def read(self, slba, nblocks, bs=512):
        return self.ok(dict(opcode=0x02, nsid=1, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw12=nblocks - 1), read_len=nblocks * bs)[2]

    def write(self, slba, data, bs=512, fua=False):
        return self.ok(dict(opcode=0x01, nsid=1, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw12=(len(data) // bs - 1) | ((1 << 30) if fua else 0)), data)


def test_icreq_is_the_128_byte_layout_of_the_spec():
    raw = pdu.icreq(dgst=3)
    assert len(raw) == 128 and raw[:8] == bytes([0, 0, 128, 0, 128, 0, 0, 0]) and raw[11] == 3
