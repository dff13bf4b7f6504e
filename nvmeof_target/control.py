"""The target's local control socket: a unix stream socket carrying JSON lines.

Request  {"op": "add", "args": {...}}      Response {"ok": true, "result": ...}
                                                 or {"ok": false, "error": "message"}

Ops: add(nqn, path, uuid, readonly, allowed_hosts, allow_any_host, block_size,
require_auth), remove(nqn), allow(nqn, hostnqn), deny(nqn, hostnqn),
set_allow_any(nqn, value), notify(nqn) (alias resize: the volume changed size),
get(nqn), list(), stats(); DH-HMAC-CHAP (auth.py): set_host_key(hostnqn, secret,
ctrl_secret, hash, dhgroup), remove_host_key(hostnqn), host_keys() (never the
secrets), set_auth_required(nqn or "*", value).
`Client` is what the datapath plugins and the CLI use."""

import json
import logging
import os
import selectors
import socket

log = logging.getLogger("nvmeof_target")

DEFAULT_SOCKET = "/run/zfs-ng/target.sock"
MAX_LINE = 1 << 20


class ControlError(Exception):
    pass


def handle(target, request):
    """Execute one decoded request against the target; returns the response dict."""
    try:
        if not isinstance(request, dict):
            raise ValueError("request must be a JSON object")
        op = request.get("op")
        args = request.get("args") or {}
        if not isinstance(args, dict):
            raise ValueError("args must be a JSON object")
        fn = _OPS.get(op)
        if fn is None:
            raise ValueError("unknown op %r" % (op,))
        return {"ok": True, "result": fn(target, **args)}
    except TypeError as e:
        return {"ok": False, "error": "bad arguments: %s" % e}
    except (ValueError, KeyError) as e:
        return {"ok": False, "error": e.args[0] if e.args else str(e)}
    except Exception as e:  # a bad request must never stop the target
        log.exception("control request failed")
        return {"ok": False, "error": "internal error: %s" % e}


def _add(t, nqn, path, uuid, readonly=False, allowed_hosts=(), allow_any_host=False,
         block_size=512, require_auth=False):
    if isinstance(allowed_hosts, str):
        raise ValueError("allowed_hosts must be a list")
    return t.add(nqn, path, uuid, bool(readonly), list(allowed_hosts), bool(allow_any_host),
                 int(block_size), bool(require_auth)).as_dict()


def _set_host_key(t, hostnqn, secret, ctrl_secret=None, hash="sha256", dhgroup="ffdhe2048"):
    for v in (secret, ctrl_secret, hash, dhgroup):
        if v is not None and not isinstance(v, str):
            raise ValueError("secrets, hash and dhgroup are strings")
    t.set_host_key(hostnqn, secret, ctrl_secret, hash, dhgroup)


def _get(t, nqn):
    vol = t.registry.get(nqn)
    if vol is None:
        raise KeyError("no subsystem %s" % nqn)
    d = vol.as_dict()
    d["allowed_hosts"] = t.registry.hosts(nqn)
    d["require_auth"] = t.registry.auth_required(nqn)
    sub = t.live.get(nqn)
    d["controllers"] = [{"cntlid": c.cntlid, "hostnqn": c.hostnqn, "io_queues": len(c.io_queues)}
                        for c in sorted(sub.controllers, key=lambda c: c.cntlid)] if sub else []
    return d


_OPS = {
    "add": _add,
    "remove": lambda t, nqn: t.remove(nqn),
    "allow": lambda t, nqn, hostnqn: t.allow(nqn, hostnqn),
    "deny": lambda t, nqn, hostnqn: t.deny(nqn, hostnqn),
    "set_allow_any": lambda t, nqn, value: t.set_allow_any(nqn, bool(value)),
    "notify": lambda t, nqn: t.notify(nqn),
    "resize": lambda t, nqn: t.notify(nqn),
    "get": _get,
    "set_host_key": _set_host_key,
    "remove_host_key": lambda t, hostnqn: t.remove_host_key(hostnqn),
    "host_keys": lambda t: t.registry.host_keys(),
    "set_auth_required": lambda t, nqn, value=True: t.set_auth_required(nqn, bool(value)),
    "list": lambda t: t.registry.list(),
    "stats": lambda t: dict(t.stats(), pid=os.getpid(), fds=_count_fds()),
}


def _count_fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


