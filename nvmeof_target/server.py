"""The event loop: non-blocking sockets on one selector (Python 3.6 API), one
Queue state machine per TCP connection, the control socket, and a once-a-second
tick for keep-alive timeouts and connection deadlines.  Shuts down cleanly on
SIGTERM/SIGINT.

What the network gets is bounded (limits.py): connection slots, the time to
complete ICReq + Connect, bytes buffered per connection and in all.  A queue
over its budget is not read (its host's sends stop on TCP back-pressure) until
its host reads the replies.  One receive buffer serves every connection (the
queues copy what they keep).  At EMFILE/ENFILE accepting pauses (0.1 s, then
longer up to 2 s) while the connections already there go on; repeated log
lines are rate-limited.

One Server is one process's loop; service.serve() runs one, or several in
worker processes (workers.py)."""

import collections
import errno
import logging
import selectors
import socket
import time

from . import control, io
from .aio import Aio
from .filespan import FileSpan
from .limits import Budget, Limits
from .queue import Queue

log = logging.getLogger("nvmeof_target")

RECV_SIZE = 1 << 18
IOV_MAX = 512
DEFAULT_PORT = 4420
MSG_MORE = getattr(socket, "MSG_MORE", 0)
ACCEPT_BACKOFF = (0.1, 2.0)      # pause accepting at EMFILE: first, longest (doubling)
_NO_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class RateLog(object):
    """A log line per `interval` seconds and key at most; the lines held back
    are counted into the next one."""

    def __init__(self, interval=10.0, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self._last = {}
        self._held = collections.Counter()

    def __call__(self, level, key, msg, *args):
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held[key] += 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            msg += " (and %d more times in %.0f s)" % (held, self.interval)
        log.log(level, msg, *args)


class Conn(object):
    def __init__(self, server, sock, peer):
        self.server = server
        self.sock = sock
        self.host = peer[0]
        local = sock.getsockname()
        limits = server.limits
        self.queue = Queue(server.target, local_addr=(local[0], local[1]), peer="%s:%s" % peer[:2],
                           conn_buffer=limits.conn_buffer, budget=server.budget)
        self.queue.wakeup = self._wakeup
        self.queue.aio = server.aio
        self.mask = selectors.EVENT_READ
        self.closed = False
        self.pending = True          # ICReq + Connect not done yet
        self.deadline = server.target.now() + limits.connect_timeout

    def _wakeup(self):
        self.server.dirty.add(self)

    def on_event(self, mask):
        # closed earlier in this same batch of events (a controller torn down
        # by another connection's handler drops its queues here): nothing to do
        if self.closed:
            return
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def _read(self):
        q = self.queue
        rbuf, rview = self.server.rbuf, self.server.rview
        for _ in range(8):        # bounded: other connections get their turn
            try:
                n = self.sock.recv_into(rbuf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.info("%s: %s", q.peer, e)
                return self.close()
            if n == 0:
                return self.close()
            q.crowded = self.server.crowded
            q.data_received(rview[:n])
            if self.pending and q.established:
                self.server.established(self)
            if not q.wants_input():
                self.server.dirty.add(self)       # flush() drops EVENT_READ
                return
            if n < RECV_SIZE:
                return

    def flush(self):
        q = self.queue
        out = q.out
        self._send(q, out, self.sock)
        if self.closed:
            return
        if q.paused:
            q.resume()              # may queue more output: the server flushes again
            if self.pending and q.established:
                self.server.established(self)
        if not out and q.closing:
            return self.close()
        mask = 0
        if out:
            mask |= selectors.EVENT_WRITE
        if q.wants_input():
            mask |= selectors.EVENT_READ
        if q.closing and not self.closed:
            self.server.closing(self)
        if mask != self.mask:
            self.mask = mask
            if mask:
                self.server.sel.modify(self.sock, mask, self)
            else:
                self.server.sel.unregister(self.sock)

    def _send(self, q, out, sock):
        while out:
            try:
                if type(out[0]) is FileSpan:
                    span = out[0]
                    before = span.length
                    try:
                        done = span.send(sock)
                    finally:
                        q.sent(before - span.length)
                    if done:
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
            q.sent(sent)
            while sent:
                n = len(out[0])
                if sent >= n:
                    out.pop(0)
                    sent -= n
                else:
                    out[0] = memoryview(out[0])[sent:]
                    sent = 0

    def close(self):
        if self.closed:
            return
        self.closed = True
        server = self.server
        # reads queued this turn name the backend's fd by number: hand them to
        # the kernel (which then holds the file) before anything can close it
        if server.aio.queued:
            server.aio.flush()
        server.aio.drop_waiting(self.queue)      # I/O not started: never acknowledged
        if self.mask:
            server.sel.unregister(self.sock)
        self.mask = 0
        try:
            self.sock.close()
        finally:
            server.forget(self)
            self.queue.connection_lost()
            self.sock = None


class Server(object):
    def __init__(self, target, listen=(("127.0.0.1", DEFAULT_PORT),), control_path=None,
                 reuse_port=False, limits=None):
        self.target = target
        self.limits = limits or Limits()
        self.budget = Budget(self.limits.total_buffer)
        self.rbuf = bytearray(RECV_SIZE)        # every connection's receive buffer
        self.rview = memoryview(self.rbuf)
        self.sel = selectors.DefaultSelector()
        self.conns = set()
        self.dirty = set()
        self.pending = collections.OrderedDict()   # conn -> None, oldest first
        self.pending_by_host = {}                  # address -> OrderedDict of its pending
        self.lingering = collections.OrderedDict()  # closing conn -> deadline
        self.counters = collections.Counter()
        self.ratelog = RateLog()
        self.listeners = []
        self._accept_paused = None      # (resume at, current delay) while out of fds
        self._accept_delay = 0.0
        self._stop = False
        self.crowded = False          # this batch of events is more than one
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, self)
        self.aio = Aio(self.sel, io.read_done, write_done=io.write_done)
        target.io_stats = self.stats
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

    def stats(self):
        """The loop's counters (Target.stats merges them in)."""
        d = dict(self.aio.stats())
        d.update(connections=len(self.conns), pending_connections=len(self.pending),
                 buffered_bytes=self.budget.used, accepting=self._accept_paused is None)
        for k in ("refused_connections", "evicted_connections", "connect_timeouts",
                  "accept_errors"):
            d[k] = self.counters[k]
        return d

    # ---- connections ------------------------------------------------------------------
    def _accept(self, lsock):
        limits = self.limits
        for _ in range(64):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if self.accept_failed(e):
                    return
                continue
            self._accept_delay = 0.0
            if len(self.conns) >= limits.max_connections:
                self.counters["refused_connections"] += 1
                self.ratelog(logging.WARNING, "full", "%s: refused: %d connections already",
                             peer[0], len(self.conns))
                sock.close()
                continue
            host = peer[0]
            mine = self.pending_by_host.get(host)
            if mine is not None and len(mine) >= limits.max_pending_per_host:
                self._evict(next(iter(mine)), "%d pending connections from %s" % (len(mine), host))
            elif len(self.pending) >= limits.max_pending:
                self._evict(next(iter(self.pending)), "%d pending connections" % len(self.pending))
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn = Conn(self, sock, peer)
            except OSError as e:       # reset before we got to it
                log.info("%s: %s", peer[0], e)
                sock.close()
                continue
            self.conns.add(conn)
            self.pending[conn] = None
            self.pending_by_host.setdefault(host, collections.OrderedDict())[conn] = None
            self.sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self, conn, why):
        self.counters["evicted_connections"] += 1
        self.ratelog(logging.WARNING, "evict", "%s: closed before Connect: %s", conn.queue.peer,
                     why)
        conn.close()

    def accept_failed(self, e):
        """accept() raised e; True when accepting is paused (out of fds: the
        listeners stay readable, polling them would spin), so the connections
        already there are served meanwhile."""
        self.counters["accept_errors"] += 1
        if e.errno not in _NO_FDS:
            self.ratelog(logging.WARNING, "accept", "accept: %s", e)
            return False
        if self._accept_paused is None:
            self._accept_delay = min(max(self._accept_delay * 2, ACCEPT_BACKOFF[0]),
                                     ACCEPT_BACKOFF[1])
            self._accept_paused = self.target.now() + self._accept_delay
            for s, _ in self._acceptors():
                self.sel.unregister(s)
        self.ratelog(logging.ERROR, "nofd", "accept: %s: not accepting for %.1f s (%d "
                     "connections)", e.strerror or e, self._accept_delay, len(self.conns))
        return True

    def _acceptors(self):
        out = [(s, self) for s in self.listeners]
        if self.control is not None:
            out.append((self.control.sock, self.control))
        return out

    def _resume_accepting(self):
        self._accept_paused = None
        for s, owner in self._acceptors():
            self.sel.register(s, selectors.EVENT_READ, owner)

    def established(self, conn):
        """conn completed ICReq + Connect: off the connect deadline."""
        self._unpend(conn)

    def closing(self, conn):
        """conn's queue wants to close once its output is out: not forever."""
        if conn not in self.lingering:
            self.lingering[conn] = self.target.now() + self.limits.close_linger

    def _unpend(self, conn):
        if conn.pending:
            conn.pending = False
            self.pending.pop(conn, None)
            mine = self.pending_by_host.get(conn.host)
            if mine is not None:
                mine.pop(conn, None)
                if not mine:
                    del self.pending_by_host[conn.host]

    def forget(self, conn):
        """conn is closed: drop every reference the server holds to it."""
        self.conns.discard(conn)
        self.dirty.discard(conn)
        self.lingering.pop(conn, None)
        self._unpend(conn)

    def _deadlines(self):
        """Once a second: connections past the Connect deadline, and closing
        ones whose host does not read their last bytes."""
        now = self.target.now()
        while self.pending:
            conn = next(iter(self.pending))
            if conn.deadline > now:
                break
            self.counters["connect_timeouts"] += 1
            self.ratelog(logging.INFO, "deadline", "%s: no Connect within %.0f s: closed",
                         conn.queue.peer, self.limits.connect_timeout)
            conn.close()
        while self.lingering:
            conn, deadline = next(iter(self.lingering.items()))
            if deadline > now:
                break
            conn.close()

    def stop(self):
        """Safe from a signal handler: wakes the loop, which then shuts down."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _flush_dirty(self):
        aio = self.aio
        if aio.queued:
            aio.flush()
        flushed = []
        while self.dirty:
            batch, self.dirty = self.dirty, set()
            for conn in batch:
                if not conn.closed:
                    conn.flush()
                    flushed.append(conn)
        if aio.lent:
            # read data went out as views of the AIO slots (no copy): what a
            # host did not take yet is copied, then the slots are free again
            aio.reclaim([c.queue.out for c in flushed if not c.closed])

    def serve_forever(self, tick=None, shutdown=True):
        """Run until stop(); tick() (if given) runs once a second."""
        now = self.target.now
        next_tick = now() + 1.0
        while not self._stop:
            wake = next_tick
            if self._accept_paused is not None:
                if now() >= self._accept_paused:
                    self._resume_accepting()
                else:
                    wake = min(wake, self._accept_paused)
            timeout = max(0.0, wake - now())
            events = self.sel.select(timeout)
            # other connections (or completions) have work too: no queue may
            # hold the loop for a synchronous read now (Queue.lone_read)
            self.crowded = len(events) > 1
            for key, mask in events:
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
            # once per batch of events: one io_submit for the I/O of every
            # connection that had input, then each connection's replies
            self._flush_dirty()
            if now() >= next_tick:
                next_tick = now() + 1.0
                self.target.expire()
                self._deadlines()
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
        if self._accept_paused is not None:      # the control socket unregisters itself
            self._resume_accepting()
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
