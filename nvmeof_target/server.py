"""The event loop: non-blocking sockets on one selector (Python 3.6 API), one
Queue state machine per TCP connection, the control socket, and a once-a-second
tick for keep-alive timeouts.  Shuts down cleanly on SIGTERM/SIGINT."""

import errno
import logging
import selectors
import signal
import socket

from . import control, io
from .aio import AioReads
from .filespan import FileSpan
from .queue import Queue
from .registry import Registry
from .target import Target

log = logging.getLogger("nvmeof_target")

RECV_SIZE = 1 << 18
IOV_MAX = 512
OUT_HIGH_WATER = 64          # buffers queued before we stop reading from that host
DEFAULT_PORT = 4420
MSG_MORE = getattr(socket, "MSG_MORE", 0)


def parse_listen(text):
    """'ADDR:PORT', '[v6]:PORT', 'ADDR' or ':PORT' -> (addr, port)."""
    addr, port = text, DEFAULT_PORT
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        addr, port = text.split(":")
    try:
        port = int(port)
    except ValueError:
        raise ValueError("bad port in %r" % text)
    if not 0 < port < 65536:
        raise ValueError("bad port in %r" % text)
    return addr or "127.0.0.1", port


class Conn(object):
    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        local = sock.getsockname()
        self.queue = Queue(server.target, local_addr=(local[0], local[1]), peer="%s:%s" % peer[:2])
        self.queue.wakeup = self._wakeup
        self.queue.aio = server.aio
        self.rbuf = bytearray(RECV_SIZE)
        self.rview = memoryview(self.rbuf)
        self.mask = selectors.EVENT_READ
        self.closed = False

    def _wakeup(self):
        self.server.dirty.add(self)

    def on_event(self, mask):
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def _read(self):
        for _ in range(8):        # bounded: other connections get their turn
            try:
                n = self.sock.recv_into(self.rbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.info("%s: %s", self.queue.peer, e)
                return self.close()
            if n == 0:
                return self.close()
            self.queue.data_received(self.rview[:n])
            if n < RECV_SIZE or self.queue.closing or len(self.queue.out) > OUT_HIGH_WATER:
                return

    def flush(self):
        q = self.queue
        out = q.out
        sock = self.sock
        while out:
            try:
                if type(out[0]) is FileSpan:
                    if out[0].send(sock):
                        out.pop(0)
                    continue
                bufs = []
                for b in out[:IOV_MAX]:
                    if type(b) is FileSpan:
                        break
                    bufs.append(b)
                # more follows right behind (sendfile data): no half-empty segment
                sent = sock.sendmsg(bufs, (), MSG_MORE if len(bufs) < len(out) else 0)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                log.info("%s: %s", q.peer, e)
                return self.close()
            while sent:
                n = len(out[0])
                if sent >= n:
                    out.pop(0)
                    sent -= n
                else:
                    out[0] = memoryview(out[0])[sent:]
                    sent = 0
        if not out and q.closing:
            return self.close()
        mask = 0
        if out:
            mask |= selectors.EVENT_WRITE
        if not q.closing and len(out) <= OUT_HIGH_WATER:
            mask |= selectors.EVENT_READ
        if mask != self.mask:
            self.mask = mask
            if mask:
                self.server.sel.modify(self.sock, mask, self)
            else:
                self.server.sel.unregister(self.sock)

    def close(self):
        if self.closed:
            return
        self.closed = True
        # reads queued this turn name the backend's fd by number: hand them to
        # the kernel (which then holds the file) before anything can close it
        if self.server.aio.queued:
            self.server.aio.flush()
        if self.mask:
            self.server.sel.unregister(self.sock)
        self.mask = 0
        try:
            self.sock.close()
        finally:
            self.server.conns.discard(self)
            self.queue.connection_lost()


class Server(object):
    def __init__(self, target, listen=(("127.0.0.1", DEFAULT_PORT),), control_path=None,
                 reuse_port=False):
        self.target = target
        self.sel = selectors.DefaultSelector()
        self.conns = set()
        self.dirty = set()
        self.listeners = []
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self)
        self.aio = AioReads(self.sel, io.read_done)
        target.io_stats = self.aio.stats
        for addr, port in listen:
            self._listen(addr, port, reuse_port)
        self.control = None
        if control_path:
            self.control = control.ControlServer(self, control_path)

    @property
    def addresses(self):
        return [s.getsockname()[:2] for s in self.listeners]

    def _listen(self, addr, port, reuse_port):
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((addr, port))
        s.listen(128)
        s.setblocking(False)
        self.sel.register(s, selectors.EVENT_READ, self)
        self.listeners.append(s)
        log.info("listening on %s:%d", *s.getsockname()[:2])

    def _accept(self, lsock):
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE):
                    log.error("accept: %s", e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock, peer)
            self.conns.add(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def stop(self):
        """Safe from a signal handler: wakes the loop, which then shuts down."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _flush_dirty(self):
        if self.aio.queued:
            self.aio.flush()
        while self.dirty:
            batch, self.dirty = self.dirty, set()
            for conn in batch:
                if not conn.closed:
                    conn.flush()

    def serve_forever(self, tick=None, shutdown=True):
        """Run until stop(); tick() (if given) runs once a second."""
        now = self.target.now
        next_tick = now() + 1.0
        while not self._stop:
            timeout = max(0.0, next_tick - now())
            for key, mask in self.sel.select(timeout):
                obj = key.data
                if obj is self:
                    if key.fileobj is self._wake_r:
                        try:
                            self._wake_r.recv(64)
                        except OSError:
                            pass
                    else:
                        self._accept(key.fileobj)
                else:
                    self._dispatch(obj, mask)
                self._flush_dirty()
            if now() >= next_tick:
                next_tick = now() + 1.0
                self.target.expire()
                if tick is not None:
                    tick()
                self._flush_dirty()
        if shutdown:
            self.shutdown()

    def _dispatch(self, obj, mask):
        try:
            obj.on_event(mask)
        except Exception:     # a bug on one connection must not stop the others
            log.exception("event handler failed; dropping that connection")
            close = getattr(obj, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("close failed")

    def shutdown(self):
        for s in self.listeners:
            self.sel.unregister(s)
            s.close()
        self.listeners = []
        if self.control:
            self.control.close()
        for conn in list(self.conns):
            conn.close()
        self.aio.close()
        self.target.close()
        self._flush_dirty()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()


def serve(listen, state, control_path, reuse_port=False, workers=1):
    """Run the target until SIGTERM/SIGINT (what `zfs-ng target serve` calls)."""
    if workers > 1:
        from .workers import run_workers
        return run_workers(workers, listen, state, control_path)
    registry = Registry(state)
    target = Target(registry)
    server = Server(target, listen, control_path, reuse_port)
    log.info("%d volumes in %s", registry.count(), state)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        registry.close()
        log.info("stopped")
    return 0
