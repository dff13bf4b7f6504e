"""NVM command set I/O (NVMe NVM command set spec; drivers/nvme/target/io-cmd-bdev.c),
executed on a blockio.backend.Backend: a zvol or a regular file alike.

Reads and writes go by the loop's AIO (aio.py) on the volume's O_DIRECT
descriptor when it has one, several in flight like the kernel target's bios:
no page cache, so a write completes once it is in the zvol (a later Flush,
an fsync of the volume, makes it durable; FUA: RWF_DSYNC, durable when it
completes) and the writeback is never left for later.  Data is not copied on
the way: a read's bytes go to the host from its AIO slot, a whole write's
H2CData is received into the slot it is written from (write_buffer); a small
read from a host that sends one command at a time (Queue.lone_read) is a
synchronous O_DIRECT read into a slot, without AIO's round trip.  Without AIO or
O_DIRECT (old kernel, seccomp, a filesystem that refuses it) everything is
synchronous and buffered: pread/pwrite, reads >= SPAN_MIN by sendfile from
the page cache (filespan.py), FUA by fdatasync.  A volume is served one way or
the other, not both, except for I/O the kernel refuses to take direct (not
aligned to the device's logical block: never with zvols)."""

import errno
import os
import struct

from . import status as st
from .aio import BIG
from .command import DEFERRED, Result
from .filespan import FileSpan

FLUSH, WRITE, READ, WRITE_ZEROES, DSM = 0x00, 0x01, 0x02, 0x08, 0x09
FUA = 1 << 30           # cdw12
DEAC = 1 << 25          # cdw12, Write Zeroes: deallocate
DSM_AD = 1 << 2         # cdw11
SPAN_MIN = 16384         # smaller reads: one pread + the batched sendmsg is cheaper
SYNC_MAX = 16384         # a lone read up to this size may be synchronous (QD1)
_RANGE = struct.Struct("<IIQ")      # cattr, nlb (1-based), slba
DSM_MAX_DATA = 256 * _RANGE.size     # NR is 8 bits, 0's based


def _lba_range(sub, slba, nlb):
    if slba + nlb > sub.nsze():
        raise st.NvmeError(st.LBA_RANGE | st.DNR)
    return slba << sub.lbads, nlb << sub.lbads


def _writable(sub):
    if sub.readonly:
        raise st.NvmeError(st.NS_WRITE_PROTECTED | st.DNR)


def execute(queue, cmd, data):
    ctrl = queue.ctrl
    if not ctrl.ready:
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    sub = ctrl.subsys
    op = cmd.opcode
    if op not in _OPS:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)
    if cmd.nsid != 1 and not (op == FLUSH and cmd.nsid == 0xFFFFFFFF):
        raise st.NvmeError(st.INVALID_NS | st.DNR)
    try:
        if op == READ:
            if queue.aio is not None and cmd.sgl_len <= BIG and _read_async(queue, sub, cmd):
                return DEFERRED
            if cmd.sgl_len >= SPAN_MIN and not queue.ddgst:
                return _read_span(sub, cmd)
        elif queue.aio is not None:
            if op == WRITE and _write_async(queue, sub, cmd, data):
                return DEFERRED
            if op == FLUSH and _flush_async(queue, sub, cmd):
                return DEFERRED
        return _OPS[op](sub, cmd, data)
    except OSError as e:
        raise st.NvmeError(st.error_from_oserror(e, write=op != READ), msg=str(e))


def check_data_out(queue, cmd):
    """Before an R2T is granted for cmd's data: would it run?  The checks of
    execute() and of the command itself that need no data (ready, opcode,
    namespace, write protection, length and LBA range)."""
    ctrl = queue.ctrl
    if not ctrl.ready:
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    op = cmd.opcode
    if op not in _OPS:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)
    if cmd.nsid != 1:
        raise st.NvmeError(st.INVALID_NS | st.DNR)
    sub = ctrl.subsys
    if op == WRITE:
        _writable(sub)
        _rw_args(sub, cmd)
    elif op == DSM:
        _writable(sub)
        if cmd.sgl_len > DSM_MAX_DATA:
            raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
    else:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)     # takes no data


def _rw_args(sub, cmd):
    slba = cmd.cdw10 | (cmd.cdw11 << 32)
    nlb = (cmd.cdw12 & 0xFFFF) + 1
    if cmd.sgl_len != nlb << sub.lbads:
        raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
    return _lba_range(sub, slba, nlb)


def _read(sub, cmd, data):
    offset, length = _rw_args(sub, cmd)
    buf = bytearray(length)
    sub.backend.readinto(offset, buf, checked=True)    # against nsze()
    sub.stats["reads"] += 1
    sub.stats["read_bytes"] += length
    return Result(data=buf)


def _read_async(queue, sub, cmd):
    """Queue the read on the loop's AIO (aio.py); False: read it synchronously."""
    offset, length = _rw_args(sub, cmd)
    be = sub.backend
    if (offset | length) & (be.logical_block_size - 1):
        return False             # O_DIRECT alignment
    fd = be.direct_fd()
    if fd < 0:
        return False
    aio = queue.aio
    if length <= SYNC_MAX and queue.lone_read():
        data = aio.read_now(fd, offset, length)      # QD1: no round trip through AIO
        if data is not None:
            queue.complete_read(cmd.cid, data)
            stats = sub.stats
            stats["reads"] += 1
            stats["read_bytes"] += length
            return True
    if not aio.submit(be, offset, length, (queue, cmd.cid, sub, offset, length)):
        return False
    stats = sub.stats
    stats["reads"] += 1
    stats["read_bytes"] += length
    return True