# ---- server side (inside the target's event loop) ---------------------------------------
class ControlServer(object):
    def __init__(self, server, path):
        self.server = server
        self.path = path
        d = os.path.dirname(path)
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o755)
        if os.path.exists(path):
            os.unlink(path)     # stale socket of a previous run
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)   # root-only: whoever talks here controls access
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(16)
        self.sock.setblocking(False)
        server.sel.register(self.sock, selectors.EVENT_READ, self)
        self.conns = set()

    def on_event(self, mask):
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:         # out of fds: the server pauses its listeners, this one too
            return self.server.accept_failed(e)
        sock.setblocking(False)
        c = _ControlConn(self, sock)
        self.conns.add(c)
        self.server.sel.register(sock, selectors.EVENT_READ, c)

    def close(self):
        for c in list(self.conns):
            c.close()
        self.server.sel.unregister(self.sock)
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _ControlConn(object):
    def __init__(self, owner, sock):
        self.owner = owner
        self.sock = sock
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False

    def on_event(self, mask):
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return self.close()
            if data == b"":
                return self.close()
            if data:
                self.inbuf += data
                if len(self.inbuf) > MAX_LINE and b"\n" not in self.inbuf:
                    return self.close()
                while b"\n" in self.inbuf:
                    line, _, rest = bytes(self.inbuf).partition(b"\n")
                    self.inbuf = bytearray(rest)
                    try:
                        req = json.loads(line.decode("utf-8"))
                    except ValueError as e:
                        resp = {"ok": False, "error": "bad JSON: %s" % e}
                    else:
                        resp = handle(self.owner.server.target, req)
                    self.outbuf += json.dumps(resp).encode("utf-8") + b"\n"
                self.owner.server._flush_dirty()     # e.g. AENs a resize produced
        self._flush()

    def _flush(self):
        while self.outbuf:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return self.close()
            del self.outbuf[:n]
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.outbuf else 0)
        self.owner.server.sel.modify(self.sock, mask, self)

    def close(self):
        if not self.closed:
            self.closed = True
            self.owner.server.sel.unregister(self.sock)
            self.sock.close()
            self.owner.conns.discard(self)


# ---- client -----------------------------------------------------------------------
class Client(object):
    """Blocking client: Client().add(nqn, path, uuid, allowed_hosts=[...])."""

    def __init__(self, path=None, timeout=30.0):
        self.path = path or os.environ.get("ZFSNG_TARGET_SOCKET", DEFAULT_SOCKET)
        self.timeout = timeout
        self._sock = None
        self._buf = b""

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as e:
            s.close()
            raise ControlError("cannot reach the NVMe/TCP target at %s: %s (is `zfs-ng target "
                               "serve` running?)" % (self.path, e.strerror or e))
        self._sock = s

    def call(self, op, **args):
        if self._sock is None:
            self._connect()
        try:
            self._sock.sendall(json.dumps({"op": op, "args": args}).encode("utf-8") + b"\n")
            while b"\n" not in self._buf:
                chunk = self._sock.recv(1 << 16)
                if not chunk:
                    raise ControlError("the target closed the control connection")
                self._buf += chunk
        except OSError as e:
            self.close()
            raise ControlError("control socket %s: %s" % (self.path, e))
        line, _, self._buf = self._buf.partition(b"\n")
        resp = json.loads(line.decode("utf-8"))
        if not resp.get("ok"):
            raise ControlError(resp.get("error", "unknown error"))
        return resp.get("result")

    def add(self, nqn, path, uuid, readonly=False, allowed_hosts=(), allow_any_host=False,
            block_size=512, require_auth=False):
        args = dict(nqn=nqn, path=path, uuid=str(uuid), readonly=readonly,
                    allowed_hosts=list(allowed_hosts), allow_any_host=allow_any_host,
                    block_size=block_size)
        if require_auth:            # an older target does not know the argument
            args["require_auth"] = True
        return self.call("add", **args)

    def set_host_key(self, hostnqn, secret, ctrl_secret=None, hash="sha256",
                     dhgroup="ffdhe2048"):
        """The host's DH-HMAC-CHAP secret (DHHC-1:...), optionally the
        controller secret for bidirectional authentication."""
        return self.call("set_host_key", hostnqn=hostnqn, secret=secret,
                         ctrl_secret=ctrl_secret, hash=hash, dhgroup=dhgroup)

    def remove_host_key(self, hostnqn):
        return self.call("remove_host_key", hostnqn=hostnqn)

    def host_keys(self):
        return self.call("host_keys")

    def set_auth_required(self, nqn, value=True):
        """nqn, or "*" for every subsystem."""
        return self.call("set_auth_required", nqn=nqn, value=bool(value))

    def remove(self, nqn):
        return self.call("remove", nqn=nqn)

    def allow(self, nqn, hostnqn):
        return self.call("allow", nqn=nqn, hostnqn=hostnqn)

    def deny(self, nqn, hostnqn):
        return self.call("deny", nqn=nqn, hostnqn=hostnqn)

    def set_allow_any(self, nqn, value=True):
        return self.call("set_allow_any", nqn=nqn, value=bool(value))

    def notify(self, nqn):
        """The volume was resized: connected hosts get a namespace-changed AEN."""
        return self.call("notify", nqn=nqn)

    resize = notify

    def get(self, nqn):
        return self.call("get", nqn=nqn)

    def list(self):
        return self.call("list")

    def stats(self):
        return self.call("stats")

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
