"""The NBD server: listening sockets, one thread per connection (bounded), the
sans-IO handshake and transmission driven over blocking sockets.

A thread per connection keeps blocking disk I/O out of any event loop and
gives multi-conn clients (nbdcopy, qemu) parallel reads and writes; the
number of connections is capped so a flood cannot exhaust the process.
"""

import errno
import logging
import os
import queue
import selectors
import signal
import socket
import stat
import threading

from nbd_server import constants as C
from nbd_server.handshake import Closed, Handshake, Ready, StartTLS
from nbd_server.transmission import ProtocolError, RequestParser, Transmission

log = logging.getLogger(__name__)

RECV_SIZE = 256 * 1024
COALESCE = 64 * 1024          # small replies are joined into one send
DIRECT_RECV = 64 * 1024       # larger WRITE payloads are received in place
HANDSHAKE_TIMEOUT = 60.0      # XO's own message timeout


def parse_tcp(spec):
    """"ADDR:PORT" or "[V6ADDR]:PORT" -> (addr, port); raises ValueError."""
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("TCP address must be ADDR:PORT, got %r" % spec)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "127.0.0.1", int(port)


class Server:
    def __init__(self, table, unix_path=None, tcp=None, tls_context=None, tls_required=False,
                 max_connections=256, workers=1):
        """workers: requests of one connection executed at once.  1 runs them
        in order on the connection's thread (best for cached data: no thread
        hand-off, small replies coalesced); more lets a queue-depth client
        (kernel nbd, qemu) overlap slow zvol reads, replies then come in
        completion order, which the protocol allows."""
        if not unix_path and not tcp:
            raise ValueError("nothing to listen on: give a unix socket path or a TCP address")
        self.table = table
        self.unix_path = unix_path
        self.tcp = tcp
        self.tls_context = tls_context
        self.tls_required = tls_required
        self.max_connections = max_connections
        self.workers = max(1, int(workers))
        self.listeners = []
        self.tcp_address = None
        self._conns = {}                      # thread -> socket
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
            return
        with self._lock:
            if len(self._conns) >= self.max_connections:
                log.warning("refusing a connection: %d connections already", len(self._conns))
                sock.close()
                return
            t = threading.Thread(target=self._connection, args=(sock, peer or "unix"),
                                 name="nbd-conn", daemon=True)
            self._conns[t] = sock
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t.start()

    def _stop_all(self):
        self._close_listeners()
        with self._lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
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
        try:
            sock.settimeout(HANDSHAKE_TIMEOUT)
            sock, ready, early = self._handshake(sock, peer)
            if ready is not None:
                sock.settimeout(None)
                with self._lock:
                    self._conns[me] = sock
                log.info("%s: export %r (%s, %d bytes, %s replies, contexts %s)", peer,
                         ready.export.name, "ro" if ready.export.readonly else "rw", ready.size,
                         "structured" if ready.structured else "simple",
                         [name for _, name, _ in ready.contexts] or "none")
                if self.workers > 1:
                    self._transmission_parallel(sock, ready, early)
                else:
                    self._transmission(sock, ready, early)
        except ProtocolError as e:
            log.warning("%s: protocol error, disconnecting: %s", peer, e)
        except (OSError, EOFError) as e:
            if not self._stopping:
                log.info("%s: connection ended: %s", peer, e)
        except Exception:
            log.exception("%s: internal error, disconnecting", peer)
        finally:
            if ready is not None:
                self.table.release(ready.export.name)
            try:
                sock.close()
            except OSError:
                pass
            with self._lock:
                self._conns.pop(me, None)

    def _handshake(self, sock, peer):
        hs = Handshake(self.table, tls=self.tls_context is not None, tls_required=self.tls_required)
        sock.sendall(hs.data_to_send())
        while True:
            ev = hs.next_event()
            out = hs.data_to_send()
            try:
                if out:
                    sock.sendall(out)
            except BaseException:
                if isinstance(ev, Ready):       # it holds the Backend: give it back
                    self.table.release(ev.export.name)
                raise
            if ev is None:
                data = sock.recv(65536)
                if not data:
                    raise EOFError("client left during the handshake")
                hs.receive_data(data)
            elif isinstance(ev, StartTLS):
                sock = self.tls_context.wrap_socket(sock, server_side=True)
                with self._lock:
                    self._conns[threading.current_thread()] = sock
                log.debug("%s: TLS up (%s)", peer, sock.version())
            elif isinstance(ev, Ready):
                return sock, ev, hs.leftover()
            elif isinstance(ev, Closed):
                log.info("%s: handshake ended: %s", peer, ev.reason)
                return sock, None, b""

    def _transmission(self, sock, ready, early):
        tr, parser, view = _begin(ready, early)
        while True:
            # Answer every complete request buffered, then read more.
            pending = bytearray()
            while not tr.closed:
                req = parser.next_request()
                if req is None:
                    break
                for b in tr.handle(req):
                    if len(b) < COALESCE:
                        pending += b
                        continue
                    if pending:
                        sock.sendall(pending)
                        pending = bytearray()
                    sock.sendall(b)
            if pending:
                sock.sendall(pending)
            if tr.closed:
                break
            _receive(sock, parser, view)
        log.info("export %r: client disconnected", ready.export.name)

    def _transmission_parallel(self, sock, ready, early):
        tr, parser, view = _begin(ready, early)
        send_lock = threading.Lock()
        # Bounded in flight: a client cannot queue unbounded work or memory
        # (at most `workers` requests of <= 32 MiB each beyond the one parsed).
        slots = threading.BoundedSemaphore(self.workers)
        failed = []

        def work(req):
            try:
                reply = tr.handle(req)
                with send_lock:
                    for b in reply:
                        sock.sendall(b)
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
                    _receive(sock, parser, view)
                    continue
                if req.type == C.CMD_DISC:
                    break               # in-flight requests finish below
                slots.acquire()
                pool.submit(req)
        finally:
            pool.close()
        if failed and not isinstance(failed[0], OSError):
            raise failed[0]
        log.info("export %r: client disconnected", ready.export.name)


def _begin(ready, early):
    """A connection's transmission state, parser (fed the bytes the handshake
    read past its end) and receive buffer."""
    parser = RequestParser()
    parser.receive_data(early)
    return Transmission(ready), parser, memoryview(bytearray(RECV_SIZE))


def _receive(sock, parser, view):
    """One recv into the parser: straight into a write request's payload when
    the parser is inside one (no copy), else into view."""
    direct = parser.payload_buffer(DIRECT_RECV)
    n = sock.recv_into(direct if direct is not None else view)
    if n == 0:
        raise EOFError("client closed the connection")
    if direct is not None:
        parser.payload_received(n)
    else:
        parser.receive_data(view[:n])


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
