"""Sans-IO NBD handshake (fixed newstyle option haggling), server side.

    hs = Handshake(table, tls=False)
    sock.sendall(hs.data_to_send())            # the greeting
    while True:
        ev = hs.next_event()
        sock.sendall(hs.data_to_send())
        if ev is None: hs.receive_data(sock.recv(...))   # needs more bytes
        elif isinstance(ev, StartTLS): wrap the socket, go on
        elif isinstance(ev, Ready): enter transmission (ev.backend is held)
        elif isinstance(ev, Closed): close the socket

No sockets here: bytes in, events and bytes out.  The Backend of the export a
client selects is acquired from the ExportTable (and handed over in Ready);
INFO opens and releases it only to read the size.
"""

import logging
import struct

from nbd_server import constants as C

log = logging.getLogger(__name__)

_OPT_HDR = struct.Struct(">QII")      # IHAVEOPT, option, length
_REP_HDR = struct.Struct(">QIII")     # REPLY_MAGIC, option, type, length

_OPTION_NAMES = {
    C.OPT_EXPORT_NAME: "EXPORT_NAME", C.OPT_ABORT: "ABORT", C.OPT_LIST: "LIST",
    C.OPT_STARTTLS: "STARTTLS", C.OPT_INFO: "INFO", C.OPT_GO: "GO",
    C.OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY", C.OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    C.OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
}


class Ready:
    """Transmission starts: the connection holds `backend` of `export` and must
    release it (ExportTable.release(export.name)) when it ends."""

    def __init__(self, export, backend, size, flags, structured, contexts):
        self.export = export
        self.backend = backend
        self.size = size
        self.flags = flags              # transmission flags sent to the client
        self.structured = structured
        self.contexts = contexts        # [(context id, name, provider)]


class StartTLS:
    """The ACK to STARTTLS is in data_to_send(): send it, then wrap the socket."""


class Closed:
    def __init__(self, reason):
        self.reason = reason


class _OptionError(Exception):
    def __init__(self, rep, message):
        Exception.__init__(self, message)
        self.rep = rep


def transmission_flags(export, structured):
    flags = C.FLAG_HAS_FLAGS | C.FLAG_SEND_FLUSH | C.FLAG_CAN_MULTI_CONN
    if export.readonly:
        flags |= C.FLAG_READ_ONLY
    else:
        flags |= C.FLAG_SEND_FUA | C.FLAG_SEND_TRIM | C.FLAG_SEND_WRITE_ZEROES
    if structured:
        flags |= C.FLAG_SEND_DF         # every read is one OFFSET_DATA chunk
    return flags


def block_sizes(backend):
    """(minimum, preferred, maximum): any byte range works (page cache, no
    O_DIRECT); preferred is the device's physical block (volblocksize)."""
    preferred = min(max(512, backend.physical_block_size), 2 << 20)
    return 1, preferred, C.MAX_REQUEST


def _decode(raw):
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _OptionError(C.REP_ERR_INVALID, "name is not UTF-8")
    if "\0" in s:
        raise _OptionError(C.REP_ERR_INVALID, "name contains NUL")
    return s


class _Reader:
    """Bounds-checked reads from option data: a short payload is INVALID."""

    def __init__(self, data):
        self.data = data
        self.pos = 0

    def take(self, n):
        if self.pos + n > len(self.data):
            raise _OptionError(C.REP_ERR_INVALID, "option data too short")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self):
        return struct.unpack(">H", self.take(2))[0]

    def u32(self):
        return struct.unpack(">I", self.take(4))[0]

    def string(self):
        n = self.u32()
        if n > C.MAX_STRING:
            raise _OptionError(C.REP_ERR_TOO_BIG, "string longer than %d bytes" % C.MAX_STRING)
        return _decode(self.take(n))

    def end(self):
        if self.pos != len(self.data):
            raise _OptionError(C.REP_ERR_INVALID, "trailing bytes in option data")


