"""The NBD server: listening sockets, one thread per connection (bounded), the
sans-IO handshake and transmission driven over blocking sockets.

A thread per connection keeps blocking disk I/O out of any event loop and
gives multi-conn clients (nbdcopy, qemu) parallel reads and writes.

Slots and memory are bounded whoever connects (issue 12):
  max_connections    connections at once.  When full, a new connection takes
                     the slot of the oldest one still in its handshake (a real
                     client finishes it in milliseconds); with none, it is
                     refused.
  max_per_client     connections of one TCP client address, at most half of
                     max_connections (unix socket peers are local and not
                     capped); at the cap, its oldest connection still in
                     handshake gives way, else it is refused.
  handshake_timeout  seconds for the whole handshake, TLS included (not per
                     read: a client trickling bytes does not hold a slot).
  idle_timeout       seconds a TCP connection may wait between requests after
                     GO (0: forever).  Unix socket connections never idle out
                     (kernel nbd and tapdisk sit idle as long as the VM does).
  request_timeout    seconds from the first byte of a request to its last
                     (a WRITE's payload that stops arriving).
  max_buffer         bytes of WRITE payloads held by all connections, a
                     quarter of it by one TCP client address; a connection
                     whose payload does not fit waits (it stops reading: TCP
                     back-pressure), at most request_timeout, then its
                     payload has request_timeout to arrive.
A WRITE's payload is allocated only after its header passed the read-only,
range and size checks (transmission.py); a refused one is read and dropped in
bounded chunks.
"""

import errno
import logging
import os
import queue
import selectors
import signal
import socket
import ssl
import stat
import threading
import time

from nbd_server import constants as C
from nbd_server.handshake import Closed, Handshake, Ready, StartTLS
from nbd_server.transmission import ProtocolError, RequestParser, Transmission

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
COALESCE = 64 * 1024          # small replies are joined into one send
DIRECT_RECV = 64 * 1024       # larger WRITE payloads are received in place
HANDSHAKE_TIMEOUT = 30.0      # the whole handshake (XO's own timeout is 60 s per message)
IDLE_TIMEOUT = 300.0          # TCP, between requests after GO
REQUEST_TIMEOUT = 60.0        # first byte to last of one request
MAX_PER_CLIENT = 32           # TCP connections per client address
MAX_BUFFER = 256 << 20        # WRITE payloads held at once
SEND_SLICE = 1 << 20          # TCP: a reply is sent a MiB at a time (progress checked)
TICK = 1.0                    # TCP: how often a blocked recv/send checks its deadlines


