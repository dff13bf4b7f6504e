"""Small reads in flight side by side, without threads: Linux native AIO
(io_setup/io_submit/io_getevents, linux/aio_abi.h) on an O_DIRECT descriptor,
completions signalled on an eventfd that sits in the server's selector.

Why: a buffered pread that misses the page cache waits for the zvol's own
threads, one read at a time, while the kernel target keeps QD bios in flight.
O_DIRECT AIO submits them all (the zvol taskq runs them in parallel); the
event loop goes on parsing commands meanwhile.

Reads land in fixed SLOT-sized slots of one page-aligned mmap; a completion
copies its bytes out and frees the slot.  Everything falls back to the
synchronous path: no AIO syscalls (unknown arch, seccomp, aio-max-nr),
O_DIRECT refused, slots exhausted, or a read the kernel failed (the
synchronous read then gives the real error or data).  Raw syscalls through
ctypes (no libaio, no os.eventfd before Python 3.10)."""

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import platform
import selectors
import struct

log = logging.getLogger("nvmeof_target")

SLOT = 16384          # largest read served here (smaller ones share a slot size)
NSLOTS = 256          # reads in flight per process: 4 MiB of address space, unused until used
# (io_setup, io_destroy, io_getevents, io_submit)
_NR = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PREAD = 0
IOCB_FLAG_RESFD = 1
EFD_NONBLOCK, EFD_CLOEXEC = 0o4000, 0o2000000
# struct iocb: data, key, rw_flags, opcode, reqprio, fildes, buf, nbytes, offset,
# reserved2, flags, resfd (little endian field order of aio_abi.h)
IOCB = struct.Struct("<QIIHhIQQqQII")
EVENT = struct.Struct("<QQqq")          # struct io_event: data, obj, res, res2
_EV_RES = struct.Struct("<QQq")
_HEADTAIL = struct.Struct("<II")
_U32 = struct.Struct("<I")
_RING = struct.Struct("<IIIIIIII")        # id nr head tail magic compat incompat hlen
AIO_RING_MAGIC = 0xa10a10a1

_L = ctypes.c_long          # variadic syscall(): pass every argument as a long
_L0 = _L(0)
_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc


class AioReads(object):
    """One per event loop.  submit() queues a read, flush() hands the queued
    ones to the kernel (one io_submit per loop turn), and done(token, data)
    runs for each when it completes: data is bytes, or None when the read
    must be redone synchronously."""

    def __init__(self, sel, done, nslots=NSLOTS):
        self.sel = sel
        self.done = done
        self.nslots = nslots
        self.ok = None            # None: not set up yet (first use), then True/False
        self.queued = []          # slot indexes to submit
        self.tokens = [None] * nslots
        self.inflight = 0
        self.reads = 0            # completed here
        self.redone = 0           # handed back to the synchronous path
        self.submits = self.wakeups = 0     # io_submit calls, eventfd wakeups

    def stats(self):
        return {"aio": bool(self.ok), "aio_reads": self.reads, "aio_redone": self.redone,
                "aio_submits": self.submits, "aio_wakeups": self.wakeups}

    def _setup(self):
        self.ok = False
        # a 32-bit Python on a 64-bit kernel also says x86_64: other syscall numbers
        nr = _NR.get(platform.machine()) if struct.calcsize("P") == 8 else None
        if nr is None:
            return
        try:
            self._setup_ctx(nr)
        except (OSError, ValueError, MemoryError) as e:   # mmap, selector: stay synchronous
            log.info("no Linux AIO (%s): synchronous reads", e)
            self._teardown()

    def _setup_ctx(self, nr):
        lib = _lib()
        ctx = ctypes.c_ulong(0)
        if lib.syscall(_L(nr[0]), _L(self.nslots), ctypes.byref(ctx)) < 0:
            log.info("no Linux AIO (%s): synchronous reads", os.strerror(ctypes.get_errno()))
            return
        efd = lib.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if efd < 0:
            lib.syscall(_L(nr[1]), ctx)
            return
        self._nr = [_L(x) for x in nr]
        self._lib, self.ctx, self.efd = lib, ctx, efd
        self._ctx_live = True
        self.mm = mmap.mmap(-1, self.nslots * SLOT)
        self._mm_ref = ctypes.c_char.from_buffer(self.mm)
        self.base = ctypes.addressof(self._mm_ref)
        self.iocbs = ctypes.create_string_buffer(self.nslots * IOCB.size)
        self.iocb_base = ctypes.addressof(self.iocbs)
        self.ptrs = (ctypes.c_void_p * self.nslots)()
        self.events = ctypes.create_string_buffer(self.nslots * EVENT.size)
        self.zero = (ctypes.c_long * 2)(0, 0)      # struct timespec {0, 0}: never block
        self.free = list(range(self.nslots - 1, -1, -1))
        self.lengths = [0] * self.nslots
        self.ring = self._map_ring(ctx.value)
        self.sel.register(efd, selectors.EVENT_READ, self)
        self.ok = True

    def _map_ring(self, addr):
        """The completion ring, where user space may reap it (x86's ordered
        loads make the kernel's write barrier enough); else None."""
        if platform.machine() != "x86_64" or not addr:
            return None
        hdr = _RING.unpack(ctypes.string_at(addr, _RING.size))
        if hdr[4] != AIO_RING_MAGIC or hdr[6] != 0 or hdr[7] != _RING.size:
            return None
        self.ring_nr = hdr[1]
        return (ctypes.c_char * (_RING.size + hdr[1] * EVENT.size)).from_address(addr)

    def submit(self, fd, offset, length, token):
        """Queue a read of length (<= SLOT) bytes at offset; False: do it synchronously."""
        if self.ok is None:
            self._setup()
        if not self.ok or not self.free or length > SLOT:
            return False
        i = self.free.pop()
        IOCB.pack_into(self.iocbs, i * IOCB.size, i, 0, 0, IOCB_CMD_PREAD, 0, fd,
                       self.base + i * SLOT, length, offset, 0, IOCB_FLAG_RESFD, self.efd)
        self.tokens[i] = token
        self.lengths[i] = length
        self.queued.append(i)
        return True

    def flush(self):
        """Submit what was queued during this loop turn."""
        q = self.queued
        ptrs, base = self.ptrs, self.iocb_base
        for k, i in enumerate(q):
            ptrs[k] = base + i * IOCB.size
        self.queued = []
        pos, n = 0, len(q)
        while pos < n:
            # io_submit stops at the first iocb it refuses (EBADF, EINVAL...):
            # that one goes the synchronous way, the ones behind it are retried
            sent = self._lib.syscall(self._nr[3], self.ctx, _L(n - pos),
                                     ctypes.byref(ptrs, pos * ctypes.sizeof(ctypes.c_void_p)))
            self.submits += 1
            if sent > 0:
                self.inflight += sent
                pos += sent
                continue
            err = ctypes.get_errno() if sent < 0 else errno.EAGAIN
            log.debug("io_submit: %s", os.strerror(err))
            if err in (errno.ENOSYS, errno.EPERM):   # refused for good (seccomp...)
                log.info("io_submit refused (%s): synchronous reads", os.strerror(err))
                self.ok = False
                err = errno.EAGAIN                  # every read left: synchronous
            for i in q[pos:] if err == errno.EAGAIN else q[pos:pos + 1]:
                self.redone += 1
                self._finish(i, None)
            pos = n if err == errno.EAGAIN else pos + 1

    def _finish(self, i, data):
        token = self.tokens[i]
        self.tokens[i] = None
        self.free.append(i)
        try:
            self.done(token, data)
        except Exception:     # one bad completion must not lose the others
            log.exception("read completion failed")

    def on_event(self, mask):
        self.wakeups += 1
        try:
            os.read(self.efd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        mm, lengths = self.mm, self.lengths
        while self.inflight:
            done = self._reap()
            if not done:
                return
            self.inflight -= len(done)
            for i, res in done:
                if res == lengths[i]:
                    self.reads += 1
                    self._finish(i, mm[i * SLOT:i * SLOT + res])
                else:          # error or short read: the synchronous path decides
                    self.redone += 1
                    self._finish(i, None)

    def _reap(self):
        """[(slot, res)] of the completed reads, without blocking."""
        ring = self.ring
        if ring is not None:
            # the completion ring is mapped in our memory (fs/aio.c struct
            # aio_ring): read it as fio's userspace_reap does, no syscall
            head, tail = _HEADTAIL.unpack_from(ring, 8)
            if head == tail:
                return []
            out = []
            nr = self.ring_nr
            while head != tail:
                out.append(_EV_RES.unpack_from(ring, 32 + head * 32))
                head = (head + 1) % nr
            _U32.pack_into(ring, 8, head)
            return [(i, res) for i, _, res in out]
        ev = self.events
        n = self._lib.syscall(self._nr[2], self.ctx, _L0, _L(self.nslots), ev, self.zero)
        if n < 0:
            if ctypes.get_errno() != errno.EINTR:
                log.error("io_getevents: %s", os.strerror(ctypes.get_errno()))
            return []
        return [EVENT.unpack_from(ev, k * EVENT.size)[::2] for k in range(n)]

    def close(self):
        """Wait for reads in flight (io_destroy does), then free everything."""
        self.ok = False
        self._teardown()

    def _teardown(self):
        """Free what _setup_ctx got, however far it went."""
        efd = getattr(self, "efd", None)
        if efd is not None:
            try:
                self.sel.unregister(efd)
            except (KeyError, ValueError):
                pass
        self.ring = None                  # io_destroy unmaps it
        if getattr(self, "_ctx_live", False):
            self._lib.syscall(self._nr[1], self.ctx)
            self._ctx_live = False
        if efd is not None:
            os.close(efd)
            self.efd = None
        if getattr(self, "_mm_ref", None) is not None:
            self._mm_ref = None
        if getattr(self, "mm", None) is not None:
            self.mm.close()
            self.mm = None
        self.queued = []
        self.tokens = [None] * self.nslots
        self.inflight = 0
