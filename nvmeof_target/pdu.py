"""NVMe/TCP PDUs (NVMe/TCP transport spec 1.0, Linux include/linux/nvme-tcp.h):
encoders for what a controller sends, and a sans-IO parser for what it
receives.  No sockets here: bytes in, PDU objects or bytes out.

Layout on the wire: CH+PSH (hlen) | HDGST | PAD | DATA (at pdo) | DDGST.
"""

import struct

from .crc import crc32c, digest

ICREQ = 0x00
ICRESP = 0x01
H2C_TERM = 0x02
C2H_TERM = 0x03
CMD = 0x04
RSP = 0x05
H2C_DATA = 0x06
C2H_DATA = 0x07
R2T = 0x09

F_HDGST = 0x01
F_DDGST = 0x02
F_LAST = 0x04
F_SUCCESS = 0x08

# Fatal error status of a TermReq
FES_INVALID_HEADER = 0x01
FES_SEQUENCE = 0x02
FES_HDGST = 0x03
FES_OUT_OF_RANGE = 0x04
FES_LIMIT = 0x05
FES_UNSUPPORTED = 0x06

HLEN = {ICREQ: 128, ICRESP: 128, H2C_TERM: 24, C2H_TERM: 24, CMD: 72, RSP: 24,
        H2C_DATA: 24, C2H_DATA: 24, R2T: 24}
# Flags a controller accepts per received type (FreeBSD nvmf_tcp.h, §7.4).
RX_FLAGS = {ICREQ: 0, H2C_TERM: 0, CMD: F_HDGST | F_DDGST,
            H2C_DATA: F_HDGST | F_DDGST | F_LAST}

CH = struct.Struct("<BBBBI")
IC = struct.Struct("<BBBBIHBBI112x")
TERM = struct.Struct("<BBBBIHI10x")
DATA_HDR = struct.Struct("<BBBBIHHII4x")     # H2CData, C2HData, R2T
RSP_HDR = struct.Struct("<BBBBIIIHHHH")      # CH + CQE

# SGL identifiers the TCP transport uses
SGL_INLINE = 0x01       # data block, offset subtype: data in the capsule
SGL_TRANSPORT = 0x5A    # transport data block: data moves in H2C/C2H PDUs


class PduError(Exception):
    """A fatal transport error: answer with a C2HTermReq and close."""

    def __init__(self, fes, fei=0, header=b"", msg=""):
        Exception.__init__(self, msg or "NVMe/TCP fatal error fes=%d fei=%d" % (fes, fei))
        self.fes = fes
        self.fei = fei
        self.header = bytes(header[:128])


class Pdu(object):
    __slots__ = ("type", "flags", "hlen", "pdo", "plen", "header", "data", "ddgst_ok")

    def __init__(self, type_, flags, hlen, pdo, plen, header, data=None, ddgst_ok=True):
        self.type = type_
        self.flags = flags
        self.hlen = hlen
        self.pdo = pdo
        self.plen = plen
        self.header = header    # bytes, hlen long (CH included)
        self.data = data        # bytearray or None
        self.ddgst_ok = ddgst_ok

    def __repr__(self):
        return "Pdu(type=%d flags=%#x plen=%d data=%d)" % (
            self.type, self.flags, self.plen, len(self.data) if self.data is not None else -1)


# ---- encoders (controller -> host) -------------------------------------------------

def icreq(hpda=0, dgst=0, maxr2t=0, pfv=0):
    """An ICReq, as a host sends it (tests and the loopback initiator use it)."""
    return IC.pack(ICREQ, 0, 128, 0, 128, pfv, hpda, dgst, maxr2t)


def icresp(dgst, maxh2cdata, cpda=0):
    return IC.pack(ICRESP, 0, 128, 0, 128, 0, cpda, dgst, maxh2cdata)


def c2h_term(fes, fei=0, header=b""):
    header = bytes(header[:128])
    plen = 24 + len(header)
    return TERM.pack(C2H_TERM, 0, 24, 0, plen, fes, fei) + header


def _with_hdgst(hdr, hdgst):
    return hdr + digest(hdr) if hdgst else hdr


