"""Sans-IO core of a reconnecting NBD relay (transmission phase, simple
replies): one client ("down": the kernel's NBD client of this host) and one
server ("up": a storage node), the server's connection replaceable.

    r = Relay()
    r.from_down(bytes)      requests of the client (after its handshake)
    r.from_up(bytes)        replies of the server
    r.to_up / r.to_down     bytearrays to send (the caller deletes what it sent)
    r.lost()                the server's connection broke: what it had not
                            answered is kept, nothing more goes out
    r.made()                a new connection is past its handshake: first the
                            replay (below), then every unanswered request again,
                            in the order the client sent them
    r.fatal                 a reason to give up (set by a replay the server refused)

Requests get our own cookies upstream (a counter) and their own back
downstream, so the relay may send requests of its own: the replay and a
FLUSH of its own.  A reply is passed down only once it is whole (a READ's data
included): a break mid-reply never leaves the client half a reply.

Nothing acknowledged is lost, even when the server crashed and lost what it
had acknowledged but not yet flushed (its page cache): every WRITE, TRIM and
WRITE_ZEROES the server acknowledged stays in a log, with its data, until a
FLUSH sent after that acknowledgement succeeds (NBD: a FLUSH covers the writes
completed before it was sent).  After a reconnect the log is sent again first
(oldest first, so the newest data wins where they overlap) and every reply to
it awaited before anything else goes out; then the unanswered requests follow,
a FLUSH among them now covering the replay too.  Resending is safe because
these commands are idempotent at the block level.  When the log's data passes
`log_limit` the relay sends a FLUSH of its own (its reply stays here) to trim
it, so its memory is bounded whatever the client's flush habits.

A server that refuses a replayed command (an error reply) sets `fatal`: the
relay cannot vouch for the data any more and must close the client's side.
"""

import collections

from nbd_server import constants as C
from nbd_server.transmission import REQUEST, SIMPLE_REPLY, ProtocolError, RequestParser

MODIFYING = (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES)


class _Req(object):
    __slots__ = ("cookie", "type", "flags", "offset", "length", "data", "covers", "replay")

    def __init__(self, cookie, type_, flags, offset, length, data, replay=False):
        self.cookie = cookie        # the client's cookie; None for our own requests
        self.type = type_
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data            # a WRITE's payload
        self.covers = 0             # FLUSH: the log entries acknowledged before it went out
        self.replay = replay

    def wire(self, cookie):
        head = REQUEST.pack(C.REQUEST_MAGIC, self.flags, self.type, cookie, self.offset,
                            self.length)
        return head + bytes(self.data) if self.type == C.CMD_WRITE else head


