"""CRC32C (Castagnoli) for NVMe/TCP header and data digests.

The C-backed `crc32c` package is used when importable (Debian python3-crc32c);
otherwise a table-driven pure-Python fallback, which is slow but correct.
Digests go on the wire little-endian: put_unaligned_le32(~crc32c(~0, buf)).
"""

import struct

try:
    from crc32c import crc32c as _fast
except ImportError:  # pragma: no cover - depends on the machine
    _fast = None


def _make_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c_pure(data, crc=0):
    """Same contract as crc32c.crc32c: pass the previous value to continue."""
    c = crc ^ 0xFFFFFFFF
    table = _TABLE
    for b in memoryview(data).cast("B"):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


crc32c = _fast if _fast is not None else crc32c_pure
HAVE_FAST = _fast is not None

_LE32 = struct.Struct("<I")


def digest(data):
    """The 4 digest bytes of data (bytes-like, or a list of bytes-like)."""
    if isinstance(data, (list, tuple)):
        c = 0
        for part in data:
            c = crc32c(part, c)
        return _LE32.pack(c)
    return _LE32.pack(crc32c(data))
