"""Block status providers.

A provider is a callable ``provider(backend, offset, length) -> [(length, flags)]``
describing the bytes from ``offset`` on: consecutive extents, the first starting
at ``offset``, each longer than 0, together covering at least one byte and at
most ``length`` bytes (a shorter answer is allowed; the client asks again).
The transmission layer clips, merges and caps what a provider returns, so a
provider only has to be right.  Providers are called from several connection
threads at once: keep them free of shared mutable state, or lock it.

- ``default_allocation``: ``base:allocation`` for any Backend: SEEK_DATA/SEEK_HOLE
  on regular files, "all data" on block devices (they answer SEEK_HOLE with
  EINVAL; zvol allocation comes from ZFS and is given as an ExtentMap or any
  other provider).
- ``ExtentMap``: a precomputed map (sorted (offset, length, flags) runs, gaps
  take ``default``), e.g. computed from a ZFS send stream.
- ``DirtyBitmap``: ``qemu:dirty-bitmap:NAME`` from a changed-block bitmap,
  bit i = block i of ``granularity`` bytes (64 KiB), MSB first in each byte,
  as Volume.list_changed_blocks encodes it; dirty blocks get flag 1.
"""

import base64
import bisect
import errno
import os

from nbd_server.constants import STATE_DIRTY, STATE_HOLE, STATE_ZERO

CBT_GRANULARITY = 64 * 1024
MAX_LSEEK_EXTENTS = 4096     # bound the syscalls one request may cost

_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def all_data(backend, offset, length):
    return [(length, 0)]


def file_allocation(backend, offset, length):
    """Holes of a sparse regular file as HOLE|ZERO, the rest as data."""
    fd = backend.fd
    end = offset + length
    out = []
    pos = offset
    while pos < end and len(out) < MAX_LSEEK_EXTENTS:
        try:
            data = os.lseek(fd, pos, _SEEK_DATA)
        except OSError as e:
            if e.errno != errno.ENXIO:      # no SEEK_DATA support: say "data"
                return out or [(length, 0)]
            data = end                      # no data after pos: hole to EOF
        if data > pos:
            stop = min(data, end)
            out.append((stop - pos, STATE_HOLE | STATE_ZERO))
            pos = stop
            continue
        hole = os.lseek(fd, pos, _SEEK_HOLE)
        stop = min(hole, end)
        out.append((stop - pos, 0))
        pos = stop
    return out


def default_allocation(backend, offset, length):
    if backend.is_block:
        return all_data(backend, offset, length)
    return file_allocation(backend, offset, length)


class ExtentMap:
    """A fixed map: runs = iterable of (offset, length, flags), non-overlapping;
    bytes no run covers have flags ``default`` (0: data, always safe)."""

    def __init__(self, runs, default=0):
        runs = sorted((int(o), int(n), int(f)) for o, n, f in runs if n > 0)
        for (o1, n1, _), (o2, _, _) in zip(runs, runs[1:]):
            if o1 + n1 > o2:
                raise ValueError("overlapping extents at %d" % o2)
        if any(o < 0 for o, _, _ in runs):
            raise ValueError("negative extent offset")
        self.runs = runs
        self.starts = [o for o, _, _ in runs]
        self.default = default

    @classmethod
    def from_allocated(cls, ranges, hole_flags=STATE_HOLE | STATE_ZERO):
        """A base:allocation map from the allocated (offset, length) ranges:
        everything else is a hole that reads as zeros."""
        return cls(((o, n, 0) for o, n in ranges), default=hole_flags)

    def __call__(self, backend, offset, length):
        end = offset + length
        out = []
        pos = offset
        i = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        while pos < end:
            if i < len(self.runs):
                o, n, f = self.runs[i]
                if o + n <= pos:
                    i += 1
                    continue
                if o > pos:                 # a gap before the next run
                    stop, flags = min(o, end), self.default
                else:
                    stop, flags = min(o + n, end), f
                    i += 1
            else:
                stop, flags = end, self.default
            out.append((stop - pos, flags))
            pos = stop
        return out


class DirtyBitmap:
    """Changed blocks since some point; blocks past the bitmap are clean."""

    def __init__(self, bitmap, granularity=CBT_GRANULARITY):
        if granularity < 512 or granularity & (granularity - 1):
            raise ValueError("bitmap granularity must be a power of 2 >= 512")
        self.bits = bytes(bitmap)
        self.granularity = granularity
        self.nblocks = len(self.bits) * 8

    @classmethod
    def from_base64(cls, text, granularity=CBT_GRANULARITY):
        return cls(base64.b64decode(text, validate=True), granularity)

    @classmethod
    def from_file(cls, path, granularity=CBT_GRANULARITY):
        """A file holding the raw bitmap bytes."""
        with open(path, "rb") as f:
            return cls(f.read(), granularity)

    def is_dirty(self, block):
        return block < self.nblocks and bool(self.bits[block >> 3] & (0x80 >> (block & 7)))

    def _run_end(self, block, dirty, limit):
        """First block in [block, limit) whose state differs, else limit."""
        bits = self.bits
        if not dirty and block >= self.nblocks:
            return limit
        full = 0xFF if dirty else 0x00
        while block < limit:
            if block >= self.nblocks:
                return block if dirty else limit
            if block & 7 == 0 and bits[block >> 3] == full:
                block += 8
                continue
            if self.is_dirty(block) != dirty:
                return block
            block += 1
        return limit

    def __call__(self, backend, offset, length):
        g = self.granularity
        end = offset + length
        last_block = (end + g - 1) // g
        out = []
        pos = offset
        while pos < end:
            block = pos // g
            dirty = self.is_dirty(block)
            stop = min(self._run_end(block + 1, dirty, last_block) * g, end)
            out.append((stop - pos, STATE_DIRTY if dirty else 0))
            pos = stop
        return out
