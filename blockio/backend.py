"""The bytes of one volume: a block device (a zvol in production) or a regular
file (sparse files in host tests).  The NVMe/TCP target and the NBD server both
serve volumes through this class, so no I/O code is written twice.

A Backend holds one fd from open() to close(); servers open it when the first
connection to a volume arrives and close it with the last, so an idle volume
costs no descriptor.  Range checks are the caller's job (protocol layer): it
knows which status to answer; this layer only refuses to go past the end.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct

from . import zvol

# linux/fs.h
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_HAVE_PREADV = hasattr(os, "preadv")


def _fallocate(fd, mode, offset, length):
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Backend:
    def __init__(self, path, readonly=False):
        self.path = path
        self.readonly = readonly
        # a /dev/zvol link udev has not made yet: the zvol's minor, by name
        self.fd = zvol.open_path(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        self._dfd = None           # O_DIRECT read descriptor, opened on first use
        try:
            st = os.fstat(self.fd)
            self.is_block = stat.S_ISBLK(st.st_mode)
            if not (self.is_block or stat.S_ISREG(st.st_mode)):
                raise OSError(errno.EINVAL, "not a block device or regular file: %s" % path)
            if self.is_block:
                self.logical_block_size = self._ioctl_int(BLKSSZGET)
                self.physical_block_size = self._ioctl_int(BLKPBSZGET)
            else:
                self.logical_block_size = 512
                self.physical_block_size = 4096
        except BaseException:
            os.close(self.fd)
            raise

    def _ioctl_int(self, req):
        return struct.unpack("I", fcntl.ioctl(self.fd, req, b"\0" * 4))[0]

    @property
    def size(self):
        """Current size in bytes, asked each time: volumes grow while served."""
        if self.is_block:
            return struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0]
        return os.fstat(self.fd).st_size

    def _check(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.ENOSPC if not self.readonly else errno.EINVAL,
                          "I/O beyond the end of %s" % self.path)

    def _check_writable(self):
        if self.readonly:
            raise OSError(errno.EROFS, "%s is read-only" % self.path)

    def readinto(self, offset, buf, checked=False):
        """Fill the writable buffer buf (a memoryview) from offset.  checked:
        the caller already range-checked against a size it tracks (saves a
        size syscall per I/O on the hot path)."""
        if not checked:
            self._check(offset, len(buf))
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            if _HAVE_PREADV:
                n = os.preadv(self.fd, [view[done:]], offset + done)  # novermin
            else:
                chunk = os.pread(self.fd, len(view) - done, offset + done)
                n = len(chunk)
                view[done:done + n] = chunk
            if n == 0:  # a file shorter than its size claims: reads as zeros
                view[done:] = bytes(len(view) - done)
                break
            done += n

    def direct_fd(self):
        """A second, O_DIRECT descriptor on the same volume, read-write unless
        the backend is read-only (I/O that bypasses the page cache, for async
        I/O; the kernel writes dirty cached pages of the range back first, and
        drops cached pages a direct write covers, so either way sees what the
        other wrote), or -1 where O_DIRECT is refused.  Opened on first use,
        closed by close().  Its I/O must be aligned to logical_block_size."""
        if self._dfd is None:
            if self.fd < 0:
                return -1
            # through our own fd, not the path: the same device even if the
            # path (a /dev/zvol link) now names another volume
            try:
                mode = os.O_RDONLY if self.readonly else os.O_RDWR
                fd = os.open("/proc/self/fd/%d" % self.fd, mode | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                fd = -1
            if fd >= 0:
                a, b = os.fstat(self.fd), os.fstat(fd)
                if (a.st_dev, a.st_ino, a.st_rdev) != (b.st_dev, b.st_ino, b.st_rdev):
                    os.close(fd)
                    fd = -1
            self._dfd = fd
        return self._dfd

    def read(self, offset, length):
        buf = bytearray(length)
        self.readinto(offset, buf)
        return buf

    def write(self, offset, data, fua=False, checked=False):
        self._check_writable()
        view = memoryview(data).cast("B")
        if not checked:
            self._check(offset, len(view))
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)
        if fua:
            os.fdatasync(self.fd)

    def flush(self):
        if not self.readonly:
            os.fsync(self.fd)

    def discard(self, offset, length):
        """Deallocate a range; it reads back as zeros (zvol holes, file holes)."""
        self._check_writable()
        self._check(offset, length)
        if length == 0:
            return
        if self.is_block:
            fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
        else:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset, length, unmap=True):
        """Make a range read as zeros; with unmap it may also free the space."""
        self._check_writable()
        self._check(offset, length)
        if length == 0:
            return
        if self.is_block:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
        elif unmap:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)

    def close(self):
        if self._dfd is not None and self._dfd >= 0:
            os.close(self._dfd)
        self._dfd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