class Relay(object):
    def __init__(self, log_limit=64 << 20, max_payload=C.MAX_REQUEST):
        self.parser = RequestParser(max_payload=max_payload)
        self.to_up = bytearray()
        self.to_down = bytearray()
        self.connected = True
        self.disconnecting = False    # the client sent DISC
        self.fatal = None
        self.log_limit = log_limit
        self._next = 0
        self._acks = 0                # acknowledgements of modifying commands so far
        self._inflight = collections.OrderedDict()   # our cookie -> _Req, in sending order
        self._log = collections.OrderedDict()        # ack number -> _Req acknowledged, unflushed
        self._log_bytes = 0
        self._own_flush = False
        self._barrier = set()         # cookies of the replay still unanswered
        self._up = bytearray()

    # -- the client's side -------------------------------------------------------

    def from_down(self, data):
        """Requests of the client; raises ProtocolError on broken framing."""
        self.parser.receive_data(data)
        while True:
            req = self.parser.next_request()
            if req is None:
                return
            if req.error:
                raise ProtocolError("request refused by the parser: %r" % req)
            if req.type == C.CMD_DISC:
                self.disconnecting = True
                if self.connected:
                    self.to_up += REQUEST.pack(C.REQUEST_MAGIC, 0, C.CMD_DISC, 0, 0, 0)
                continue
            self._send(_Req(req.cookie, req.type, req.flags, req.offset, req.length,
                            req.data))

    def _send(self, r):
        self._next += 1
        if r.type == C.CMD_FLUSH:
            r.covers = self._acks
        self._inflight[self._next] = r
        if self.connected and not self._barrier:
            self.to_up += r.wire(self._next)

    # -- the server's side -------------------------------------------------------

    def from_up(self, data):
        """Replies of the server; raises ProtocolError on a bad one."""
        self._up += data
        while len(self._up) >= SIMPLE_REPLY.size:
            magic, error, cookie = SIMPLE_REPLY.unpack_from(self._up)
            if magic != C.SIMPLE_REPLY_MAGIC:
                raise ProtocolError("bad reply magic 0x%08x" % magic)
            r = self._inflight.get(cookie)
            if r is None:
                raise ProtocolError("reply to a request never sent (cookie %d)" % cookie)
            n = r.length if r.type == C.CMD_READ and not error else 0
            if len(self._up) < SIMPLE_REPLY.size + n:
                return
            payload = bytes(self._up[SIMPLE_REPLY.size:SIMPLE_REPLY.size + n])
            del self._up[:SIMPLE_REPLY.size + n]
            del self._inflight[cookie]
            self._answered(cookie, r, error, payload)

    def _answered(self, cookie, r, error, payload):
        if r.replay:
            self._barrier.discard(cookie)
            if error:
                self.fatal = ("the node refused a replayed write (error %d at offset %d): "
                              "data acknowledged before it restarted cannot be vouched for"
                              % (error, r.offset))
            elif not self._barrier and self.connected:
                for c, q in self._inflight.items():
                    self.to_up += q.wire(c)
            return
        if r.cookie is not None:
            self.to_down += SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, error, r.cookie) + payload
        if error:
            return
        if r.type in MODIFYING:
            self._acks += 1
            self._log[self._acks] = r
            self._log_bytes += r.length if r.type == C.CMD_WRITE else 0
        elif r.type == C.CMD_FLUSH:
            while self._log and next(iter(self._log)) <= r.covers:
                _, old = self._log.popitem(last=False)
                self._log_bytes -= old.length if old.type == C.CMD_WRITE else 0
            if r.cookie is None:
                self._own_flush = False
        if self._log_bytes > self.log_limit and not self._own_flush and self.connected:
            self._own_flush = True
            self._send(_Req(None, C.CMD_FLUSH, 0, 0, 0, None))

    # -- the server's connection -------------------------------------------------

    def lost(self):
        self.connected = False
        self.to_up = bytearray()
        self._up = bytearray()
        for c in list(self._barrier):          # a replay not answered: replayed again
            self._inflight.pop(c, None)
        self._barrier = set()

    def made(self):
        """A new connection: the replay goes out, then (once it is all
        answered) the unanswered requests."""
        self.connected = True
        if self.disconnecting:
            self.to_up += REQUEST.pack(C.REQUEST_MAGIC, 0, C.CMD_DISC, 0, 0, 0)
            return
        for r in self._log.values():
            self._next += 1
            q = _Req(None, r.type, r.flags, r.offset, r.length, r.data, replay=True)
            self._inflight[self._next] = q
            self._barrier.add(self._next)
        if self._barrier:
            for c in sorted(self._barrier):
                self.to_up += self._inflight[c].wire(c)
        else:
            for c, q in self._inflight.items():
                self.to_up += q.wire(c)

    # -- state -------------------------------------------------------------------

    def unanswered(self):
        """Requests of the client not answered yet."""
        return sum(1 for r in self._inflight.values() if r.cookie is not None)

    def waiting(self):
        """Is anything sent to the server still unanswered?"""
        return self.connected and bool(self._inflight) and not self.to_up

    def log_size(self):
        """(entries, payload bytes) acknowledged and not yet covered by a FLUSH."""
        return len(self._log), self._log_bytes