def capsule_resp(cid, status, sqid, sqhd, dw0=0, dw1=0, hdgst=False):
    plen = 28 if hdgst else 24
    hdr = RSP_HDR.pack(RSP, F_HDGST if hdgst else 0, 24, 0, plen,
                       dw0 & 0xFFFFFFFF, dw1 & 0xFFFFFFFF, sqhd, sqid, cid, (status << 1) & 0xFFFF)
    return _with_hdgst(hdr, hdgst)


def r2t(cid, ttag, offset, length, hdgst=False):
    plen = 28 if hdgst else 24
    hdr = DATA_HDR.pack(R2T, F_HDGST if hdgst else 0, 24, 0, plen, cid, ttag, offset, length)
    return _with_hdgst(hdr, hdgst)


def c2h_data(cid, data, offset=0, last=True, success=False, hdgst=False, ddgst=False):
    """Buffers (a list, for sendmsg) of one C2HData PDU carrying data.
    The Linux host ignores PDO and reads the data right after the header."""
    n = len(data)
    hd = 4 if hdgst else 0
    dd = 4 if ddgst else 0
    flags = (F_HDGST if hdgst else 0) | (F_DDGST if ddgst else 0)
    flags |= (F_LAST if last else 0) | (F_SUCCESS if success else 0)
    hdr = DATA_HDR.pack(C2H_DATA, flags, 24, 24 + hd, 24 + hd + n + dd, cid, 0, offset, n)
    out = [_with_hdgst(hdr, hdgst), data]
    if ddgst:
        out.append(digest(data))
    return out


def h2c_data(cid, ttag, data, offset=0, last=True, hdgst=False, ddgst=False):
    """One H2CData PDU as bytes (host side: tests and the loopback initiator)."""
    n = len(data)
    hd = 4 if hdgst else 0
    dd = 4 if ddgst else 0
    flags = (F_HDGST if hdgst else 0) | (F_DDGST if ddgst and n else 0) | (F_LAST if last else 0)
    hdr = DATA_HDR.pack(H2C_DATA, flags, 24, 24 + hd, 24 + hd + n + dd, cid, ttag, offset, n)
    return _with_hdgst(hdr, hdgst) + bytes(data) + (digest(data) if ddgst and n else b"")


def capsule_cmd(sqe, data=b"", hdgst=False, ddgst=False):
    """A CapsuleCmd carrying the 64-byte sqe and optional in-capsule data."""
    assert len(sqe) == 64
    hd = 4 if hdgst else 0
    n = len(data)
    dd = 4 if ddgst and n else 0
    flags = (F_HDGST if hdgst else 0) | (F_DDGST if dd else 0)
    pdo = 72 + hd if n else 0
    hdr = CH.pack(CMD, flags, 72, pdo, 72 + hd + n + dd) + bytes(sqe)
    return _with_hdgst(hdr, hdgst) + bytes(data) + (digest(data) if dd else b"")


# ---- parser (what a controller receives) ---------------------------------------------

