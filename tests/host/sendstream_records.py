"""ZFS send streams built record by record for the host tests (not a test
module): each builder returns [312-byte header, payloads...] for byte order e
("<" or ">"), laid out as openzfs include/sys/zfs_ioctl.h has them; stream()
concatenates them (with checksum=True: each record's drr_checksum filled as
dump_record does)."""

import struct

from plugins.volume import sendstream as ss

MAGIC = 0x2F5BACBAC
TOGUID = 0x1122334455667788
FROMGUID = 0x0102030405060708


def rec(e, rtype, body, payloadlen=0):
    """One 312-byte header: type, payloadlen, then the union packed by `body`."""
    b = bytearray(312)
    struct.pack_into(e + "II", b, 0, rtype, payloadlen)
    b[8:8 + len(body)] = body
    return b


def begin(e, payload=b"", hdrtype=1, fromguid=FROMGUID, name=b"p/v@b", features=0):
    vi = hdrtype | (features << 2)
    body = struct.pack(e + "QQQIIQQ256s", MAGIC, vi, 1700000000, 3, 0, TOGUID, fromguid, name)
    return [rec(e, ss.DRR_BEGIN, body, len(payload)), payload]


def obj(e, objnum=1, bonuslen=5, raw_bonuslen=0, blksz=16384, pl=True):
    body = struct.pack(e + "QIIII4BIQ3B5xQ", objnum, 23, 0, blksz, bonuslen, 7, 0, 1, 0,
                       raw_bonuslen, TOGUID, 17, 2, 1, 99)
    size = raw_bonuslen or (bonuslen + 7) // 8 * 8
    return [rec(e, ss.DRR_OBJECT, body)] + ([b"\xbb" * size] if pl else [])


def write(e, off, lsize, comp=0, csize=0, objnum=1, pl=True):
    body = struct.pack(e + "QI4xQQQ3B5x40xQ", objnum, 23, off, lsize, TOGUID, 7, 0, comp, csize)
    return [rec(e, ss.DRR_WRITE, body)] + ([b"\xcc" * (csize if comp else lsize)] if pl else [])


def free(e, off, length, objnum=1):
    return [rec(e, ss.DRR_FREE, struct.pack(e + "QQQQ", objnum, off, length, TOGUID))]


def freeobjects(e, first, num):
    return [rec(e, ss.DRR_FREEOBJECTS, struct.pack(e + "QQQ", first, num, TOGUID))]


def byref(e, off, length):
    return [rec(e, ss.DRR_WRITE_BYREF, struct.pack(e + "QQQQQQQ", 1, off, length, TOGUID,
                                                   FROMGUID, 1, 0))]


def spill(e, length, csize=0, pl=True):
    body = struct.pack(e + "QQQBB6xQ", 5, length, TOGUID, 0, 0, csize)
    return [rec(e, ss.DRR_SPILL, body)] + ([b"\xdd" * (csize or length)] if pl else [])


def embedded(e, off, length, psize, pl=True):
    body = struct.pack(e + "QQQQBB6xII", 1, off, length, TOGUID, 15, 0, length, psize)
    return [rec(e, ss.DRR_WRITE_EMBEDDED, body)] + ([b"\xee" * ((psize + 7) // 8 * 8)] if pl else [])


def object_range(e, first, n):
    return [rec(e, ss.DRR_OBJECT_RANGE, struct.pack(e + "QQQ", first, n, TOGUID))]


def redact(e, off, length):
    return [rec(e, ss.DRR_REDACT, struct.pack(e + "QQQQ", 1, off, length, TOGUID))]


def end(e, toguid=TOGUID):
    return [rec(e, ss.DRR_END, struct.pack(e + "4QQ", 0, 0, 0, 0, toguid))]


def fletcher(e, data, state=(0, 0, 0, 0)):
    a, b, c, d = state
    m = (1 << 64) - 1
    for (w,) in struct.iter_unpack(e + "I", data):
        a = (a + w) & m
        b = (b + a) & m
        c = (c + b) & m
        d = (d + c) & m
    return (a, b, c, d)


def stream(e, parts, checksum=False):
    """Concatenate [header, payload...] lists; with checksum, fill each
    non-BEGIN header's drr_checksum as dump_record does."""
    out = bytearray()
    st = (0, 0, 0, 0)
    for part in parts:
        hdr, payloads = bytearray(part[0]), part[1:]
        if checksum:
            rtype = struct.unpack_from(e + "I", hdr, 0)[0]
            if rtype == ss.DRR_BEGIN:
                st = (0, 0, 0, 0)
            st = fletcher(e, bytes(hdr[:280]), st)
            if rtype != ss.DRR_BEGIN:
                struct.pack_into(e + "4Q", hdr, 280, *st)
            st = fletcher(e, bytes(hdr[280:]), st)
            for p in payloads:
                st = fletcher(e, p, st)
        out += hdr
        for p in payloads:
            out += p
    return bytes(out)
