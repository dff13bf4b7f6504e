"""The one NBD client of the project (blocking sockets): enough for our
server, qemu-nbd and nbdkit.

  Connection(label, unix=PATH | tcp=(HOST, PORT))  a socket past the fixed
      newstyle greeting; option() haggles.
  list_exports(unix_path=, tcp=)  every export with its size, flags and meta
      contexts (NBD_OPT_LIST, _INFO, _LIST_META_CONTEXT, then NBD_OPT_ABORT):
      `zfs-ng nbd ls` and health checks.
  Reader(uri, contexts)  one export opened for reading (structured replies,
      meta contexts such as base:allocation and qemu:dirty-bitmap:NAME, GO),
      then READ and BLOCK_STATUS: the backup engine (sr_tools/backup).

URIs (parse_uri): nbd+unix:///NAME?socket=PATH and nbd://HOST[:PORT]/NAME
(NAME may be empty: the default export).  No nbds:// URIs; a Connection made
with tls=(ssl context, server hostname) does NBD_OPT_STARTTLS right after the
greeting (client certificates are the context's): the nbd+tls relay
(plugins/datapath/nbd_relay.py) opens the node's export so, with go().

Failures are NbdError, the message meant for the user and led by the
connection's label (the URI, or the address); connecting and the handshake
wrap OSError in it too."""

import socket
import struct
from urllib.parse import parse_qs, unquote, urlsplit

from nbd_server import constants as C

_OPT_REPLY = struct.Struct(">QIII")
_CHUNK_REST = struct.Struct(">HHQI")     # after the magic
MAX_READ = 32 << 20
_ERROR = 1 << 31                         # option reply types with this bit are errors


class NbdError(Exception):
    """NBD failure; the message is meant for the user."""


class NbdRefused(NbdError):
    """The server answered and refused the export (no such export, or not
    for this client)."""


def parse_uri(uri):
    """{"unix": path} or {"tcp": (host, port)}, plus "name"."""
    u = urlsplit(uri)
    name = unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket")
        if not sock or u.netloc:
            raise NbdError("%s: nbd+unix URIs look like nbd+unix:///NAME?socket=PATH" % uri)
        return {"unix": sock[0], "name": name}
    if u.scheme == "nbd":
        if not u.hostname:
            raise NbdError("%s: no host" % uri)
        try:
            port = u.port or 10809
        except ValueError:
            raise NbdError("%s: bad port" % uri)
        return {"tcp": (u.hostname, port), "name": name}
    raise NbdError("%s: only nbd:// and nbd+unix:// URIs are supported" % uri)


def _name(name):
    raw = name.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