def parse_tcp(spec):
    """"ADDR:PORT" or "[V6ADDR]:PORT" -> (addr, port); raises ValueError."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("TCP address must be ADDR:PORT, got %r" % spec)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


class _Slot:
    """One connection, as the accept loop counts it."""
    __slots__ = ("sock", "client", "handshake", "evicted")

    def __init__(self, sock, client):
        self.sock = sock
        self.client = client        # TCP peer address, None for unix sockets
        self.handshake = True
        self.evicted = False


class _Budget:
    """Bytes of WRITE payloads the connections hold: `total` in all, a
    quarter of it per TCP client address.  acquire() waits for room; a
    payload always fits when its client holds nothing and nobody else does
    either (any request size works)."""

    def __init__(self, total):
        self.total = total
        self.share = max(1, total // 4)
        self.used = 0
        self._held = {}                 # client address -> bytes
        self._cond = threading.Condition()

    def _fits(self, n, client):
        if self.used and self.used + n > self.total:
            return False
        held = self._held.get(client, 0) if client is not None else 0
        return not held or held + n <= self.share

    def acquire(self, n, client, deadline):
        with self._cond:
            while not self._fits(n, client):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("no room for a %d-byte WRITE (%d bytes held)"
                                         % (n, self.used))
                self._cond.wait(left)
            self.used += n
            if client is not None:
                self._held[client] = self._held.get(client, 0) + n

    def release(self, n, client):
        if n:
            with self._cond:
                self.used -= n
                if client is not None:
                    left = self._held[client] - n
                    if left:
                        self._held[client] = left
                    else:
                        del self._held[client]
                self._cond.notify_all()


class Server:
    def __init__(self, table, unix_path=None, tcp=None, tls_context=None, tls_required=False,
                 max_connections=256, workers=1, max_per_client=MAX_PER_CLIENT,
                 handshake_timeout=HANDSHAKE_TIMEOUT, idle_timeout=IDLE_TIMEOUT,
                 request_timeout=REQUEST_TIMEOUT, max_buffer=MAX_BUFFER):
        """workers: requests of one connection executed at once.  1 runs them
        in order on the connection's thread (best for cached data: no thread
        hand-off, small replies coalesced); more lets a queue-depth client
        (kernel nbd, qemu) overlap slow zvol reads, replies then come in
        completion order, which the protocol allows.  The other limits: see
        the module's docstring."""
        if not unix_path and not tcp:
            raise ValueError("nothing to listen on: give a unix socket path or a TCP address")
        self.table = table
        self.unix_path = unix_path
        self.tcp = tcp
        self.tls_context = tls_context
        self.tls_required = tls_required
        self.max_connections = max_connections
        self.workers = max(1, int(workers))
        self.max_per_client = max_per_client
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout or None
        self.request_timeout = request_timeout
        self.budget = _Budget(max_buffer)
        self.listeners = []
        self.tcp_address = None
        self._conns = {}                      # thread -> _Slot, oldest first
        self._live = 0                        # connections not evicted
        self._per_client = {}                 # TCP address -> connections not evicted
        self.evicted = self.refused = 0
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False

    # -- listening ----------------------------------------------------------

    def listen(self):
        try:
            if self.unix_path:
                self.listeners.append(self._listen_unix(self.unix_path))
            if self.tcp:
                host, port = self.tcp
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                s = socket.socket(family, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, port))
                s.listen(64)
                self.tcp_address = s.getsockname()[:2]
                self.listeners.append(s)
        except BaseException:
            self._close_listeners()
            raise
        for s in self.listeners:
            log.info("listening on %s", s.getsockname() or self.unix_path)

    def _listen_unix(self, path):
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(errno.EADDRINUSE, "a server already listens on %s" % path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)               # stale socket of a dead server
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
            os.chmod(path, 0o660)
            s.listen(64)
        except BaseException:
            s.close()
            raise
        return s

    def _close_listeners(self):
        for s in self.listeners:
            s.close()
        self.listeners = []
        if self.unix_path:
            try:
                os.unlink(self.unix_path)
            except OSError:
                pass

    # -- main loop ------------------------------------------------------------

    def install_signal_handlers(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.shutdown())

    def shutdown(self):
        """Stop accepting and end every connection; safe from a signal handler."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve_forever(self):
        if not self.listeners:
            self.listen()
        sel = selectors.DefaultSelector()
        for s in self.listeners:
            sel.register(s, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    if key.fileobj == self._wake_r:
                        continue
                    self._accept(key.fileobj)
        finally:
            sel.close()
            self._stop_all()

    def _accept(self, listener):
        try:
            sock, peer = listener.accept()
        except OSError as e:
            log.warning("accept failed: %s", e)
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                time.sleep(0.1)             # the listener stays readable: do not spin
            return
        tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        client = peer[0] if tcp else None
        with self._lock:
            full = None
            if client is not None and self._per_client.get(client, 0) >= self._client_cap():
                full = "%d connections from %s" % (self._per_client[client], client)
                victim = self._oldest_in_handshake(client)
            elif self._live >= self.max_connections:
                full = "%d connections" % self._live
                victim = self._oldest_in_handshake(None)
            if full is not None:
                if victim is None:
                    self.refused += 1
                    log.warning("refusing a connection: %s", full)
                    sock.close()
                    return
                self._evict(victim, full)
            t = threading.Thread(target=self._connection, args=(sock, peer or "unix"),
                                 name="nbd-conn", daemon=True)
            self._conns[t] = _Slot(sock, client)
            self._live += 1
            if client is not None:
                self._per_client[client] = self._per_client.get(client, 0) + 1
        if tcp:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.start()

    def _client_cap(self):
        """One client address gets at most half of the slots."""
        return min(self.max_per_client, max(1, self.max_connections // 2))

    def _oldest_in_handshake(self, client):
        for slot in self._conns.values():
            if slot.handshake and not slot.evicted and (client is None or slot.client == client):
                return slot
        return None

    def _evict(self, slot, why):
        """Under the lock: slot's connection gives its place to a new one."""
        self.evicted += 1
        log.warning("closing a connection still in its handshake: %s", why)
        self._uncount(slot)
        slot.evicted = True
        _shutdown(slot.sock)

    def _uncount(self, slot):
        if not slot.evicted:
            self._live -= 1
            if slot.client is not None:
                n = self._per_client[slot.client] - 1
                if n:
                    self._per_client[slot.client] = n
                else:
                    del self._per_client[slot.client]

    def stats(self):
        with self._lock:
            return {"connections": len(self._conns), "live": self._live,
                    "handshakes": sum(s.handshake for s in self._conns.values()),
                    "evicted": self.evicted, "refused": self.refused,
                    "buffered": self.budget.used}

    def _stop_all(self):
        self._close_listeners()
        with self._lock:
            conns = list(self._conns.items())
        for _, slot in conns:
            _shutdown(slot.sock)
        for t, _ in conns:
            t.join(10)
        self.table.close_all()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("server stopped")

    # -- one connection ---------------------------------------------------------

    def _connection(self, sock, peer):
        me = threading.current_thread()
        ready = None
        table = self.table
        try:
            sock, ready, early, table = self._handshake(sock, peer)
            if ready is not None:
                log.info("%s: export %r (%s, %d bytes, %s replies, contexts %s)", peer,
                         ready.export.name, "ro" if ready.export.readonly else "rw", ready.size,
                         "structured" if ready.structured else "simple",
                         [name for _, name, _ in ready.contexts] or "none")
                # an SSL object is not safe for a recv in one thread and sends
                # in others (seen: EAGAIN mid-connection): TLS runs in order
                granted = _Recheck(table, ready.export.name)
                if self.workers > 1 and not isinstance(sock, ssl.SSLSocket):
                    self._transmission_parallel(sock, ready, early, granted)
                else:
                    self._transmission(sock, ready, early, granted)
        except ProtocolError as e:
            log.warning("%s: protocol error, disconnecting: %s", peer, e)
        except Revoked as e:
            log.warning("%s: %s", peer, e)
        except (OSError, EOFError) as e:
            if not self._stopping:
                log.info("%s: connection ended: %s", peer, e)
        except Exception:
            log.exception("%s: internal error, disconnecting", peer)
        finally:
            if ready is not None:
                table.release(ready.export.name)
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                slot = self._conns.pop(me, None)
                if slot is not None:
                    self._uncount(slot)

    def _table_for(self, sock):
        """The exports a connection sees: the server's table, or, for a dynamic
        source (exports.DynamicExports), its view for the client's verified
        certificate (none before TLS)."""
        view = getattr(self.table, "view", None)
        if view is None:
            return self.table
        return view(sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None)

    def _handshake(self, sock, peer):
        """The whole handshake (TLS included) within handshake_timeout; returns
        (socket, Ready or None, early bytes, the table that holds the export)."""
        deadline = time.monotonic() + self.handshake_timeout
        hs = Handshake(self._table_for(sock), tls=self.tls_context is not None,
                       tls_required=self.tls_required)
        _until(sock, deadline)
        sock.sendall(hs.data_to_send())
        while True:
            ev = hs.next_event()
            out = hs.data_to_send()
            try:
                if isinstance(ev, Ready):
                    with self._lock:        # out of the handshake before the client knows
                        slot = self._conns[threading.current_thread()]
                        slot.handshake = False
                        if slot.evicted:
                            raise EOFError("evicted as its handshake ended")
                if out:
                    _until(sock, deadline)
                    sock.sendall(out)
            except BaseException:
                if isinstance(ev, Ready):       # it holds the Backend: give it back
                    hs.table.release(ev.export.name)
                raise
            if ev is None:
                _until(sock, deadline)
                data = sock.recv(65536)
                if not data:
                    raise EOFError("client left during the handshake")
                hs.receive_data(data)
            elif isinstance(ev, StartTLS):
                _until(sock, deadline)
                sock = self.tls_context.wrap_socket(sock, server_side=True)
                hs.table = self._table_for(sock)
                with self._lock:
                    self._conns[threading.current_thread()].sock = sock
                log.debug("%s: TLS up (%s)", peer, sock.version())
            elif isinstance(ev, Ready):
                return sock, ev, hs.leftover(), hs.table
            elif isinstance(ev, Closed):
                log.info("%s: handshake ended: %s", peer, ev.reason)
                return sock, None, b"", hs.table

    def _transmission(self, sock, ready, early, granted):
        tr, parser, rx = self._begin(sock, ready, early)
        try:
            self._serve_in_order(sock, tr, parser, rx, granted)
        finally:
            self.budget.release(parser.held(), rx.client)

    def _serve_in_order(self, sock, tr, parser, rx, granted):
        idle = rx.idle
        while True:
            # Answer every complete request buffered, then read more.
            pending = bytearray()
            while not tr.closed:
                req = parser.next_request()
                if req is None:
                    break
                rx.progress()
                granted.check()
                try:
                    reply = tr.handle(req)
                finally:
                    self._done(req, rx)
                for b in reply:
                    if len(b) < COALESCE:
                        pending += b
                        continue
                    if pending:
                        _sendall(sock, pending, idle)
                        pending = bytearray()
                    _sendall(sock, b, idle)
            if pending:
                _sendall(sock, pending, idle)
            if tr.closed:
                break
            rx.receive(parser)
        log.info("export %r: client disconnected", tr.export.name)

    def _done(self, req, rx):
        """req was handled: its WRITE payload leaves the budget."""
        if req.data is not None:
            self.budget.release(len(req.data), rx.client)

    def _begin(self, sock, ready, early):
        """A connection's transmission state, parser (fed the bytes the
        handshake read past its end) and receiver."""
        tr = Transmission(ready)
        rx = _Receiver(sock, self.idle_timeout, self.request_timeout)

        def allocate(n):
            self.budget.acquire(n, rx.client, time.monotonic() + self.request_timeout)
            rx.restart()            # the wait was ours: the payload's time starts now
            return bytearray(n)

        parser = RequestParser(check=tr.refusal, allocate=allocate)  # -> rx, never back
        parser.receive_data(early)
        return tr, parser, rx

    def _transmission_parallel(self, sock, ready, early, granted):
        tr, parser, rx = self._begin(sock, ready, early)
        send_lock = threading.Lock()
        # Bounded in flight: a client cannot queue unbounded work or memory
        # (at most `workers` requests of <= 32 MiB each beyond the one parsed).
        slots = threading.BoundedSemaphore(self.workers)
        failed = []

        def work(req):
            try:
                try:
                    reply = tr.handle(req)
                finally:
                    self._done(req, rx)
                with send_lock:
                    for b in reply:
                        _sendall(sock, b, rx.idle)
            except Exception as e:      # the client is gone: the reader will notice
                failed.append(e)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            finally:
                slots.release()

        pool = _Pool(self.workers, work)
        try:
            while not failed:
                req = parser.next_request()
                if req is None:
                    rx.receive(parser)
                    continue
                rx.progress()
                if req.type == C.CMD_DISC:
                    break               # in-flight requests finish below
                granted.check()
                slots.acquire()
                pool.submit(req)
        finally:
            pool.close()
            self.budget.release(parser.held(), rx.client)
        if failed and not isinstance(failed[0], OSError):
            raise failed[0]
        log.info("export %r: client disconnected", ready.export.name)


