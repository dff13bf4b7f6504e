"""Sans-IO NBD transmission phase, server side.

RequestParser turns bytes into Request objects (WRITE payloads included).
Nothing is allocated for a WRITE's payload before its header has passed every
check that needs no data (`check`, Transmission.refusal: command, flags,
range, read-only, size): a refused payload is dropped as it arrives, never
buffered; an accepted one is allocated through `allocate` (the server charges
it to its budget there).  Transmission executes one request against the
export's Backend and block status providers and returns the reply as a list
of buffers to send, simple or structured as negotiated.  Nothing here touches
a socket.
"""

import errno
import logging
import struct

from nbd_server import constants as C

log = logging.getLogger(__name__)

REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")        # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")             # magic, flags, type, cookie, length

_NAMES = {C.CMD_READ: "READ", C.CMD_WRITE: "WRITE", C.CMD_DISC: "DISC", C.CMD_FLUSH: "FLUSH",
          C.CMD_TRIM: "TRIM", C.CMD_CACHE: "CACHE", C.CMD_WRITE_ZEROES: "WRITE_ZEROES",
          C.CMD_BLOCK_STATUS: "BLOCK_STATUS"}

# Host errno -> NBD error (the protocol fixes Linux's numbers).
_ERRNO = {
    errno.EPERM: C.EPERM, errno.EROFS: C.EPERM, errno.EACCES: C.EPERM,
    errno.EIO: C.EIO, errno.ENOMEM: C.ENOMEM, errno.EINVAL: C.EINVAL,
    errno.ENOSPC: C.ENOSPC, errno.EDQUOT: C.ENOSPC, errno.EFBIG: C.ENOSPC,
    errno.EOVERFLOW: C.EOVERFLOW, errno.ENOTSUP: C.ENOTSUP, errno.EOPNOTSUPP: C.ENOTSUP,
    errno.ESHUTDOWN: C.ESHUTDOWN,
}


def nbd_errno(err):
    """The NBD error for a host errno; anything unknown is EIO."""
    return _ERRNO.get(err, C.EIO)


class ProtocolError(Exception):
    """The client broke the framing: the only answer is a hard disconnect."""


class Request:
    __slots__ = ("flags", "type", "cookie", "offset", "length", "data", "error")

    def __init__(self, flags, type_, cookie, offset, length):
        self.flags = flags
        self.type = type_
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data = None
        self.error = 0          # set by the parser: refuse without executing

    def __repr__(self):
        return "Request(%s flags=0x%x cookie=%d offset=%d length=%d)" % (
            _NAMES.get(self.type, self.type), self.flags, self.cookie, self.offset, self.length)


class RequestParser:
    def __init__(self, max_payload=C.MAX_REQUEST, check=None, allocate=bytearray):
        """check(request) -> NBD error of a WRITE refused from its header alone
        (0: accepted), before its payload is allocated; allocate(n) -> the
        buffer for an accepted payload of n bytes."""
        self.max_payload = max_payload
        self.check = check
        self.allocate = allocate
        self._in = bytearray()
        self._pending = None      # a WRITE whose payload is still arriving
        self._payload = None
        self._filled = 0
        self._skip = 0            # bytes of a refused oversized payload to drop

    def receive_data(self, data):
        mv = memoryview(data)
        if self._payload is not None:
            n = min(len(mv), len(self._payload) - self._filled)
            self._payload[self._filled:self._filled + n] = mv[:n]
            self._filled += n
            mv = mv[n:]
        elif self._skip:
            n = min(len(mv), self._skip)
            self._skip -= n
            mv = mv[n:]
        if len(mv):
            self._in += mv

    def payload_buffer(self, min_size=1):
        """Where the rest of a pending WRITE payload goes (a memoryview), so the
        I/O layer can recv_into it directly and skip a copy; None when no
        payload is pending or less than min_size of it is missing (small
        payloads are cheaper read in bulk with the requests around them)."""
        if self._payload is None or len(self._payload) - self._filled < min_size:
            return None
        return memoryview(self._payload)[self._filled:]

    def payload_received(self, n):
        """n bytes were written into payload_buffer()."""
        self._filled += n

    def mid_request(self):
        """Part of a request is in (a header, or a WRITE's payload): the client
        owes the rest."""
        return bool(self._in) or self._pending is not None

    def held(self):
        """Bytes allocated for a WRITE payload not complete yet."""
        return len(self._payload) if self._payload is not None else 0

    def next_request(self):
        """The next complete Request, or None when more bytes are needed.
        Raises ProtocolError on a bad magic."""
        if self._pending is not None:
            if self._payload is not None and self._filled < len(self._payload):
                return None
            if self._skip:
                return None
            req, self._pending = self._pending, None
            req.data, self._payload = self._payload, None
            return req
        if len(self._in) < REQUEST.size:
            return None
        magic, flags, type_, cookie, offset, length = REQUEST.unpack_from(self._in)
        del self._in[:REQUEST.size]
        if magic != C.REQUEST_MAGIC:
            raise ProtocolError("bad request magic 0x%08x" % magic)
        req = Request(flags, type_, cookie, offset, length)
        if type_ != C.CMD_WRITE or length == 0:
            if type_ == C.CMD_WRITE:
                req.data = b""
            return req
        # Take what is buffered, then let receive_data fill the rest.
        have = min(length, len(self._in))
        if length > self.max_payload:
            req.error = C.EINVAL          # too big: drop the payload, refuse it
        elif self.check is not None:
            req.error = self.check(req)
        if req.error:
            self._skip = length - have
        else:
            self._payload = self.allocate(length)
            self._payload[:have] = self._in[:have]
            self._filled = have
        del self._in[:have]
        self._pending = req
        return self.next_request()


