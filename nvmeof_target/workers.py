"""Several worker processes on one port (SO_REUSEPORT), one per core.

The kernel spreads connections over the workers, so the I/O queues of one
controller may land on other workers than its admin queue.  Any worker can
serve an I/O queue: it only needs the volume (opened locally) and proof that
the controller exists.  That proof is the one thing workers share: a table
cntlid -> (tag of subnqn+hostnqn, granted queues) in an anonymous shared
mmap.  Each cntlid has one writer, its owner ((cntlid - 1) % workers), so
there are no locks; readers re-check the registry for access.

The parent process owns the control socket and the registry writes; it
forwards each change to the workers over a pipe (JSON lines) so they can
disconnect, notify or refresh their own controllers."""

import json
import logging
import mmap
import os
import select
import selectors
import signal
import struct
import time
import zlib

from .registry import Registry
from .server import Server
from .target import Target

log = logging.getLogger("nvmeof_target")

_SLOT = struct.Struct("<IHH")       # tag (0 = free), max_qid, reserved
NSLOTS = 0x10000


def _tag(subnqn, hostnqn):
    return (zlib.crc32((subnqn + "\0" + hostnqn).encode("utf-8")) | 1) & 0xFFFFFFFF


class SharedControllers(object):
    def __init__(self):
        self.mm = mmap.mmap(-1, NSLOTS * _SLOT.size)

    def publish(self, cntlid, subnqn, hostnqn, max_qid):
        _SLOT.pack_into(self.mm, cntlid * _SLOT.size, _tag(subnqn, hostnqn), max_qid, 0)

    def clear(self, cntlid):
        _SLOT.pack_into(self.mm, cntlid * _SLOT.size, 0, 0, 0)

    def lookup(self, cntlid, subnqn, hostnqn):
        """Granted I/O queues of a live controller with these NQNs, else None."""
        tag, max_qid, _ = _SLOT.unpack_from(self.mm, cntlid * _SLOT.size)
        if tag == 0 or tag != _tag(subnqn, hostnqn):
            return None
        return max_qid


class EventReader(object):
    """Worker side of the parent's change feed (registered on the worker's selector)."""

    def __init__(self, server, fd):
        self.server = server
        self.fd = fd
        os.set_blocking(fd, False)
        self.buf = b""
        server.sel.register(fd, selectors.EVENT_READ, self)

    def on_event(self, mask):
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        if not data:                     # the parent is gone: stop too
            self.server.sel.unregister(self.fd)
            self.server.stop()
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            ev = json.loads(line.decode("utf-8"))
            try:
                self.server.target.apply_change(ev["op"], ev["args"])
            except Exception:
                log.exception("applying %r", ev)


def run_workers(n, listen, state, control_path, limits=None, file_dirs=None):
    """Fork n workers serving `listen`, run the control socket here; returns an
    exit status once SIGTERM/SIGINT has stopped everyone.  limits (limits.py)
    hold per worker.  The control socket appears only once every worker
    listens (or READY_TIMEOUT passed): before that, connections would all land
    on the workers already up."""
    shared = SharedControllers()
    Registry(state).close()              # create the schema before anyone reads it
    pipes = [os.pipe() for _ in range(n)]
    ready_r, ready_w = os.pipe()         # a byte per worker listening
    pids = {}

    def spawn(i):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for j, (r, w) in enumerate(pipes):
                    os.close(w)
                    if j != i:
                        os.close(r)
                os.close(ready_r)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                reg = Registry(state)
                target = Target(reg, worker=i, nworkers=n, shared=shared, file_dirs=file_dirs)
                server = Server(target, listen, None, reuse_port=True, limits=limits)
                os.write(ready_w, b"r")
                os.close(ready_w)
                EventReader(server, pipes[i][0])
                signal.signal(signal.SIGTERM, lambda *_: server.stop())
                server.serve_forever()
                code = 0
            except Exception:
                log.exception("worker %d", i)
            finally:
                os._exit(code)
        pids[pid] = i
        return pid

    for i in range(n):
        spawn(i)
    # The read ends stay open here: a worker restarted later inherits its own.
    _wait_ready(ready_r, n)

    def broadcast(op, args):
        line = (json.dumps({"op": op, "args": args}) + "\n").encode("utf-8")
        for _, w in pipes:
            try:
                os.write(w, line)
            except OSError as e:
                log.error("worker feed: %s", e)

    registry = Registry(state)
    target = Target(registry, on_change=broadcast, file_dirs=file_dirs)
    server = Server(target, (), control_path)
    stopping = []

    def on_signal(*_):
        stopping.append(True)
        server.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log.info("%d workers, %d volumes in %s", n, registry.count(), state)
    try:
        server.serve_forever(tick=lambda: _reap(pids, spawn, stopping), shutdown=False)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
        deadline = time.time() + 30
        while pids and time.time() < deadline:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            pids.pop(pid, None)
        for r, w in pipes + [(ready_r, ready_w)]:
            os.close(r)
            os.close(w)
        server.shutdown()
        registry.close()
    return 0


READY_TIMEOUT = 60


def _wait_ready(fd, n):
    """Wait until n workers said they listen (a byte each on fd)."""
    deadline = time.time() + READY_TIMEOUT
    got = 0
    while got < n:
        left = deadline - time.time()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            log.error("%d of %d workers listening after %d s", got, n, READY_TIMEOUT)
            return
        got += len(os.read(fd, n - got))


def _reap(pids, spawn, stopping):
    """Restart a worker that died (called once a second by the parent loop)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        i = pids.pop(pid, None)
        if i is not None and not stopping:
            log.error("worker %d (pid %d) died with status %d: restarting", i, pid, status)
            spawn(i)