class Parser(object):
    """Reassembles PDUs from a byte stream and validates their framing.

    feed(bytes) then next_pdu() until None.  Digest settings and the data
    limits are set by the queue once ICReq/ICResp are exchanged.  Data of a
    PDU is copied once, straight into its own buffer (no re-buffering of
    large H2CData payloads).  Nothing is kept that points into fed bytes.

    Nothing is allocated for a PDU's data before its header is checked:
    h2c_check(header, dlen), if given, vets an H2CData header (the queue
    knows which transfers it granted) and raises PduError to refuse it; it
    may return a writable buffer of dlen bytes for the data to be received
    into (the queue's AIO slot: no copy later), used when there is no data
    digest."""

    def __init__(self, max_cmd_data=8192, max_h2c_data=1 << 20, h2c_check=None):
        self.hdgst = False
        self.ddgst = False
        self.ic_done = False
        self.max_cmd_data = max_cmd_data
        self.max_h2c_data = max_h2c_data
        self.h2c_check = h2c_check
        self._hbuf = bytearray()   # header bytes being gathered
        self._need = 8             # header bytes needed before the next step
        self._pdu = None           # PDU whose data is being received
        self._dbuf = None          # its data (+ddgst) buffer
        self._dpos = 0
        self._skip = 0             # padding bytes between header and data
        self._hd = 0
        self._ready = []

    # -- receive ----------------------------------------------------------------------
    def feed(self, data, limit=None):
        """Parse data; returns how many bytes were taken: all of them, or
        fewer when `limit` PDUs are ready (it stops at a PDU boundary; the
        caller feeds the rest later)."""
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if limit is not None and len(self._ready) >= limit and self._dbuf is None \
                    and not self._hbuf:
                break
            if self._dbuf is not None:
                if self._skip:
                    n = min(self._skip, end - pos)
                    self._skip -= n
                    pos += n
                    continue
                n = min(len(self._dbuf) - self._dpos, end - pos)
                self._dbuf[self._dpos:self._dpos + n] = view[pos:pos + n]
                self._dpos += n
                pos += n
                if self._dpos == len(self._dbuf):
                    self._finish_data()
                continue
            if not self._hbuf and end - pos >= 8:
                # fast path: the whole header is usually in this chunk
                ptype, flags, hlen, pdo, plen = CH.unpack_from(view, pos)
                hd, need = self._check_ch(view[pos:pos + 8], ptype, flags, hlen, pdo, plen)
                if end - pos >= need:
                    self._header_done(view[pos:pos + need], ptype, flags, hlen, pdo, plen, hd)
                    pos += need
                    continue
            n = min(self._need - len(self._hbuf), end - pos)
            self._hbuf += view[pos:pos + n]
            pos += n
            if len(self._hbuf) == self._need:
                self._header_step()
        return pos

    def next_pdu(self):
        return self._ready.pop(0) if self._ready else None

    def take(self):
        """All complete PDUs so far, in order (the queue's batch)."""
        ready, self._ready = self._ready, []
        return ready

    def pending(self):
        return len(self._ready)

    # -- header validation --------------------------------------------------------------
    def _header_step(self):
        h = self._hbuf
        ptype, flags, hlen, pdo, plen = CH.unpack_from(h, 0)
        if len(h) == 8:
            self._hd, self._need = self._check_ch(h, ptype, flags, hlen, pdo, plen)
            if self._need > 8:
                return
        self._hbuf = bytearray()
        self._need = 8
        self._header_done(h, ptype, flags, hlen, pdo, plen, self._hd)

    def _header_done(self, h, ptype, flags, hlen, pdo, plen, hd):
        """h: the full header (+ digest); start receiving the data, if any."""
        if ptype == H2C_TERM:
            self._ready.append(Pdu(ptype, flags, hlen, pdo, plen, bytes(h[:hlen]), bytes(h[hlen:])))
            return
        header = bytes(h[:hlen])
        if hd and digest(header) != bytes(h[hlen:hlen + 4]):
            raise PduError(FES_HDGST, 0, h, "header digest mismatch")
        if pdo == 0:
            if ptype == ICREQ:
                self._ic_seen(header)
            self._ready.append(Pdu(ptype, flags, hlen, pdo, plen, header))
            return
        dd = 4 if flags & F_DDGST else 0
        dlen = plen - pdo - dd
        buf = None
        if ptype == H2C_DATA and self.h2c_check is not None:
            buf = self.h2c_check(header, dlen)
        self._pdu = Pdu(ptype, flags, hlen, pdo, plen, header)
        self._dbuf = buf if buf is not None and not dd else bytearray(dlen + dd)
        self._dpos = 0
        self._skip = pdo - hlen - hd

    def _ic_seen(self, header):
        # Digests start with the PDU after ICResp, and a host may pipeline: take
        # the requested digests now; the queue rejects an ICReq it cannot honour.
        dgst = header[11]
        self.ic_done = True
        self.hdgst = bool(dgst & 1)
        self.ddgst = bool(dgst & 2)

    def _finish_data(self):
        pdu, buf = self._pdu, self._dbuf
        self._pdu = self._dbuf = None
        if pdu.flags & F_DDGST:
            got = bytes(buf[-4:])
            del buf[-4:]
            pdu.ddgst_ok = digest(buf) == got
        pdu.data = buf
        self._ready.append(pdu)

    def _check_ch(self, h, ptype, flags, hlen, pdo, plen):
        fail = lambda fei, msg, fes=FES_INVALID_HEADER: PduError(fes, fei, h, msg)  # noqa: E731
        if ptype not in RX_FLAGS:
            raise fail(0, "unexpected PDU type %#x" % ptype)
        if not self.ic_done and ptype != ICREQ:
            raise fail(0, "PDU before ICReq", FES_SEQUENCE)
        if self.ic_done and ptype == ICREQ:
            raise fail(0, "ICReq on a live queue", FES_SEQUENCE)
        if flags & ~RX_FLAGS[ptype] & 0xFF:
            raise fail(1, "flags %#x not valid for type %#x" % (flags, ptype))
        if hlen != HLEN[ptype]:
            raise fail(2, "hlen %d for type %#x" % (hlen, ptype))
        if ptype == ICREQ:
            if plen != 128:
                raise fail(4, "ICReq plen %d" % plen)
            if pdo != 0:
                raise fail(3, "ICReq pdo %d" % pdo)
            return 0, 128
        if ptype == H2C_TERM:
            # a TermReq carries a copy of the bad header after its own, no pdo
            if not 24 <= plen <= 152 or pdo != 0:
                raise fail(4, "H2CTermReq plen %d" % plen)
            return 0, plen
        hd = 4 if self.hdgst else 0
        if bool(flags & F_HDGST) != self.hdgst:
            raise fail(1, "header digest flag does not match the negotiated digests")
        if pdo == 0:
            if flags & F_DDGST:
                raise fail(1, "data digest flag on a PDU without data")
            if plen != hlen + hd:
                raise fail(4, "plen %d for a PDU without data" % plen)
            if ptype == H2C_DATA:
                raise fail(3, "H2CData without data")
            return hd, hlen + hd
        if bool(flags & F_DDGST) != self.ddgst:
            raise fail(1, "data digest flag does not match the negotiated digests")
        dd = 4 if self.ddgst else 0
        if pdo < hlen + hd or pdo % 4 or pdo > hlen + hd + 124:
            raise fail(3, "pdo %d" % pdo)
        dlen = plen - pdo - dd
        limit = self.max_cmd_data if ptype == CMD else self.max_h2c_data
        if dlen <= 0:
            raise fail(4, "plen %d leaves no data after pdo %d" % (plen, pdo))
        if dlen > limit:
            raise PduError(FES_LIMIT if ptype == H2C_DATA else FES_OUT_OF_RANGE, 4, h,
                           "%d data bytes in one PDU, limit %d" % (dlen, limit))
        return hd, hlen + hd