class Handshake:
    def __init__(self, table, tls=False, tls_required=False, structured=True):
        """structured=False refuses NBD_OPT_STRUCTURED_REPLY (UNSUP): a
        relay that passes simple replies through."""
        self.table = table
        self.structured_available = structured
        self.tls_available = bool(tls)
        self.tls_required = bool(tls) and bool(tls_required)
        self.tls_active = False
        self._in = bytearray()
        self._out = bytearray(struct.pack(">QQH", C.NBDMAGIC, C.IHAVEOPT,
                                          C.FLAG_FIXED_NEWSTYLE | C.FLAG_NO_ZEROES))
        self._state = "flags"            # flags -> options -> done
        self._skip = 0                   # bytes of an oversized option to discard
        self._skipped_opt = None
        self.fixed = False
        self.no_zeroes = False
        self._reset_options()

    def _reset_options(self):
        # What STARTTLS discards (spec: option state before TLS is forgotten).
        self.structured = False
        self._meta_export = None
        self._meta = []                  # [(id, name)] selected by SET_META_CONTEXT

    # -- sans-IO interface -------------------------------------------------

    def receive_data(self, data):
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        self._in += data

    def leftover(self):
        """Bytes received after the option that entered transmission (requests
        a client pipelined behind GO): hand them to the RequestParser."""
        out = bytes(self._in)
        del self._in[:]
        return out

    def data_to_send(self):
        out = bytes(self._out)
        del self._out[:]
        return out

    def next_event(self):
        """An event, or None when more bytes are needed."""
        if self._state == "done":
            return None
        if self._state == "flags":
            if len(self._in) < 4:
                return None
            (cflags,) = struct.unpack(">I", self._in[:4])
            del self._in[:4]
            if cflags & ~(C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES):
                return self._close("unknown client flags 0x%x" % cflags)
            self.fixed = bool(cflags & C.FLAG_C_FIXED_NEWSTYLE)
            self.no_zeroes = bool(cflags & C.FLAG_C_NO_ZEROES)
            self._state = "options"
        while True:
            if self._skipped_opt is not None:
                if self._skip:
                    return None
                opt, self._skipped_opt = self._skipped_opt, None
                if opt == C.OPT_EXPORT_NAME or not self.fixed:
                    return self._close("oversized option %d" % opt)
                self._reply(opt, C.REP_ERR_TOO_BIG, b"option data too large")
                continue
            if len(self._in) < _OPT_HDR.size:
                return None
            magic, opt, length = _OPT_HDR.unpack_from(self._in)
            if magic != C.IHAVEOPT:
                return self._close("bad option magic 0x%x" % magic)
            if length > C.MAX_OPTION_DATA:
                del self._in[:_OPT_HDR.size]
                have = min(length, len(self._in))
                del self._in[:have]
                self._skip = length - have
                self._skipped_opt = opt
                continue
            if len(self._in) < _OPT_HDR.size + length:
                return None
            data = bytes(self._in[_OPT_HDR.size:_OPT_HDR.size + length])
            del self._in[:_OPT_HDR.size + length]
            ev = self._option(opt, data)
            if ev is not None:
                return ev

    # -- options -------------------------------------------------------------

    def _close(self, reason):
        self._state = "done"
        log.debug("handshake closed: %s", reason)
        return Closed(reason)

    def _reply(self, opt, rep, data=b""):
        self._out += _REP_HDR.pack(C.REPLY_MAGIC, opt, rep, len(data))
        self._out += data

    def _option(self, opt, data):
        log.debug("option %s (%d bytes)", _OPTION_NAMES.get(opt, opt), len(data))
        if not self.fixed and opt != C.OPT_EXPORT_NAME:
            return self._close("option %d from a non-fixed-newstyle client" % opt)
        if opt == C.OPT_EXPORT_NAME:
            return self._export_name(data)
        if opt == C.OPT_ABORT:
            self._reply(opt, C.REP_ACK)
            return self._close("client aborted")
        try:
            if self.tls_required and not self.tls_active and opt != C.OPT_STARTTLS:
                raise _OptionError(C.REP_ERR_TLS_REQD, "TLS is required")
            if opt == C.OPT_LIST:
                self._list(data)
            elif opt == C.OPT_STARTTLS:
                return self._starttls(data)
            elif opt in (C.OPT_INFO, C.OPT_GO):
                return self._info_go(opt, data)
            elif opt == C.OPT_STRUCTURED_REPLY and not self.structured_available:
                raise _OptionError(C.REP_ERR_UNSUP, "structured replies are not offered")
            elif opt == C.OPT_STRUCTURED_REPLY:
                if data:
                    raise _OptionError(C.REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                self.structured = True
                self._reply(opt, C.REP_ACK)
            elif opt in (C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT):
                self._meta_context(opt, data)
            else:
                raise _OptionError(C.REP_ERR_UNSUP, "option %d not supported" % opt)
        except _OptionError as e:
            self._reply(opt, e.rep, str(e).encode("utf-8"))
        return None

    def _lookup(self, name):
        export = self.table.get(name)
        if export is None and name == "" and len(self.table.names()) == 1:
            export = self.table.get(self.table.names()[0])   # the default export
        return export

    def _export_name(self, data):
        if self.tls_required and not self.tls_active:
            return self._close("EXPORT_NAME before TLS")
        if len(data) > C.MAX_STRING:
            return self._close("export name too long")
        try:
            export = self._lookup(_decode(data))
        except _OptionError:
            export = None
        if export is None:
            return self._close("unknown export %r" % bytes(data))
        try:
            backend = self.table.acquire(export.name)
        except OSError as e:
            return self._close("cannot open %s: %s" % (export.path, e))
        size = backend.size
        # A selection made for another export does not carry over.
        contexts = self._selected(export)
        flags = transmission_flags(export, self.structured)
        self._out += struct.pack(">QH", size, flags)
        if not self.no_zeroes:
            self._out += bytes(124)
        self._state = "done"
        return Ready(export, backend, size, flags, self.structured, contexts)

    def _list(self, data):
        if data:
            raise _OptionError(C.REP_ERR_INVALID, "LIST takes no data")
        for name in self.table.names():
            raw = name.encode("utf-8")
            desc = self.table.get(name).description.encode("utf-8")
            self._reply(C.OPT_LIST, C.REP_SERVER, struct.pack(">I", len(raw)) + raw + desc)
        self._reply(C.OPT_LIST, C.REP_ACK)

    def _starttls(self, data):
        if not self.tls_available:
            raise _OptionError(C.REP_ERR_UNSUP, "TLS is not configured")
        if data:
            raise _OptionError(C.REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_active:
            raise _OptionError(C.REP_ERR_INVALID, "TLS is already active")
        if self._in:
            return self._close("data after STARTTLS")
        self._reply(C.OPT_STARTTLS, C.REP_ACK)
        self.tls_active = True
        self._reset_options()
        return StartTLS()

    def _info_go(self, opt, data):
        r = _Reader(data)
        name = r.string()
        requests = [r.u16() for _ in range(r.u16())]
        r.end()
        export = self._lookup(name)
        if export is None:
            raise _OptionError(C.REP_ERR_UNKNOWN, "no export named %r" % name)
        try:
            backend = self.table.acquire(export.name)
        except OSError as e:
            raise _OptionError(C.REP_ERR_UNKNOWN, "export %r cannot be opened: %s"
                               % (name, e.strerror or e))
        try:
            size = backend.size
            flags = transmission_flags(export, self.structured)
            self._info(opt, struct.pack(">HQH", C.INFO_EXPORT, size, flags))
            if C.INFO_NAME in requests:
                self._info(opt, struct.pack(">H", C.INFO_NAME) + export.name.encode("utf-8"))
            if C.INFO_DESCRIPTION in requests and export.description:
                self._info(opt, struct.pack(">H", C.INFO_DESCRIPTION)
                           + export.description.encode("utf-8"))
            self._info(opt, struct.pack(">HIII", C.INFO_BLOCK_SIZE, *block_sizes(backend)))
            contexts = self._selected(export)
            self._reply(opt, C.REP_ACK)
        except BaseException:
            self.table.release(export.name)
            raise
        if opt == C.OPT_INFO:
            self.table.release(export.name)
            return None
        self._state = "done"
        return Ready(export, backend, size, flags, self.structured, contexts)

    def _info(self, opt, payload):
        self._reply(opt, C.REP_INFO, payload)

    def _selected(self, export):
        if self._meta_export is not export:
            return []
        return [(cid, name, export.contexts[name]) for cid, name in self._meta]

    def _meta_context(self, opt, data):
        if opt == C.OPT_SET_META_CONTEXT and not self.structured:
            raise _OptionError(C.REP_ERR_INVALID, "structured replies not negotiated")
        r = _Reader(data)
        name = r.string()
        queries = [r.string() for _ in range(r.u32())]
        r.end()
        export = self._lookup(name)
        if export is None:
            raise _OptionError(C.REP_ERR_UNKNOWN, "no export named %r" % name)
        names = list(export.contexts)
        if not queries and opt == C.OPT_LIST_META_CONTEXT:
            chosen = names
        else:
            chosen = [n for n in names if any(_matches(q, n) for q in queries)]
        ids = [(names.index(n) + 1, n) for n in chosen]   # stable per export
        for cid, cname in ids:
            self._reply(opt, C.REP_META_CONTEXT, struct.pack(">I", cid) + cname.encode("utf-8"))
        if opt == C.OPT_SET_META_CONTEXT:
            self._meta_export = export
            self._meta = ids
        self._reply(opt, C.REP_ACK)


def _matches(query, name):
    """"ns:" or "ns:prefix:" queries select everything under them; other
    queries select the context of exactly that name."""
    if query.endswith(":"):
        return name.startswith(query)
    return name == query