def simple_reply(cookie, error=0):
    return SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(cookie, type_, payload, done=True):
    return CHUNK.pack(C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE if done else 0, type_,
                      cookie, len(payload)) + payload


def error_chunk(cookie, error, message=""):
    msg = message.encode("utf-8")[:C.MAX_STRING]
    return chunk(cookie, C.REPLY_TYPE_ERROR, struct.pack(">IH", error, len(msg)) + msg)


class _Refused(Exception):
    def __init__(self, error, message):
        Exception.__init__(self, message)
        self.error = error


class Transmission:
    """One connection's transmission phase.  `ready` is handshake.Ready."""

    def __init__(self, ready):
        self.export = ready.export
        self.backend = ready.backend
        self.size = ready.size
        self.structured = ready.structured
        self.contexts = ready.contexts      # [(id, name, provider)]
        self.readonly = ready.export.readonly
        self.closed = False

    # -- replies ------------------------------------------------------------

    def _error(self, req, error, message):
        log.debug("%r refused: %s (%d)", req, message, error)
        if self.structured:
            return [error_chunk(req.cookie, error, message)]
        return [simple_reply(req.cookie, error)]

    def _ok(self, req):
        return [simple_reply(req.cookie)]

    # -- dispatch -----------------------------------------------------------

    def refusal(self, req):
        """The NBD error req gets from its header alone (0: none): what the
        parser asks before it allocates a WRITE's payload."""
        try:
            self._validate(req)
        except _Refused as e:
            return e.error
        return 0

    def handle(self, req):
        """Execute req; return the buffers of its reply ([] for DISC)."""
        try:
            self._validate(req)
            if req.error:
                raise _Refused(req.error, "request too large")
            if req.type == C.CMD_READ:
                return self._read(req)
            if req.type == C.CMD_DISC:
                self.closed = True
                return []
            if req.type == C.CMD_BLOCK_STATUS:
                return self._block_status(req)
            fua = bool(req.flags & C.CMD_FLAG_FUA)
            if req.type == C.CMD_WRITE:
                self.backend.write(req.offset, req.data, fua=fua)
            elif req.type == C.CMD_FLUSH:
                self.backend.flush()
            elif req.type == C.CMD_TRIM:
                self.backend.discard(req.offset, req.length)
                if fua:
                    self.backend.flush()
            elif req.type == C.CMD_WRITE_ZEROES:
                self.backend.write_zeroes(req.offset, req.length,
                                          unmap=not req.flags & C.CMD_FLAG_NO_HOLE)
                if fua:
                    self.backend.flush()
            return self._ok(req)
        except _Refused as e:
            return self._error(req, e.error, str(e))
        except OSError as e:
            log.warning("%s: %r failed: %s", self.export.name, req, e)
            return self._error(req, nbd_errno(e.errno), e.strerror or str(e))

    def _validate(self, req):
        t, flags = req.type, req.flags
        if t not in _NAMES or t == C.CMD_CACHE:
            raise _Refused(C.EINVAL, "unsupported command %d" % t)
        allowed = C.CMD_FLAG_FUA
        if t == C.CMD_WRITE_ZEROES:
            allowed |= C.CMD_FLAG_NO_HOLE
        elif t == C.CMD_READ and self.structured:
            allowed |= C.CMD_FLAG_DF
        elif t == C.CMD_BLOCK_STATUS:
            allowed |= C.CMD_FLAG_REQ_ONE
        if flags & ~allowed:
            raise _Refused(C.EINVAL, "invalid flags 0x%x for %s" % (flags, _NAMES[t]))
        if t in (C.CMD_DISC, C.CMD_FLUSH):
            return
        if req.offset + req.length > self.size:
            raise _Refused(C.EINVAL, "request beyond the end of the export")
        if t in (C.CMD_WRITE, C.CMD_TRIM, C.CMD_WRITE_ZEROES) and self.readonly:
            raise _Refused(C.EPERM, "export is read-only")
        if t == C.CMD_READ and req.length > C.MAX_REQUEST:
            raise _Refused(C.EINVAL, "read larger than %d bytes" % C.MAX_REQUEST)
        if t == C.CMD_BLOCK_STATUS:
            if not self.structured or not self.contexts:
                raise _Refused(C.EINVAL, "no metadata context negotiated")
            if req.length == 0:
                raise _Refused(C.EINVAL, "empty block status request")

    def _read(self, req):
        # Header and data in one buffer: one send, no copy.  The data is read
        # before any header goes out, so an error is still a clean reply.
        n = req.length
        if n == 0 and self.structured:      # no empty OFFSET_DATA chunk: just "done"
            return [chunk(req.cookie, C.REPLY_TYPE_NONE, b"")]
        if self.structured:
            hdr = CHUNK.size + 8
            buf = bytearray(hdr + n)
            self.backend.readinto(req.offset, memoryview(buf)[hdr:])
            CHUNK.pack_into(buf, 0, C.STRUCTURED_REPLY_MAGIC, C.REPLY_FLAG_DONE,
                            C.REPLY_TYPE_OFFSET_DATA, req.cookie, 8 + n)
            struct.pack_into(">Q", buf, CHUNK.size, req.offset)
        else:
            hdr = SIMPLE_REPLY.size
            buf = bytearray(hdr + n)
            self.backend.readinto(req.offset, memoryview(buf)[hdr:])
            SIMPLE_REPLY.pack_into(buf, 0, C.SIMPLE_REPLY_MAGIC, 0, req.cookie)
        return [buf]

    def _block_status(self, req):
        req_one = bool(req.flags & C.CMD_FLAG_REQ_ONE)
        chunks = []
        for i, (cid, name, provider) in enumerate(self.contexts):
            try:
                extents = provider(self.backend, req.offset, req.length)
                descs = normalize(extents, req.length, req_one)
            except OSError:
                raise
            except Exception as e:      # a provider bug is the client's EIO, not our crash
                log.error("%s: %s provider failed on %r: %r", self.export.name, name, req, e)
                raise _Refused(C.EIO, "%s: cannot compute extents" % name)
            payload = struct.pack(">I", cid) + b"".join(struct.pack(">II", n, f) for n, f in descs)
            chunks.append((payload, i == len(self.contexts) - 1))
        return [chunk(req.cookie, C.REPLY_TYPE_BLOCK_STATUS, p, done) for p, done in chunks]


def normalize(extents, length, req_one=False, max_extents=C.MAX_EXTENTS):
    """Clip a provider's extents to the request, merge equal neighbours, cap the
    count; at least one descriptor.  Raises ValueError on a malformed list."""
    out = []
    total = 0
    for n, flags in extents:
        n, flags = int(n), int(flags)
        if n <= 0 or not 0 <= flags <= 0xFFFFFFFF:
            raise ValueError("bad extent (%r, %r)" % (n, flags))
        n = min(n, length - total)
        if n <= 0:
            break
        if out and out[-1][1] == flags:
            out[-1][0] += n
        else:
            if len(out) == max_extents:
                break
            out.append([n, flags])
        total += n
        if total >= length:
            break
    if not out:
        raise ValueError("provider returned no extent")
    if req_one:
        out = out[:1]
    return [(n, f) for n, f in out]