def parse_icreq(pdu):
    _, _, _, _, _, pfv, hpda, dgst, maxr2t = IC.unpack(pdu.header)
    return pfv, hpda, dgst, maxr2t


def parse_term(pdu):
    return TERM.unpack_from(pdu.header, 0)[5:7]


def parse_data_hdr(pdu):
    """(cccid, ttag, datao, datal) of an H2CData/C2HData/R2T header."""
    return DATA_HDR.unpack_from(pdu.header, 0)[5:9]


# ---- what a host receives (loopback initiator in tests) ---------------------------------

def parse_stream_host(buf, hdgst=False, ddgst=False):
    """Split complete controller->host PDUs off the front of bytearray buf.
    Returns a list of (type, flags, header, data); consumed bytes are removed.
    A small, strict helper for tests: raises ValueError on bad framing/digests."""
    out = []
    while len(buf) >= 8:
        ptype, flags, hlen, pdo, plen = CH.unpack_from(buf, 0)
        if len(buf) < plen:
            break
        hd = 4 if (flags & F_HDGST) else 0
        header = bytes(buf[:hlen])
        if hd and digest(header) != bytes(buf[hlen:hlen + 4]):
            raise ValueError("bad header digest from controller")
        data = b""
        if ptype == C2H_TERM:
            data = bytes(buf[24:plen])
        elif pdo:
            dd = 4 if flags & F_DDGST else 0
            data = bytes(buf[pdo:plen - dd])
            if dd and digest(data) != bytes(buf[plen - 4:plen]):
                raise ValueError("bad data digest from controller")
        del buf[:plen]
        out.append((ptype, flags, header, data))
    return out


__all__ = ["Parser", "PduError", "Pdu", "crc32c"]
