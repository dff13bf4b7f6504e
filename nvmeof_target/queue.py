"""One NVMe/TCP queue pair = one TCP connection, as a sans-IO state machine:
data_received(bytes) in, buffers to send in `out`.  The server owns the socket
and is told through `wakeup()` when output is waiting or the queue wants to
close.  Flow per command (drivers/nvme/target/tcp.c): in-capsule data, or one
R2T for the whole transfer answered by H2CData; reads go back as one C2HData
with LAST, then the CapsuleResp.  The queue is the transport only: what a
command means (its SGL, which handler runs it) is core.py's; the queue moves
the command's data and sends the completion core.execute returns.

Bounded memory (limits.py): with a conn_buffer, the queue counts the bytes it
holds (replies in `out`, input not parsed yet, write data granted by R2T) and
charges them to the shared Budget too.  Over budget it takes no new command:
the rest of the input waits in a stash and `wants_input()` turns False (the
server stops reading the socket) until `sent(n)` reports that the host read
its replies.  R2Ts past the budget wait for earlier writes to complete.  A
write is checked (opcode, queue, namespace, range, length) before its R2T, an
H2CData header before its data is allocated."""

import collections
import logging

from . import core, io, pdu
from . import status as st
from .command import DEFERRED, Command, Result
from .identify import INLINE_DATA, MAX_TRANSFER
from .limits import Budget

log = logging.getLogger("nvmeof_target")

MAXH2CDATA = MAX_TRANSFER        # one H2CData per write (multiple of 4, >= 4096)
ADMIN_INLINE = 8192              # NVME_TCP_ADMIN_CCSZ: Connect data on every queue
TRANSIENT_TRANSPORT_ERROR = 0x022
PARSE_BATCH = 64                 # PDUs parsed ahead of the one being executed
LONE = 32                        # reads in a row alone before reads go synchronous