def read_done(token, data):
    """AIO completion (AioReads.done): data, or None to redo it synchronously."""
    queue, cid, sub, offset, length = token
    if data is None and not queue.closing:
        try:
            data = bytearray(length)
            sub.backend.readinto(offset, data, checked=True)
        except OSError as e:
            return queue.complete(cid, Result(st.error_from_oserror(e)))
    queue.complete_read(cid, data)


def _write_async(queue, sub, cmd, data):
    """Queue the write on the loop's AIO; False: write it synchronously."""
    _writable(sub)
    offset, length = _rw_args(sub, cmd)
    be = sub.backend
    if length > BIG or (offset | length) & (be.logical_block_size - 1):
        return False
    fua = bool(cmd.cdw12 & FUA)
    if be.direct_fd() < 0 or not queue.aio.submit_write(
            be, offset, data, (queue, cmd.cid, sub, offset, data, fua), dsync=fua):
        return False
    stats = sub.stats
    stats["writes"] += 1
    stats["write_bytes"] += length
    return True


def write_buffer(queue, cmd):
    """An AIO slot (Aio.reserve) for write cmd's data to be received into, so
    that _write_async starts it from there with no copy; None where it would
    not go by AIO (checked as execute and _write_async check it)."""
    ctrl = queue.ctrl
    if ctrl is None or not ctrl.ready or cmd.opcode != WRITE or cmd.nsid != 1:
        return None
    sub = ctrl.subsys
    if sub.readonly:
        return None
    try:
        offset, length = _rw_args(sub, cmd)
    except st.NvmeError:
        return None
    be = sub.backend
    if length > BIG or (offset | length) & (be.logical_block_size - 1) or be.direct_fd() < 0:
        return None
    return queue.aio.reserve(length)


def write_done(token, err):
    """AIO completion of a write or a Flush (data None) (Aio.write_done): 0,
    an errno, or -1: not done, do it synchronously (AIO went away while it
    waited for a slot)."""
    queue, cid, sub, offset, data, fua = token
    if queue.closing:
        return        # never acknowledged: whether it landed does not matter
    if err == errno.EINVAL or err == -1:
        # O_DIRECT refused this one (alignment of a file's filesystem): buffered
        try:
            if data is None:              # a Flush
                sub.backend.flush()
            else:
                sub.backend.write(offset, data, fua=fua, checked=True)
            err = 0
        except OSError as e:
            err = e.errno or errno.EIO
    if err:
        return queue.complete(cid, Result(st.error_from_oserror(OSError(err, os.strerror(err)),
                                                                write=True)))
    queue.complete(cid, _OK)


def _read_span(sub, cmd):
    """The data is sent from the page cache by the server (filespan.py)."""
    offset, length = _rw_args(sub, cmd)
    sub.stats["reads"] += 1
    sub.stats["read_bytes"] += length
    return Result(data=FileSpan(sub.backend, offset, length))


def _write(sub, cmd, data):
    _writable(sub)
    offset, length = _rw_args(sub, cmd)
    sub.backend.write(offset, data, fua=bool(cmd.cdw12 & FUA), checked=True)
    sub.stats["writes"] += 1
    sub.stats["write_bytes"] += length
    return Result()


def _flush(sub, cmd, data):
    if not sub.readonly:
        sub.backend.flush()
    return Result()


def _flush_async(queue, sub, cmd):
    """Queue the Flush as an AIO fsync (the loop goes on meanwhile); it
    covers every write completed before it, as the kernel's does.  False:
    flush synchronously."""
    if sub.readonly:
        return False
    be = sub.backend
    return be.direct_fd() >= 0 and queue.aio.submit_fsync(be, (queue, cmd.cid, sub, 0, None,
                                                                  False))


def _write_zeroes(sub, cmd, data):
    _writable(sub)
    slba = cmd.cdw10 | (cmd.cdw11 << 32)
    offset, length = _lba_range(sub, slba, (cmd.cdw12 & 0xFFFF) + 1)
    sub.backend.write_zeroes(offset, length, unmap=bool(cmd.cdw12 & DEAC))
    return Result()


def _dsm(sub, cmd, data):
    _writable(sub)
    nr = (cmd.cdw10 & 0xFF) + 1
    # Linux always sends a 4096-byte payload whatever NR is (nvme_setup_discard).
    if data is None or len(data) < nr * _RANGE.size:
        raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
    if not cmd.cdw11 & DSM_AD:
        return Result()
    ranges = [_RANGE.unpack_from(data, i * _RANGE.size) for i in range(nr)]
    spans = [_lba_range(sub, slba, nlb) for _, nlb, slba in ranges]   # check all first
    for offset, length in spans:
        if length:
            sub.backend.discard(offset, length)
    return Result()


_OK = Result()
_OPS = {READ: _read, WRITE: _write, FLUSH: _flush, WRITE_ZEROES: _write_zeroes, DSM: _dsm}
