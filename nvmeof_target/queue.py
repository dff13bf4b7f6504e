"""One NVMe/TCP queue pair = one TCP connection, as a sans-IO state machine:
data_received(bytes) in, buffers to send in `out`.  The server owns the socket
and is told through `wakeup()` when output is waiting or the queue wants to
close.  Flow per command (drivers/nvme/target/tcp.c): in-capsule data, or one
R2T for the whole transfer answered by H2CData; reads go back as one C2HData
with LAST, then the CapsuleResp."""

import logging

from . import admin, fabrics, io, pdu
from . import status as st
from .command import DEFERRED, FABRICS, Command, Result
from .identify import INLINE_DATA, MAX_TRANSFER

log = logging.getLogger("nvmeof_target")

MAXH2CDATA = MAX_TRANSFER        # one H2CData per write (multiple of 4, >= 4096)
ADMIN_INLINE = 8192              # NVME_TCP_ADMIN_CCSZ: Connect data on every queue
TRANSIENT_TRANSPORT_ERROR = 0x022


class Queue(object):
    def __init__(self, target, local_addr=("127.0.0.1", 4420), peer=None):
        self.target = target
        self.local_addr = local_addr
        self.peer = peer
        self.parser = pdu.Parser(max_cmd_data=max(ADMIN_INLINE, INLINE_DATA),
                                 max_h2c_data=MAXH2CDATA)
        self.out = []
        self.wakeup = _noop           # set by the server
        self.aio = None               # the server's aio.AioReads, if any
        self.closing = False
        self.ctrl = None
        self.auth = None              # auth.Authenticator when Connect asked for DH-HMAC-CHAP
        self.qid = None
        self.sqsize = 1
        self.sqhd = 0
        self.sqflow_disabled = False
        self.hdgst = self.ddgst = False
        self._ic = False
        self._r2ts = {}               # ttag -> [cmd, buffer or None, received, digest ok]
        self._next_ttag = 0

    # ---- input --------------------------------------------------------------------
    def data_received(self, data):
        if self.closing:
            return
        if self.ctrl is not None:     # keep-alive: traffic of this batch counts once
            self.ctrl.touch(self.target.now())
        try:
            self.parser.feed(data)
            for p in self.parser.take():
                if self.closing:
                    break
                self._dispatch(p)
        except pdu.PduError as e:
            self.fatal(e.fes, e.fei, e.header, str(e))

    def _dispatch(self, p):
        if p.type == pdu.CMD:
            self._capsule(p)
        elif p.type == pdu.H2C_DATA:
            self._h2c_data(p)
        elif p.type == pdu.ICREQ:
            self._icreq(p)
        elif p.type == pdu.H2C_TERM:
            fes, fei = pdu.parse_term(p)
            log.info("%s: host terminated the connection (fes=%d fei=%d)", self.peer, fes, fei)
            self.abort()

    def _icreq(self, p):
        pfv, hpda, dgst, _ = pdu.parse_icreq(p)
        if pfv != 0:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 8, p.header, "ICReq PFV %d" % pfv)
        if hpda != 0:   # C2H data always follows the header directly
            raise pdu.PduError(pdu.FES_UNSUPPORTED, 10, p.header, "ICReq HPDA %d" % hpda)
        self._ic = True
        self.hdgst, self.ddgst = bool(dgst & 1), bool(dgst & 2)
        self.send(pdu.icresp(dgst & 3, MAXH2CDATA))

    def _capsule(self, p):
        cmd = Command(p.header[8:72])
        if not p.ddgst_ok:
            return self.complete(cmd.cid, Result(TRANSIENT_TRANSPORT_ERROR))
        data = p.data
        try:
            if cmd.flags & 0x03 or cmd.flags & 0xC0 != 0x40:    # fused, or not an SGL
                raise st.NvmeError(st.INVALID_FIELD | st.DNR)
            if data is not None:
                if cmd.sgl_id != pdu.SGL_INLINE or not cmd.is_write:
                    raise st.NvmeError(st.INVALID_FIELD | st.DNR)
                if cmd.sgl_addr != 0:
                    raise st.NvmeError(st.SGL_INVALID_OFFSET | st.DNR)
                if len(data) != cmd.sgl_len:
                    raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
                if (self.qid and cmd.opcode != FABRICS and len(data) > INLINE_DATA):
                    raise st.NvmeError(st.SGL_INVALID_OFFSET | st.DNR)
            elif cmd.sgl_len:
                if cmd.sgl_id != pdu.SGL_TRANSPORT:
                    raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
                if cmd.sgl_len > MAX_TRANSFER:
                    raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
                if cmd.is_write:
                    return self._send_r2t(cmd)
        except st.NvmeError as e:
            return self.complete(cmd.cid, Result(e.status, e.dw0))
        self._execute(cmd, data)

    def _send_r2t(self, cmd):
        if self.ctrl is None or len(self._r2ts) >= 2 * self.sqsize:
            return self.complete(cmd.cid, Result(st.CMD_SEQ_ERROR | st.DNR))
        if self.auth is not None and not self.auth.authenticated:
            return self.complete(cmd.cid, Result(st.AUTH_REQUIRED | st.DNR))
        ttag = self._next_ttag
        while ttag in self._r2ts:
            ttag = (ttag + 1) & 0xFFFF
        self._next_ttag = (ttag + 1) & 0xFFFF
        self._r2ts[ttag] = [cmd, None, 0, True]
        self.send(pdu.r2t(cmd.cid, ttag, 0, cmd.sgl_len, self.hdgst))

    def _h2c_data(self, p):
        cccid, ttag, datao, datal = pdu.parse_data_hdr(p)
        ent = self._r2ts.get(ttag)
        if ent is None:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 10, p.header, "H2CData for unknown ttag")
        cmd, buf, got, ok = ent
        if cccid != cmd.cid:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 8, p.header, "H2CData cccid mismatch")
        if datao != got:
            raise pdu.PduError(pdu.FES_OUT_OF_RANGE, 12, p.header, "H2CData offset %d" % datao)
        if datal != len(p.data) or got + datal > cmd.sgl_len:
            raise pdu.PduError(pdu.FES_OUT_OF_RANGE, 16, p.header, "H2CData length %d" % datal)
        if got == 0 and datal == cmd.sgl_len:
            buf = p.data                      # the common case: no copy at all
        else:
            if buf is None:
                buf = bytearray(cmd.sgl_len)
            buf[got:got + datal] = p.data
        got += datal
        ok = ok and p.ddgst_ok
        if got < cmd.sgl_len:
            if p.flags & pdu.F_LAST:
                raise pdu.PduError(pdu.FES_OUT_OF_RANGE, 1, p.header, "LAST before all data")
            ent[1:] = [buf, got, ok]
            return
        del self._r2ts[ttag]
        if not ok:
            return self.complete(cmd.cid, Result(TRANSIENT_TRANSPORT_ERROR))
        self._execute(cmd, buf)

    def _execute(self, cmd, data):
        try:
            if cmd.opcode == FABRICS:
                res = fabrics.execute(self, cmd, data)
            elif self.ctrl is None:
                raise st.NvmeError(st.INVALID_OPCODE | st.DNR)    # Connect comes first
            elif self.auth is not None and not self.auth.authenticated:
                raise st.NvmeError(st.AUTH_REQUIRED | st.DNR)     # DH-HMAC-CHAP first
            elif self.qid == 0:
                res = admin.execute(self, cmd)
            else:
                res = io.execute(self, cmd, data)
        except st.NvmeError as e:
            if e.status & 0x7FF not in (st.LBA_RANGE, st.INVALID_OPCODE, st.INVALID_FIELD):
                log.debug("%s: %r -> status %#x %s", self.peer, cmd, e.status, e)
            res = Result(e.status, e.dw0)
        except Exception:     # never let one command take the target down
            log.exception("%s: internal error on %r", self.peer, cmd)
            res = Result(st.INTERNAL | st.DNR)
        if res is not DEFERRED:
            if res.data is not None and len(res.data) != cmd.sgl_len:
                res = Result(st.INTERNAL | st.DNR)
            self.complete(cmd.cid, res)

    # ---- output -------------------------------------------------------------------
    def bind(self, ctrl, qid, sqsize, sqflow_disabled):
        self.ctrl, self.qid, self.sqsize = ctrl, qid, sqsize
        self.sqflow_disabled = sqflow_disabled

    def complete(self, cid, res):
        if res.status == 0 and res.data is not None and len(res.data):
            return self.complete_read(cid, res.data)
        if self.closing:
            return
        if self.sqflow_disabled:
            sqhd = 0xFFFF
        else:
            self.sqhd = (self.sqhd + 1) % self.sqsize
            sqhd = self.sqhd
        self.send(pdu.capsule_resp(cid, res.status, self.qid or 0, sqhd, res.dw0, res.dw1,
                                   self.hdgst))

    def complete_read(self, cid, data):
        """Success with data for the host (the read hot path: no Result, one
        header pack each for the C2HData and the CapsuleResp without digests)."""
        if self.closing:
            return
        if self.sqflow_disabled:
            sqhd = 0xFFFF
        else:
            self.sqhd = sqhd = (self.sqhd + 1) % self.sqsize
        out = self.out
        if self.hdgst or self.ddgst:
            out.extend(pdu.c2h_data(cid, data, 0, True, False, self.hdgst, self.ddgst))
            out.append(pdu.capsule_resp(cid, 0, self.qid or 0, sqhd, 0, 0, self.hdgst))
        else:
            n = len(data)
            out.append(_C2H_PACK(pdu.C2H_DATA, pdu.F_LAST, 24, 24, 24 + n, cid, 0, 0, n))
            out.append(data)
            out.append(_RSP_PACK(pdu.RSP, 0, 24, 0, 24, 0, 0, sqhd, self.qid or 0, cid, 0))
        self.wakeup()

    def send(self, buf):
        self.out.append(buf)
        self.wakeup()

    def fatal(self, fes, fei, header, msg):
        log.warning("%s: fatal transport error: %s", self.peer, msg)
        if not self.closing:
            self.out.append(pdu.c2h_term(fes, fei, header))
        self.abort()

    def abort(self):
        """Stop reading; the server closes the socket once `out` is flushed."""
        self.closing = True
        self.wakeup()

    def connection_lost(self):
        self.closing = True
        self.target.queue_closed(self)


_C2H_PACK = pdu.DATA_HDR.pack
_RSP_PACK = pdu.RSP_HDR.pack


def _noop():
    pass