class Queue(object):
    def __init__(self, target, local_addr=("127.0.0.1", 4420), peer=None, conn_buffer=None,
                 budget=None):
        """conn_buffer: bytes this queue may hold (None: no limit); budget:
        the limits.Budget shared with the other queues of the event loop."""
        self.target = target
        self.local_addr = local_addr
        self.peer = peer
        self.parser = pdu.Parser(max_cmd_data=max(ADMIN_INLINE, INLINE_DATA),
                                 max_h2c_data=MAXH2CDATA, h2c_check=self._h2c_header)
        self.out = []
        self.conn_buffer = conn_buffer
        self.budget = budget if budget is not None else Budget()
        self.out_bytes = 0            # in `out`, not sent yet
        self.in_bytes = 0             # granted by R2T, not executed yet
        self.stash_bytes = 0
        self.paused = False           # over budget: input waits in _stash
        self._stash = None
        self._ready = collections.deque()     # parsed, not dispatched yet
        self._r2t_wait = collections.deque()  # writes waiting for budget to get an R2T
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
        # ttag -> [cmd, buffer or None, received, digest ok, offset parsed up to,
        #          AIO slot lent for the data or None]
        self._r2ts = {}
        self.lone_reads = 0           # reads in a row that came alone (lone_read)
        self.crowded = False          # set by the server: other connections have work now
        self._next_ttag = 0

    @property
    def established(self):
        """ICReq, Connect and (when asked) DH-HMAC-CHAP done: the connection
        is no longer on the connect deadline nor counted as pending (server.py)."""
        return self.ctrl is not None and (self.auth is None or self.auth.authenticated)

    # ---- input --------------------------------------------------------------------
    def data_received(self, data):
        if self.closing:
            return
        if self.ctrl is not None:     # keep-alive: traffic of this batch counts once
            self.ctrl.touch(self.target.now())
        if self._stash is not None:   # fed while paused (the server does not): keep order
            data = self._unstash() + bytes(data)
        self._run(memoryview(data))

    def _run(self, view):
        """Parse and execute view until it is used up or the budget says stop."""
        ready, parser, pop, dispatch = self._ready, self.parser, self._ready.popleft, self._dispatch
        pos, end = 0, len(view)
        try:
            while True:
                while ready:
                    p = ready[0]
                    if p.type == _CMD and self.out_bytes and not self._may_take_command():
                        self._stash_bytes(bytes(view[pos:]))
                        return
                    pop()
                    dispatch(p)
                    if self.closing:
                        return
                if pos >= end:
                    return
                pos += parser.feed(view[pos:], PARSE_BATCH)
                ready.extend(parser.take())
        except pdu.PduError as e:
            self.fatal(e.fes, e.fei, e.header, str(e))

    def _may_take_command(self):
        out, limit = self.out_bytes, self.conn_buffer
        if not out or limit is None:
            return True
        total = self.budget.total
        return out < limit and (total is None or self.budget.used < total)

    def _stash_bytes(self, data):
        self._stash = data
        self.paused = True
        self.stash_bytes = len(data)
        self.budget.used += self.stash_bytes

    def _unstash(self):
        stash = self._stash
        self.budget.used -= self.stash_bytes
        self._stash, self.stash_bytes, self.paused = None, 0, False
        return stash

    def lone_read(self):
        """May the read being dispatched be done synchronously, right now?
        Only for a host that sends one command at a time (QD1: then the
        io_submit, the eventfd wakeup and a second poll are all saved): this
        read came alone (nothing parsed behind it, no I/O in flight in the
        loop, no other connection with input in this turn of the loop: a
        synchronous read holds every connection of the loop), and so did the
        LONE reads before it.  A host with more than one
        command outstanding shows it: its commands come together, or while
        others are in flight (a synchronous read held the loop while it sent
        more), and then the next LONE reads go by AIO whatever they look like,
        so a deep queue whose commands trickle in is not served one at a time."""
        aio = self.aio
        if self._ready or self.crowded or aio.inflight or aio.queued or aio.waiting:
            self.lone_reads = 0
            return False
        self.lone_reads += 1
        return self.lone_reads > LONE

    def wants_input(self):
        """False: do not read this connection (closing, or over its budget)."""
        return not self.closing and not self.paused

    def resume(self):
        """Go on with the input stashed while over budget, if the budget allows."""
        if self.paused and not self.closing and self._may_take_command():
            self._run(memoryview(self._unstash()))

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
        try:
            if core.init(self, cmd, p.data):
                if len(self._r2ts) + len(self._r2t_wait) >= 2 * self.sqsize:
                    raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
                core.check_data_out(self, cmd)
                return self._send_r2t(cmd)
        except st.NvmeError as e:
            return self.complete(cmd.cid, Result(e.status, e.dw0))
        self._execute(cmd, p.data)

    def _send_r2t(self, cmd):
        self._r2t_wait.append(cmd)
        self._grant_r2ts()

    def _grant_r2ts(self):
        """R2Ts for the waiting writes, as far as the budgets allow; a queue
        with no transfer granted always gets one (a write never waits for nothing)."""
        wait = self._r2t_wait
        while wait and not self.closing:
            n = wait[0].sgl_len
            if self.in_bytes and self.conn_buffer is not None and (
                    self.in_bytes + n > self.conn_buffer or not self.budget.fits(n)):
                return
            cmd = wait.popleft()
            self.in_bytes += n
            self.budget.used += n
            ttag = self._next_ttag
            while ttag in self._r2ts:
                ttag = (ttag + 1) & 0xFFFF
            self._next_ttag = (ttag + 1) & 0xFFFF
            self._r2ts[ttag] = [cmd, None, 0, True, 0, None]
            self.send(pdu.r2t(cmd.cid, ttag, 0, n, self.hdgst))

    def _h2c_header(self, header, dlen):
        """The parser's check of an H2CData header, before it allocates the
        data: only a transfer this queue granted, in order, within its length."""
        cccid, ttag, datao, datal = pdu.DATA_HDR.unpack_from(header, 0)[5:9]
        ent = self._r2ts.get(ttag)
        if ent is None:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 10, header, "H2CData for unknown ttag")
        cmd = ent[0]
        if cccid != cmd.cid:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 8, header, "H2CData cccid mismatch")
        if datao != ent[4]:
            raise pdu.PduError(pdu.FES_OUT_OF_RANGE, 12, header, "H2CData offset %d" % datao)
        if datal != dlen or datao + datal > cmd.sgl_len:
            raise pdu.PduError(pdu.FES_OUT_OF_RANGE, 16, header, "H2CData length %d" % datal)
        ent[4] = datao + datal
        if datao == 0 and dlen == cmd.sgl_len and not self.ddgst and self.aio is not None:
            # the whole write in this PDU: received straight into an AIO slot
            ent[5] = io.write_buffer(self, cmd)
            return ent[5]
        return None

    def _h2c_data(self, p):
        cccid, ttag, datao, datal = pdu.parse_data_hdr(p)
        ent = self._r2ts.get(ttag)
        if ent is None:
            raise pdu.PduError(pdu.FES_INVALID_HEADER, 10, p.header, "H2CData for unknown ttag")
        cmd, buf, got, ok = ent[:4]
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
            ent[1:4] = [buf, got, ok]
            return
        del self._r2ts[ttag]
        try:
            if not ok:
                return self.complete(cmd.cid, Result(TRANSIENT_TRANSPORT_ERROR))
            self._execute(cmd, buf)
        finally:
            if ent[5] is not None:       # the slot, unless the write took it
                self.aio.unreserve(ent[5])
            self.in_bytes -= cmd.sgl_len
            self.budget.used -= cmd.sgl_len
            self._grant_r2ts()

    def _execute(self, cmd, data):
        res = core.execute(self, cmd, data)
        if res is not DEFERRED:
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
        n = len(data)
        if self.hdgst or self.ddgst:
            bufs = pdu.c2h_data(cid, data, 0, True, False, self.hdgst, self.ddgst)
            bufs.append(pdu.capsule_resp(cid, 0, self.qid or 0, sqhd, 0, 0, self.hdgst))
            out.extend(bufs)
            n = sum(len(b) for b in bufs)
        else:
            out.append(_C2H_PACK(pdu.C2H_DATA, pdu.F_LAST, 24, 24, 24 + n, cid, 0, 0, n))
            out.append(data)
            out.append(_RSP_PACK(pdu.RSP, 0, 24, 0, 24, 0, 0, sqhd, self.qid or 0, cid, 0))
            n += 48
        self.out_bytes += n
        self.budget.used += n
        self.wakeup()

    def send(self, buf):
        self.out.append(buf)
        n = len(buf)
        self.out_bytes += n
        self.budget.used += n
        self.wakeup()

    def sent(self, n):
        """The server sent (and dropped) n bytes from the front of `out`."""
        self.out_bytes -= n
        self.budget.used -= n

    def take_output(self):
        """For sans-IO drivers (tests): all there is to send, as bytes; it
        counts as sent, so a paused queue goes on (and may add more)."""
        data = b""
        while self.out:
            data += b"".join(bytes(b) for b in self.out)
            del self.out[:]
            self.sent(self.out_bytes)
            self.resume()
        return data

    def fatal(self, fes, fei, header, msg):
        log.warning("%s: fatal transport error: %s", self.peer, msg)
        if not self.closing:
            self.send(pdu.c2h_term(fes, fei, header))
        self.abort()

    def abort(self):
        """Stop reading; the server closes the socket once `out` is flushed."""
        self.closing = True
        self.wakeup()

    def connection_lost(self):
        """The socket is gone: leave the controller, give back every byte of
        budget and drop every reference out of this queue, so its memory is
        freed now, not whenever the cycle collector runs."""
        self.closing = True
        try:
            self.target.queue_closed(self)
        finally:
            if self._stash is not None:
                self._unstash()
            self.budget.used -= self.out_bytes + self.in_bytes
            self.out_bytes = self.in_bytes = 0
            self.out = []
            for ent in self._r2ts.values():
                if ent[5] is not None and self.aio is not None:
                    self.aio.unreserve(ent[5])      # data that never completed
            self._r2ts.clear()
            self._r2t_wait.clear()
            self._ready.clear()
            self.parser = _CLOSED_PARSER
            self.ctrl = None
            self.aio = None
            self.wakeup = _noop


_CMD = pdu.CMD
_C2H_PACK = pdu.DATA_HDR.pack
_RSP_PACK = pdu.RSP_HDR.pack


def _noop():
    pass


_CLOSED_PARSER = pdu.Parser()
