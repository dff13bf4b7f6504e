"""CRC32C (Castagnoli) for NVMe/TCP header and data digests.

The C-backed `crc32c` package is used when importable (Debian python3-crc32c);
otherwise a table-driven pure-Python fallback, which is slow but correct.
Either is chosen on the first digest, not at import: the package imports
importlib.metadata (40 ms natively, a second in the TCG guest), a cost of
every target start although most hosts ask for no digest.
Digests go on the wire little-endian: put_unaligned_le32(~crc32c(~0, buf)).
"""

import struct


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


_chosen = []


def crc32c(data, crc=0):
    """crc32c.crc32c where the package is importable, else crc32c_pure."""
    if not _chosen:
        try:
            from crc32c import crc32c as fast
        except ImportError:  # pragma: no cover - depends on the machine
            fast = crc32c_pure
        _chosen.append(fast)
    return _chosen[0](data, crc)


_LE32 = struct.Struct("<I")


def digest(data):
    """The 4 digest bytes of data (bytes-like, or a list of bytes-like)."""
    if isinstance(data, (list, tuple)):
        c = 0
        for part in data:
            c = crc32c(part, c)
        return _LE32.pack(c)
    return _LE32.pack(crc32c(data))
