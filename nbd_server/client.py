"""A small blocking NBD client for health checks and `zfs-ng nbd ls`: lists
the exports of a running server with their size, flags and meta contexts
(NBD_OPT_LIST, NBD_OPT_INFO, NBD_OPT_LIST_META_CONTEXT), then NBD_OPT_ABORT."""

import socket
import struct

from nbd_server import constants as C

_REP = struct.Struct(">QIII")


class ClientError(Exception):
    pass


def _recv(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ClientError("server closed the connection")
        buf += chunk
    return bytes(buf)


def _option(sock, opt, data=b""):
    sock.sendall(struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, ropt, rtype, n = _REP.unpack(_recv(sock, _REP.size))
        if magic != C.REPLY_MAGIC or ropt != opt or n > 1 << 20:
            raise ClientError("bad option reply")
        payload = _recv(sock, n)
        if rtype & (1 << 31):
            raise ClientError("option %d refused (0x%x): %s"
                              % (opt, rtype, payload.decode("utf-8", "replace")))
        if rtype == C.REP_ACK:
            return replies
        replies.append((rtype, payload))


def _name(name):
    raw = name.encode("utf-8")
    return struct.pack(">I", len(raw)) + raw


def connect(unix_path=None, tcp=None, timeout=10.0):
    if unix_path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = unix_path
    else:
        host, port = tcp
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        address = (host, port)
    s.settimeout(timeout)
    try:
        s.connect(address)
        magic, opt, flags = struct.unpack(">QQH", _recv(s, 18))
        if (magic, opt) != (C.NBDMAGIC, C.IHAVEOPT) or not flags & C.FLAG_FIXED_NEWSTYLE:
            raise ClientError("not a fixed-newstyle NBD server")
        s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
    except BaseException:
        s.close()
        raise
    return s


def list_exports(unix_path=None, tcp=None, timeout=10.0):
    """[{name, description, size, readonly, multi_conn, contexts}] of a server.
    Raises ClientError or OSError."""
    s = connect(unix_path, tcp, timeout)
    try:
        out = []
        for rtype, payload in _option(s, C.OPT_LIST):
            if rtype != C.REP_SERVER or len(payload) < 4:
                continue
            (n,) = struct.unpack(">I", payload[:4])
            out.append({"name": payload[4:4 + n].decode("utf-8", "replace"),
                        "description": payload[4 + n:].decode("utf-8", "replace")})
        for e in out:
            for rtype, payload in _option(s, C.OPT_INFO, _name(e["name"]) + b"\0\0"):
                if rtype == C.REP_INFO and payload[:2] == b"\0\0":
                    size, flags = struct.unpack(">QH", payload[2:12])
                    e["size"] = size
                    e["readonly"] = bool(flags & C.FLAG_READ_ONLY)
                    e["multi_conn"] = bool(flags & C.FLAG_CAN_MULTI_CONN)
            e["contexts"] = [p[4:].decode("utf-8", "replace") for t, p in
                             _option(s, C.OPT_LIST_META_CONTEXT,
                                     _name(e["name"]) + struct.pack(">I", 0))
                             if t == C.REP_META_CONTEXT]
        try:
            _option(s, C.OPT_ABORT)
        except (ClientError, OSError):
            pass        # the server may close before its ACK arrives
        return out
    finally:
        s.close()
