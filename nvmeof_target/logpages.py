"""Get Log Page contents (NVMe base spec §5.16).  Each builder returns the
whole page; the caller serves [offset, offset+length) and zero-fills past it."""

import struct

_ADMIN_OPS = (0x02, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18)
_IO_READ_OPS = (0x00, 0x02, 0x09)
_IO_WRITE_OPS = (0x01, 0x08)        # change logical block content


def error_log():
    return bytes(64)


def smart(stats):
    b = bytearray(512)
    b[0] = 0                                    # critical warning
    struct.pack_into("<H", b, 1, 273 + 30)      # composite temperature, Kelvin
    b[3] = 100                                  # available spare
    b[4] = 10                                   # spare threshold
    # data units are thousands of 512-byte units, rounded up
    units = lambda nbytes: (nbytes // 512 + 999) // 1000  # noqa: E731
    struct.pack_into("<QQQQQQQQ", b, 32,
                     units(stats["read_bytes"]), 0, units(stats["write_bytes"]), 0,
                     stats["reads"], 0, stats["writes"], 0)
    struct.pack_into("<Q", b, 112, 1)           # power cycles
    return b


def firmware_slots(firmware):
    b = bytearray(512)
    b[0] = 1                                    # active slot 1
    raw = firmware.encode("ascii")[:8]
    b[8:16] = raw + b" " * (8 - len(raw))
    return b


def changed_ns(changed):
    b = bytearray(4096)
    if changed:
        struct.pack_into("<I", b, 0, 1)
    return b


def effects():
    b = bytearray(4096)
    for op in _ADMIN_OPS:
        struct.pack_into("<I", b, op * 4, 1)            # CSUPP
    for op in _IO_READ_OPS:
        struct.pack_into("<I", b, 1024 + op * 4, 1)
    for op in _IO_WRITE_OPS:
        struct.pack_into("<I", b, 1024 + op * 4, 3)     # CSUPP | LBCC
    return b


def window(page, offset, length):
    """Bytes [offset, offset+length) of page, zeros past its end."""
    out = bytearray(length)
    part = page[offset:offset + length]
    out[:len(part)] = part
    return out
