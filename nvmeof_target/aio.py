"""Reads and writes in flight side by side, without threads: Linux native
AIO (io_setup/io_submit/io_getevents, linux/aio_abi.h) on an O_DIRECT
descriptor, completions signalled on an eventfd that sits in the server's
selector.

Why: a buffered pread that misses the page cache waits for the zvol's own
threads, one read at a time, and buffered writes only move the work to the
writeback (paid at the next Flush, one page at a time), while the kernel
target keeps QD bios in flight.  O_DIRECT AIO submits them all (the zvol
taskq runs them in parallel); the event loop goes on parsing commands.

Contract:
- submit(fd, offset, length, token) queues a read, submit_write(fd, offset,
  data, token, dsync) a write (dsync: RWF_DSYNC, the write is durable when it
  completes: FUA).  fd is a descriptor, or an object whose direct_fd() gives
  it when the I/O starts (a volume closed meanwhile gives -1: the I/O fails,
  never lands on a descriptor number reused by another file).  They return
  False only when AIO cannot take the I/O at all (no AIO here, or longer than
  BIG): the caller does it synchronously.  With every slot of its size busy,
  the I/O waits here and starts when one frees up (no synchronous fallback
  that would mix buffered and direct I/O on one volume).
- read_now(fd, offset, length): a synchronous O_DIRECT read into a slot,
  lent the same way (a lone read at QD1: queue.Queue.lone_read), or None.
- reserve(length) lends a free slot to receive a write's data into, as a
  writable memoryview of length bytes (or None: no AIO, too long, no slot
  free now); submit_write given that very view starts the write from its slot
  with no copy (even with other I/O waiting for slots); unreserve(view) gives
  back a slot no write took (a no-op for one that did).
- submit_fsync(fd, token) queues an fsync (a Flush: the zvol commits what
  completed before), completed by write_done like a write.
- flush() hands what was queued this loop turn to the kernel (one io_submit).
- done(token, data) per read: the bytes, or None when AIO and a synchronous
  O_DIRECT retry both failed (the caller's synchronous read gives the error).
  The bytes are a memoryview of the I/O's slot, not a copy (a 128 KiB copy
  costs more than the rest of the command under TCG): the slot is lent to
  the caller until reclaim(outs), which the loop calls once its sends are
  done; a view still in one of the `outs` lists then (a host not reading:
  TCP back-pressure) is copied out there, and the slot is free again.
  write_done(token, err) per write: 0, the errno of the failed write, or -1
  when AIO went away for good while it waited for a slot (not done: the
  caller writes it synchronously).
  A write is reported done only once the kernel completed it (in the zvol:
  a later Flush covers it; with dsync, durable already).
- Anything the kernel refuses at submission or fails (a short transfer, an
  error) is retried once synchronously (pread/pwrite on the same O_DIRECT fd
  from the same aligned slot, fdatasync after a dsync write), so a kernel
  without RWF_DSYNC still gets exact FUA semantics.

I/O lands in (or leaves from) fixed slots of one page-aligned mmap: SLOT-sized
ones for small I/O, BIG ones up to the largest transfer; a read completion
copies its bytes out, a write copies its data in.  No AIO syscalls (unknown
arch, seccomp, aio-max-nr), O_DIRECT refused: every I/O goes the synchronous
way.  Raw syscalls through ctypes (no libaio, no os.eventfd before Python
3.10); Linux 4.19 (XCP-ng 8.3 dom0) has all of it."""

import collections
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

SLOT = 16384          # small I/O slots
NSLOTS = 256          # of them per process: 4 MiB of address space, unused until used
BIG = 1 << 20         # the largest transfer (identify.MAX_TRANSFER)
NBIG = 32             # 32 MiB of address space; a 128 KiB I/O touches 128 KiB of its slot
# (io_setup, io_destroy, io_getevents, io_submit)
_NR = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PREAD, IOCB_CMD_PWRITE, IOCB_CMD_FSYNC = 0, 1, 2     # FSYNC: Linux >= 4.18
IOCB_FLAG_RESFD = 1
RWF_DSYNC = 0x2
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
        for name in ("pread", "pwrite"):
            f = getattr(_libc, name)
            f.restype = ctypes.c_ssize_t
            f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
    return _libc