class Revoked(EOFError):
    """The connection's grant is gone: it is cut."""


class _Recheck(object):
    """For a table that can withdraw an export from an open connection
    (DynamicExports' view: the grant was revoked), check() raises Revoked
    once it has, asked at most every `period` seconds, before a request is
    served: a revoked host's open connection is cut within a second of its
    next request.  Other tables: nothing to check."""

    def __init__(self, table, name, period=1.0):
        self._still = getattr(table, "still_granted", None)
        self._name = name
        self._period = period
        self._next = time.monotonic() + period

    def check(self):
        if self._still is None or time.monotonic() < self._next:
            return
        if not self._still(self._name):
            raise Revoked("export %r: its grant was revoked; connection cut" % self._name)
        self._next = time.monotonic() + self._period


def _sendall(sock, buf, stall):
    """sendall; on a timed socket (TCP) a reply may take as long as it
    needs, but the client must take some of it every `stall` seconds
    (None: no limit)."""
    if sock.gettimeout() is None:
        return sock.sendall(buf)
    view = memoryview(buf)
    last = time.monotonic()
    while len(view):
        try:
            n = sock.send(view[:SEND_SLICE])
        except socket.timeout:
            if stall is not None and time.monotonic() - last > stall:
                raise socket.timeout("the client read nothing for %.0f s" % stall)
            continue
        view = view[n:]
        last = time.monotonic()