class Connection(object):
    """A connection in the option haggling phase.  Subclasses add what they
    negotiate in _negotiate(); a failure there closes the socket."""

    def __init__(self, label, unix=None, tcp=None, timeout=60.0, tls=None):
        self.label = label
        self._tls = tls
        if unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address = unix
        else:
            host, port = tcp
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                              socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (host, port)
        s.settimeout(timeout)
        self.sock = s
        try:
            s.connect(address)
            self._greeting()
            if tls is not None:
                self._starttls(*tls)
            self._negotiate()
        except socket.timeout:
            s.close()
            raise NbdError("%s: timed out" % label)
        except OSError as e:
            s.close()
            raise NbdError("%s: %s" % (label, e))
        except BaseException:
            s.close()
            raise

    def _greeting(self):
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if (magic, opt) != (C.NBDMAGIC, C.IHAVEOPT) or not flags & C.FLAG_FIXED_NEWSTYLE:
            raise NbdError("%s: not a fixed-newstyle NBD server" % self.label)
        cflags = C.FLAG_C_FIXED_NEWSTYLE | (flags & C.FLAG_NO_ZEROES and C.FLAG_C_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))

    def _starttls(self, context, hostname):
        rtype, msg, _ = self.option(C.OPT_STARTTLS)
        if rtype != C.REP_ACK:
            raise NbdError("%s: the server refused TLS: %s" % (
                self.label, msg.decode("utf-8", "replace") or hex(rtype)))
        self.sock = context.wrap_socket(self.sock, server_hostname=hostname)

    def _negotiate(self):
        """The options after the greeting (none here)."""

    def go(self, name):
        """NBD_OPT_GO for export `name` -> (size, transmission flags); a
        refusal is NbdRefused."""
        rtype, msg, replies = self.option(C.OPT_GO, _name(name) + struct.pack(">H", 0))
        if rtype != C.REP_ACK:
            raise NbdRefused("%s: export %r refused: %s" % (
                self.label, name, msg.decode("utf-8", "replace") or hex(rtype)))
        for t, p in replies:
            if t == C.REP_INFO and len(p) >= 12 and p[:2] == b"\0\0":
                return struct.unpack(">QH", p[2:12])
        raise NbdError("%s: no export size in the GO reply" % self.label)

    def _recv(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise NbdError("%s: the server closed the connection" % self.label)
            got += k
        return buf

    def option(self, opt, data=b""):
        """Send option opt -> (final reply type, its payload, [(type, payload)]
        of the replies before it); an error type is returned, not raised."""
        self.sock.sendall(struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, ropt, rtype, n = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            if magic != C.REPLY_MAGIC or ropt != opt or n > 1 << 20:
                raise NbdError("%s: bad option reply" % self.label)
            payload = bytes(self._recv(n))
            if rtype & _ERROR or rtype == C.REP_ACK:
                return rtype, payload, replies
            replies.append((rtype, payload))

    def option_ok(self, opt, data=b""):
        """option() that raises NbdError on an error reply -> the replies."""
        rtype, payload, replies = self.option(opt, data)
        if rtype & _ERROR:
            raise NbdError("%s: option %d refused (0x%x): %s" % (
                self.label, opt, rtype, payload.decode("utf-8", "replace")))
        return replies

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def list_exports(unix_path=None, tcp=None, timeout=10.0):
    """[{name, description, size, readonly, multi_conn, contexts}] of a server.
    Raises NbdError or OSError."""
    conn = Connection(unix_path or "%s:%s" % tuple(tcp), unix_path, tcp, timeout)
    try:
        out = []
        for rtype, payload in conn.option_ok(C.OPT_LIST):
            if rtype != C.REP_SERVER or len(payload) < 4:
                continue
            (n,) = struct.unpack(">I", payload[:4])
            out.append({"name": payload[4:4 + n].decode("utf-8", "replace"),
                        "description": payload[4 + n:].decode("utf-8", "replace")})
        for e in out:
            for rtype, payload in conn.option_ok(C.OPT_INFO, _name(e["name"]) + b"\0\0"):
                if rtype == C.REP_INFO and payload[:2] == b"\0\0":
                    size, flags = struct.unpack(">QH", payload[2:12])
                    e["size"] = size
                    e["readonly"] = bool(flags & C.FLAG_READ_ONLY)
                    e["multi_conn"] = bool(flags & C.FLAG_CAN_MULTI_CONN)
            e["contexts"] = [p[4:].decode("utf-8", "replace") for t, p in
                             conn.option_ok(C.OPT_LIST_META_CONTEXT,
                                            _name(e["name"]) + struct.pack(">I", 0))
                             if t == C.REP_META_CONTEXT]
        try:
            conn.option_ok(C.OPT_ABORT)
        except (NbdError, OSError):
            pass        # the server may close before its ACK arrives
        return out
    finally:
        conn.close()


class Reader(Connection):
    """One connection to one export, read-only use: size, flags, readonly,
    contexts ({name: id} of the meta contexts the server granted)."""

    def __init__(self, uri, contexts=(), timeout=60.0):
        where = parse_uri(uri)
        self.uri = uri
        self.name = where["name"]
        self._wanted = list(contexts)
        self._cookie = 0
        Connection.__init__(self, uri, where.get("unix"), where.get("tcp"), timeout)

    # -- handshake ----------------------------------------------------------------

    def _negotiate(self):
        rtype, msg, _ = self.option(C.OPT_STRUCTURED_REPLY)
        if rtype != C.REP_ACK:
            raise NbdError("%s: the server has no structured replies (needed for block status)"
                           % self.uri)
        self.contexts = {}
        if self._wanted:
            data = _name(self.name) + struct.pack(">I", len(self._wanted))
            for c in self._wanted:
                data += _name(c)
            rtype, msg, replies = self.option(C.OPT_SET_META_CONTEXT, data)
            if rtype == C.REP_ACK:
                for t, p in replies:
                    if t == C.REP_META_CONTEXT and len(p) >= 4:
                        self.contexts[p[4:].decode("utf-8", "replace")] = \
                            struct.unpack(">I", p[:4])[0]
        self.size, self.flags = self.go(self.name)
        self.readonly = bool(self.flags & C.FLAG_READ_ONLY)

    # -- transmission -------------------------------------------------------------

    def _request(self, cmd, offset, length, flags=0):
        self._cookie += 1
        self.sock.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, flags, cmd, self._cookie,
                                      offset, length))
        return self._cookie

    def _chunks(self, cookie):
        """Yield (type, payload) of the reply to `cookie` until DONE; raises
        NbdError on an error reply."""
        while True:
            (magic,) = struct.unpack(">I", self._recv(4))
            if magic == C.SIMPLE_REPLY_MAGIC:
                err, ck = struct.unpack(">IQ", self._recv(12))
                if ck != cookie:
                    raise NbdError("%s: reply for an unknown request" % self.uri)
                if err:
                    raise NbdError("%s: server error %d" % (self.uri, err))
                yield None, b""
                return
            if magic != C.STRUCTURED_REPLY_MAGIC:
                raise NbdError("%s: bad reply magic 0x%x" % (self.uri, magic))
            flags, rtype, ck, n = _CHUNK_REST.unpack(self._recv(_CHUNK_REST.size))
            if ck != cookie:
                raise NbdError("%s: reply for an unknown request" % self.uri)
            payload = self._recv(n)
            if rtype & (1 << 15):
                err = struct.unpack(">I", payload[:4])[0] if n >= 4 else 0
                text = bytes(payload[6:]).decode("utf-8", "replace") if n >= 6 else ""
                raise NbdError("%s: server error %d %s" % (self.uri, err, text))
            yield rtype, payload
            if flags & C.REPLY_FLAG_DONE:
                return

    def read(self, offset, length):
        """length bytes at offset (holes come back as zeros)."""
        out = bytearray(length)
        pos = 0
        while pos < length:
            n = min(MAX_READ, length - pos)
            cookie = self._request(C.CMD_READ, offset + pos, n)
            for rtype, p in self._chunks(cookie):
                if rtype == C.REPLY_TYPE_OFFSET_DATA:
                    (o,) = struct.unpack(">Q", p[:8])
                    i = o - offset
                    if i < pos or i + len(p) - 8 > pos + n:
                        raise NbdError("%s: read reply out of range" % self.uri)
                    out[i:i + len(p) - 8] = p[8:]
                elif rtype == C.REPLY_TYPE_OFFSET_HOLE:
                    o, k = struct.unpack(">QI", p[:12])
                    i = o - offset
                    if i < pos or i + k > pos + n:
                        raise NbdError("%s: read reply out of range" % self.uri)
                    out[i:i + k] = bytes(k)
            pos += n
        return out

    def block_status(self, context, offset, length):
        """[(offset, length, flags)] of `context` covering at least part of
        [offset, offset+length), from offset on."""
        cid = self.contexts.get(context)
        if cid is None:
            raise NbdError("%s: the server does not offer %s" % (self.uri, context))
        length = min(length, 0xFFFFFFFF - 0xFFFF)
        cookie = self._request(C.CMD_BLOCK_STATUS, offset, length)
        out = []
        for rtype, p in self._chunks(cookie):
            if rtype != C.REPLY_TYPE_BLOCK_STATUS or len(p) < 4:
                continue
            if struct.unpack(">I", p[:4])[0] != cid:
                continue
            pos = offset
            for i in range(4, len(p) - 7, 8):
                n, fl = struct.unpack(">II", p[i:i + 8])
                out.append((pos, n, fl))
                pos += n
        if not out or out[0][1] == 0:
            raise NbdError("%s: empty block status reply" % self.uri)
        return out

    def extents(self, context, want, size=None):
        """Sorted [start, end) ranges of the whole export whose flags satisfy
        want(flags)."""
        size = self.size if size is None else size
        out = []
        pos = 0
        while pos < size:
            for o, n, fl in self.block_status(context, pos, size - pos):
                e = min(o + n, size)
                if want(fl) and e > o:
                    if out and out[-1][1] == o:
                        out[-1] = (out[-1][0], e)
                    else:
                        out.append((o, e))
                pos = e
                if pos >= size:
                    break
        return out

    def close(self):
        """NBD_CMD_DISC, then the socket closed."""
        if self.sock is None:
            return
        try:
            self._request(C.CMD_DISC, 0, 0)
        except OSError:
            pass
        Connection.close(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