class Aio(object):
    """One per event loop (see the module's contract)."""

    def __init__(self, sel, done, nslots=NSLOTS, write_done=None, nbig=NBIG):
        self.sel = sel
        self.done = done
        self.write_done = write_done
        self.nslots = nslots              # small slots; big ones follow them
        self.nbig = nbig
        self.ok = None            # None: not set up yet (first use), then True/False
        self.queued = []          # slot indexes to submit
        self.lent = []            # read slots whose bytes were handed out as views
        self.reserved = {}        # id(view) -> (slot, view): slots lent to receive writes
        self.waiting = collections.deque()   # (kind, fd, offset, length, data, token, dsync)
        n = nslots + nbig
        self.tokens = [None] * n
        self.inflight = 0
        self.reads = self.writes = self.fsyncs = 0      # completed here
        self.redone = 0           # retried synchronously
        self.submits = self.wakeups = 0     # io_submit calls, eventfd wakeups
        self.waited = 0           # I/O that waited for a free slot
        self.received = 0         # writes started from the slot their data came into
        self.copied = 0           # lent read slots copied at reclaim (not sent yet)
        self.sync_reads = 0       # read_now(): a lone read at QD1

    def stats(self):
        return {"aio": bool(self.ok), "aio_reads": self.reads, "aio_writes": self.writes,
                "aio_fsyncs": self.fsyncs,
                "aio_redone": self.redone, "aio_submits": self.submits,
                "aio_wakeups": self.wakeups, "aio_waited": self.waited,
                "aio_received_writes": self.received, "aio_copied_reads": self.copied,
                "aio_sync_reads": self.sync_reads}

    def _setup(self):
        self.ok = False
        # a 32-bit Python on a 64-bit kernel also says x86_64: other syscall numbers
        nr = _NR.get(platform.machine()) if struct.calcsize("P") == 8 else None
        if nr is None:
            return
        try:
            self._setup_ctx(nr)
        except (OSError, ValueError, MemoryError) as e:   # mmap, selector: stay synchronous
            log.info("no Linux AIO (%s): synchronous I/O", e)
            self._teardown()

    def _setup_ctx(self, nr):
        lib = _lib()
        ctx = ctypes.c_ulong(0)
        n = self.nslots + self.nbig
        if lib.syscall(_L(nr[0]), _L(n), ctypes.byref(ctx)) < 0:
            log.info("no Linux AIO (%s): synchronous I/O", os.strerror(ctypes.get_errno()))
            return
        efd = lib.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if efd < 0:
            lib.syscall(_L(nr[1]), ctx)
            return
        self._nr = [_L(x) for x in nr]
        self._lib, self.ctx, self.efd = lib, ctx, efd
        self._ctx_live = True
        self.mm = mmap.mmap(-1, self.nslots * SLOT + self.nbig * BIG)
        self._mm_ref = ctypes.c_char.from_buffer(self.mm)
        self.base = ctypes.addressof(self._mm_ref)
        self.view = memoryview(self.mm)
        # slot i: bytes [off[i], off[i] + cap[i]) of mm
        self.off = [i * SLOT for i in range(self.nslots)] + [
            self.nslots * SLOT + i * BIG for i in range(self.nbig)]
        self.cap = [SLOT] * self.nslots + [BIG] * self.nbig
        self.iocbs = ctypes.create_string_buffer(n * IOCB.size)
        self.iocb_base = ctypes.addressof(self.iocbs)
        self.ptrs = (ctypes.c_void_p * n)()
        self.events = ctypes.create_string_buffer(n * EVENT.size)
        self.zero = (ctypes.c_long * 2)(0, 0)      # struct timespec {0, 0}: never block
        self.free = list(range(self.nslots - 1, -1, -1))
        self.free_big = list(range(n - 1, self.nslots - 1, -1))
        self.lengths = [0] * n
        self.io = [None] * n              # (opcode, fd, offset, dsync) for a synchronous retry
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
        """Queue a read of length (<= BIG) bytes at offset; False: do it synchronously."""
        return self._submit(IOCB_CMD_PREAD, fd, offset, length, None, token, False)

    def submit_write(self, fd, offset, data, token, dsync=False):
        """Queue a write of data (<= BIG bytes) at offset; False: do it synchronously."""
        return self._submit(IOCB_CMD_PWRITE, fd, offset, len(data), data, token, dsync)

    def submit_fsync(self, fd, token):
        """Queue an fsync of fd (a Flush), completed by write_done(token, err)
        like a write; a kernel without AIO fsync gets a synchronous one."""
        return self._submit(IOCB_CMD_FSYNC, fd, 0, 0, None, token, False)

    def read_now(self, fd, offset, length):
        """A synchronous O_DIRECT read into a free slot, lent like an AIO
        read's (until reclaim): a memoryview of the bytes, or None (no AIO
        here, too long, no slot free, the kernel refused or fell short: the
        caller goes the usual way, which retries and reports errors)."""
        got = self._take_slot(length)
        if got is None:
            return None
        i, off = got
        if self._lib.pread(fd, self.base + off, length, offset) != length:
            self._give_back(i)
            return None
        self.reads += 1
        self.sync_reads += 1
        self.lent.append(i)
        return self.view[off:off + length]

    def reserve(self, length):
        """A free slot to receive a write's data into (see the contract)."""
        if self.ok is None:
            self._setup()
        got = None if self.waiting else self._take_slot(length)
        if got is None:
            return None
        i, off = got
        view = self.view[off:off + length]
        self.reserved[id(view)] = (i, view)
        return view

    def unreserve(self, view):
        """Give back a reserved slot that no write took (else a no-op)."""
        ent = self.reserved.pop(id(view), None)
        if ent is not None:
            self._give_back(ent[0])
            self._start_waiting()

    def _take_slot(self, length):
        """A free slot for length bytes, taken: (index, offset in mm); None
        with no AIO here, longer than BIG, or none free."""
        if not self.ok or length > BIG:
            return None
        free = self.free if length <= SLOT else self.free_big
        if not free:
            return None
        i = free.pop()
        return i, self.off[i]

    def _give_back(self, i):
        (self.free if i < self.nslots else self.free_big).append(i)

    def _submit(self, op, fd, offset, length, data, token, dsync):
        if self.ok is None:
            self._setup()
        if not self.ok or length > BIG:
            return False
        if self.reserved and data is not None:
            ent = self.reserved.pop(id(data), None)
            if ent is not None:          # received into its slot already: no copy
                self.received += 1
                self._start(ent[0], op, fd, offset, length, None, token, dsync)
                return True
        got = None if self.waiting else self._take_slot(length)
        if got is None:
            self.waited += 1
            self.waiting.append((op, fd, offset, length, data, token, dsync))
            return True
        self._start(got[0], op, fd, offset, length, data, token, dsync)
        return True

    def _start(self, i, op, fd, offset, length, data, token, dsync):
        if not isinstance(fd, int):
            fd = fd.direct_fd()
        off = self.off[i]
        if data is not None:
            self.mm[off:off + length] = data
        IOCB.pack_into(self.iocbs, i * IOCB.size, i, 0, RWF_DSYNC if dsync else 0, op, 0,
                       fd & 0xFFFFFFFF, self.base + off if length else 0, length, offset, 0,
                       IOCB_FLAG_RESFD, self.efd)
        self.tokens[i] = token
        self.lengths[i] = length
        self.io[i] = (op, fd, offset, dsync)
        self.queued.append(i)

    def _start_waiting(self):
        """Slots freed: start the I/O that waited for them, in order."""
        w = self.waiting
        while w and self.ok:
            got = self._take_slot(w[0][3])
            if got is None:
                return
            op, fd, offset, length, data, token, dsync = w.popleft()
            self._start(got[0], op, fd, offset, length, data, token, dsync)

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
            # that one is retried synchronously, the ones behind it submitted again
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
                log.info("io_submit refused (%s): synchronous I/O", os.strerror(err))
                self.ok = False
                err = errno.EAGAIN                  # every I/O left: synchronous
            for i in q[pos:] if err == errno.EAGAIN else q[pos:pos + 1]:
                self._retry(i)
            pos = n if err == errno.EAGAIN else pos + 1
        if not self.ok:
            self._drain_waiting()

    def _retry(self, i):
        """The kernel refused or failed slot i's I/O: once more, synchronously,
        same fd, same aligned slot; then complete it whatever the outcome."""
        self.redone += 1
        op, fd, offset, dsync = self.io[i]
        n = self.lengths[i]
        addr = self.base + self.off[i]
        lib = self._lib
        err = 0
        done = 0
        if op == IOCB_CMD_FSYNC:
            dsync, n = True, 0
        while done < n:
            f = lib.pread if op == IOCB_CMD_PREAD else lib.pwrite
            r = f(fd, addr + done, n - done, offset + done)
            if r <= 0:
                err = ctypes.get_errno() if r < 0 else errno.EIO
                break
            done += r
        if not err and dsync:
            try:
                (os.fsync if op == IOCB_CMD_FSYNC else os.fdatasync)(fd)
            except OSError as e:
                err = e.errno or errno.EIO
        self._finish(i, not err, err)

    def _finish(self, i, ok, err=0):
        token = self.tokens[i]
        op = self.io[i][0]
        self.tokens[i] = None
        self.io[i] = None
        try:
            if op == IOCB_CMD_PREAD:
                if ok:
                    off = self.off[i]
                    self.lent.append(i)         # until reclaim()
                    data = self.view[off:off + self.lengths[i]]
                else:
                    self._give_back(i)
                    data = None
                self.done(token, data)
            else:
                self._give_back(i)
                self.write_done(token, 0 if ok else (err or errno.EIO))
        except Exception:     # one bad completion must not lose the others
            log.exception("I/O completion failed")

    def on_event(self, mask):
        self.wakeups += 1
        try:
            os.read(self.efd, 8)
        except (BlockingIOError, InterruptedError):
            pass
        lengths, io = self.lengths, self.io
        while self.inflight:
            done = self._reap()
            if not done:
                break
            self.inflight -= len(done)
            for i, res in done:
                if res == lengths[i]:
                    op = io[i][0]
                    if op == IOCB_CMD_PREAD:
                        self.reads += 1
                    elif op == IOCB_CMD_PWRITE:
                        self.writes += 1
                    else:
                        self.fsyncs += 1
                    self._finish(i, True)
                else:          # error or short transfer: once more, synchronously
                    self._retry(i)
        self._start_waiting()

    def reclaim(self, outs):
        """The loop's sends are done: the read slots lent since the last call
        are free again.  Any view of them still in one of the `outs` lists
        (output the socket did not take yet) is replaced by a copy first;
        I/O that waited for those slots starts."""
        if not self.lent:
            return
        mm = self.mm
        for out in outs:
            for k, b in enumerate(out):
                if type(b) is memoryview and b.obj is mm:
                    out[k] = bytes(b)
                    self.copied += 1
        for i in self.lent:
            self._give_back(i)
        self.lent = []
        self._start_waiting()
        if self.queued:
            self.flush()

    def _reap(self):
        """[(slot, res)] of the completed I/O, without blocking."""
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
        n = self._lib.syscall(self._nr[2], self.ctx, _L0, _L(len(self.tokens)), ev, self.zero)
        if n < 0:
            if ctypes.get_errno() != errno.EINTR:
                log.error("io_getevents: %s", os.strerror(ctypes.get_errno()))
            return []
        return [EVENT.unpack_from(ev, k * EVENT.size)[::2] for k in range(n)]

    def _drain_waiting(self):
        """io_submit refused for good: what waited for a slot goes back to
        the caller's synchronous path (reads: data None; writes: err -1)."""
        w, self.waiting = self.waiting, collections.deque()
        for op, fd, offset, length, data, token, dsync in w:
            try:
                if op == IOCB_CMD_PREAD:
                    self.done(token, None)
                else:
                    self.write_done(token, -1)
            except Exception:
                log.exception("I/O completion failed")

    def drop_waiting(self, owner):
        """Forget the waiting I/O whose token's first item is owner (a queue
        whose connection closed: nobody waits for their completions)."""
        if self.waiting:
            self.waiting = collections.deque(w for w in self.waiting if w[5][0] is not owner)

    def close(self):
        """Wait for I/O in flight (io_destroy does), then free everything."""
        self.ok = False
        self.waiting = collections.deque()
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
        if getattr(self, "view", None) is not None:
            self.view.release()
            self.view = None
        if getattr(self, "mm", None) is not None:
            try:
                self.mm.close()
            except BufferError:     # a lent view still somewhere: freed with it
                pass
            self.mm = None
        self.lent = []
        self.reserved = {}
        self.queued = []
        self.tokens = [None] * len(self.tokens)
        self.inflight = 0


AioReads = Aio        # the name before writes came here