def _until(sock, deadline):
    """The socket's timeout: what is left before deadline."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("handshake not done in time")
    sock.settimeout(left)


def _shutdown(sock):
    """Wake the thread blocked on sock (socket.socket's own shutdown: an
    SSLSocket's would drop its state under the reading thread)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class _Receiver:
    """recv for the transmission phase.  On TCP it enforces the deadlines:
    idle (None: none) between requests, request_timeout from a request's
    first byte to its last.  A TCP socket always has a timeout from here on
    (never None: worker threads send on it, its blocking mode must not flip
    under them).  Unix socket peers are local: blocking, no deadline."""

    def __init__(self, sock, idle, request_timeout):
        self.sock = sock
        self.timed = sock.family != socket.AF_UNIX
        self.client = sock.getpeername()[0] if self.timed else None
        self.idle = idle if self.timed else None
        self.request_timeout = request_timeout
        self.view = memoryview(bytearray(RECV_SIZE))
        self._deadline = None
        self._since = time.monotonic()
        sock.settimeout(TICK if self.timed else None)

    def progress(self):
        """A request is complete: the next one has its own deadline."""
        self._deadline = None
        self._since = time.monotonic()

    def restart(self):
        self._deadline = time.monotonic() + self.request_timeout

    def receive(self, parser):
        """One recv into the parser: straight into a write request's payload
        when the parser is inside one (no copy), else into the buffer.  (No
        reference to the parser is kept: its allocator refers to this.)"""
        direct = parser.payload_buffer(DIRECT_RECV)
        while True:
            if self.timed:
                self.sock.settimeout(self._left(parser))
            try:
                n = self.sock.recv_into(direct if direct is not None else self.view)
                break
            except socket.timeout:
                pass
        if n == 0:
            raise EOFError("client closed the connection")
        if direct is not None:
            parser.payload_received(n)
        else:
            parser.receive_data(self.view[:n])

    def _left(self, parser):
        """Seconds to wait for bytes: up to the deadline that applies, else TICK."""
        now = time.monotonic()
        if parser.mid_request():
            if self._deadline is None:
                self._deadline = now + self.request_timeout
            left, why = self._deadline - now, "request not complete within %.0f s" % (
                self.request_timeout)
        elif self.idle is not None:
            left, why = self._since + self.idle - now, "no request for %.0f s" % self.idle
        else:
            return TICK
        if left <= 0:
            raise socket.timeout(why)
        return min(left, TICK)


class _Pool:
    """A fixed set of worker threads fed through a queue; close() waits for
    every submitted item."""

    def __init__(self, n, fn):
        self._q = queue.Queue()
        self._fn = fn
        self._threads = [threading.Thread(target=self._run, name="nbd-worker", daemon=True)
                         for _ in range(n)]
        for t in self._threads:
            t.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            self._fn(item)

    def submit(self, item):
        self._q.put(item)

    def close(self):
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
