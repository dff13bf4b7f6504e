"""Sans-IO parser of the `zfs send` record stream (headers only).

A stream is a sequence of fixed 312-byte ``dmu_replay_record`` headers, each
followed by a payload whose size is computed from the header's own fields
(``include/sys/zfs_ioctl.h``, ``DRR_*_PAYLOAD_SIZE``); ``drr_payloadlen`` is set
only on DRR_BEGIN.  Payloads are skipped, never kept (except BEGIN's nvlist,
which is bounded), so memory stays constant whatever the stream size.

    p = StreamParser()
    for rec in p.feed(chunk): ...        # any chunking, byte by byte included
    p.close()                            # raises if the stream was cut short

or ``for rec in iter_records(fileobj)`` to read a pipe with ``readinto`` on one
reused buffer.  Byte-swapped streams (sent from a host of the other
endianness) are recognised by DRR_BEGIN's magic.  Fletcher-4 verification of
the running stream checksum is optional: it has to read every payload byte and
costs pure-Python time, so header-only consumers leave it off.
"""

import struct
from collections import namedtuple

RECORD_SIZE = 312
CHECKSUM_OFFSET = 280          # drr_checksum.drr_checksum: last 32 bytes
DMU_BACKUP_MAGIC = 0x2F5BACBAC
UINT64_MAX = (1 << 64) - 1
OBJECT_END = UINT64_MAX         # DRR_FREE length meaning "to the end of the object"

(DRR_BEGIN, DRR_OBJECT, DRR_FREEOBJECTS, DRR_WRITE, DRR_FREE, DRR_END,
 DRR_WRITE_BYREF, DRR_SPILL, DRR_WRITE_EMBEDDED, DRR_OBJECT_RANGE,
 DRR_REDACT) = range(11)
DRR_NUMTYPES = 11
TYPE_NAMES = ("BEGIN", "OBJECT", "FREEOBJECTS", "WRITE", "FREE", "END",
              "WRITE_BYREF", "SPILL", "WRITE_EMBEDDED", "OBJECT_RANGE", "REDACT")

DMU_SUBSTREAM = 1
DMU_COMPOUNDSTREAM = 2

# Sanity bounds on declared sizes, so that garbage cannot make us wait for
# (or account) absurd payloads.  SPA_MAXBLOCKSIZE is 16 MiB; a dnode's bonus
# buffer is at most DNODE_MAX_SIZE (16 KiB); an embedded block pointer holds
# at most BPE_PAYLOAD_SIZE (112) bytes.
MAX_BLOCK = 16 << 20
MAX_BONUS = 16 << 10
MAX_EMBEDDED = 112
MAX_BEGIN_PAYLOAD = 16 << 20

# One record, decoded.  `object`, `offset`, `length` have the meaning of the
# type (FREEOBJECTS/OBJECT_RANGE: first object and count in offset/length;
# WRITE: logical size in length); `payload_size` is what follows the header;
# `info` is a dict of the remaining fields of the type (small, per record).
Record = namedtuple("Record", "type object offset length payload_size info")


class StreamError(ValueError):
    """The bytes are not a well-formed send stream (garbage, cut short, bad checksum)."""


def _formats(endian):
    e = endian
    return {
        # type, payloadlen, then the union
        "head": struct.Struct(e + "II"),
        DRR_BEGIN: struct.Struct(e + "8xQQQIIQQ256s"),
        DRR_OBJECT: struct.Struct(e + "8xQIIII4BIQ3B5xQ"),
        DRR_FREEOBJECTS: struct.Struct(e + "8xQQQ"),
        DRR_WRITE: struct.Struct(e + "8xQI4xQQQ3B5x40xQ"),
        DRR_FREE: struct.Struct(e + "8xQQQQ"),
        DRR_END: struct.Struct(e + "8x4QQ"),
        DRR_WRITE_BYREF: struct.Struct(e + "8xQQQQQQQ"),
        DRR_SPILL: struct.Struct(e + "8xQQQBB6xQ"),
        DRR_WRITE_EMBEDDED: struct.Struct(e + "8xQQQQBB6xII"),
        DRR_OBJECT_RANGE: struct.Struct(e + "8xQQQ"),
        DRR_REDACT: struct.Struct(e + "8xQQQQ"),
        "cksum": struct.Struct(e + "4Q"),
    }


_FMT = {"<": _formats("<"), ">": _formats(">")}
_MAGIC = struct.Struct("<Q")


def _roundup8(n):
    return (n + 7) & ~7


def _decode(fmt, buf):
    """Decode one 312-byte header (bytes-like) into (Record, extra payload bound check)."""
    rtype, payloadlen = fmt["head"].unpack_from(buf, 0)
    if rtype >= DRR_NUMTYPES:
        raise StreamError("unknown record type %d" % rtype)
    v = fmt[rtype].unpack_from(buf, 0)
    if rtype == DRR_WRITE:
        obj, wtype, off, lsize, toguid, cktype, flags, ctype, csize = v
        psize = csize if ctype else lsize
        if lsize > MAX_BLOCK or psize > MAX_BLOCK:
            raise StreamError("WRITE of %d bytes (compressed %d) is larger than a block"
                              % (lsize, csize))
        return Record(rtype, obj, off, lsize, psize,
                      {"type": wtype, "toguid": toguid, "checksumtype": cktype,
                       "flags": flags, "compression": ctype, "compressed_size": csize})
    if rtype == DRR_FREE:
        obj, off, length, toguid = v
        return Record(rtype, obj, off, length, 0, {"toguid": toguid})
    if rtype == DRR_WRITE_EMBEDDED:
        obj, off, length, toguid, comp, etype, lsize, psize = v
        if psize > MAX_EMBEDDED or lsize > MAX_BLOCK:
            raise StreamError("WRITE_EMBEDDED with psize %d / lsize %d" % (psize, lsize))
        return Record(rtype, obj, off, length, _roundup8(psize),
                      {"toguid": toguid, "compression": comp, "etype": etype,
                       "lsize": lsize, "psize": psize})
    if rtype == DRR_OBJECT:
        (obj, otype, bonustype, blksz, bonuslen, cktype, comp, dn_slots, flags,
         raw_bonuslen, toguid, indblkshift, nlevels, nblkptr, maxblkid) = v
        psize = raw_bonuslen if raw_bonuslen else _roundup8(bonuslen)
        if psize > MAX_BONUS or blksz > MAX_BLOCK:
            raise StreamError("OBJECT %d with bonus %d / block size %d" % (obj, psize, blksz))
        return Record(rtype, obj, 0, 0, psize,
                      {"type": otype, "bonustype": bonustype, "blksz": blksz,
                       "bonuslen": bonuslen, "raw_bonuslen": raw_bonuslen,
                       "checksumtype": cktype, "compress": comp, "dn_slots": dn_slots,
                       "flags": flags, "toguid": toguid, "indblkshift": indblkshift,
                       "nlevels": nlevels, "nblkptr": nblkptr, "maxblkid": maxblkid})
    if rtype == DRR_FREEOBJECTS:
        first, num, toguid = v
        return Record(rtype, first, first, num, 0, {"toguid": toguid})
    if rtype == DRR_BEGIN:
        magic, versioninfo, ctime, ostype, flags, toguid, fromguid, toname = v
        if payloadlen > MAX_BEGIN_PAYLOAD:
            raise StreamError("BEGIN payload of %d bytes" % payloadlen)
        return Record(rtype, 0, 0, 0, payloadlen,
                      {"magic": magic, "versioninfo": versioninfo,
                       "hdrtype": versioninfo & 3, "features": (versioninfo >> 2) & 0x3FFFFFFF,
                       "creation_time": ctime, "type": ostype, "flags": flags,
                       "toguid": toguid, "fromguid": fromguid,
                       "toname": toname.split(b"\0", 1)[0].decode("utf-8", "replace")})
    if rtype == DRR_END:
        c0, c1, c2, c3, toguid = v
        return Record(rtype, 0, 0, 0, 0, {"checksum": (c0, c1, c2, c3), "toguid": toguid})
    if rtype == DRR_WRITE_BYREF:
        obj, off, length, toguid, refguid, refobj, refoff = v
        return Record(rtype, obj, off, length, 0,
                      {"toguid": toguid, "refguid": refguid, "refobject": refobj,
                       "refoffset": refoff})
    if rtype == DRR_SPILL:
        obj, length, toguid, flags, ctype, csize = v
        psize = csize if csize else length
        if psize > MAX_BLOCK:
            raise StreamError("SPILL of %d bytes" % psize)
        return Record(rtype, obj, 0, length, psize,
                      {"toguid": toguid, "flags": flags, "compression": ctype,
                       "compressed_size": csize})
    if rtype == DRR_OBJECT_RANGE:
        first, numslots, toguid = v
        return Record(rtype, first, first, numslots, 0, {"toguid": toguid})
    # DRR_REDACT
    obj, off, length, toguid = v
    return Record(rtype, obj, off, length, 0, {"toguid": toguid})


class Fletcher4(object):
    """Incremental fletcher-4 (native order words, as dump_record computes it)."""

    __slots__ = ("a", "b", "c", "d", "_fmt", "_tail")
    M = UINT64_MAX

    def __init__(self, endian="<"):
        self.a = self.b = self.c = self.d = 0
        self._fmt = endian
        self._tail = b""

    def update(self, data):
        data = bytes(data)
        if self._tail:
            data = self._tail + data
        n = len(data) & ~3
        self._tail = data[n:]
        if not n:
            return
        a, b, c, d = self.a, self.b, self.c, self.d
        for (w,) in struct.iter_unpack(self._fmt + "I", data[:n]):
            a += w
            b += a
            c += b
            d += c
        m = self.M
        self.a, self.b, self.c, self.d = a & m, b & m, c & m, d & m

    def value(self):
        return (self.a, self.b, self.c, self.d)


class StreamParser(object):
    """Feed bytes, get Records.  Stops accepting data after the last DRR_END of
    the stream (one substream, or a compound stream's END with toguid 0)."""

    def __init__(self, verify_checksum=False):
        self._hdr = bytearray()
        self._skip = 0              # payload bytes still to skip
        self._payload = None        # bytearray while collecting BEGIN's payload
        self._begin = None          # the pending BEGIN record (until its payload is in)
        self._fmt = None
        self._endian = None
        # start -> (BEGIN) sub -> (END) done, or for a compound stream (zfs
        # send -R/-p): start -> header -> (END) between -> (BEGIN) sub ->
        # (END) between ... -> (bare END) done
        self._state = "start"
        self._compound = False
        self.done = False
        self.bytes_seen = 0         # every byte fed, headers and payloads
        self.payload_bytes = 0      # payload bytes skipped (or kept, for BEGIN)
        self.records = 0
        self.endian = None          # "<" or ">" once BEGIN is read
        self.byteswapped = False
        self._verify = verify_checksum
        self._ck = None

    # -- public ------------------------------------------------------------
    def feed(self, data):
        """Parse `data` (bytes-like); return the list of complete records in it."""
        out = []
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        while pos < n:
            if self.done:
                raise StreamError("%d bytes of trailing data after the final END" % (n - pos))
            if self._skip:
                take = min(self._skip, n - pos)
                chunk = mv[pos:pos + take]
                if self._payload is not None:
                    self._payload += chunk
                if self._ck is not None:
                    self._ck.update(chunk)
                self._skip -= take
                self.payload_bytes += take
                pos += take
                if not self._skip and self._payload is not None:
                    out.append(self._finish_begin())
                continue
            need = RECORD_SIZE - len(self._hdr)
            if not self._hdr and n - pos >= RECORD_SIZE:
                hdr = mv[pos:pos + RECORD_SIZE]        # fast path: no copy
                pos += RECORD_SIZE
            else:
                take = min(need, n - pos)
                self._hdr += mv[pos:pos + take]
                pos += take
                if len(self._hdr) < RECORD_SIZE:
                    break
                hdr = self._hdr
            rec = self._header(hdr)
            self._hdr = bytearray()
            if rec is not None:
                out.append(rec)
        self.bytes_seen += n
        return out

    def close(self):
        """Call at EOF: raises StreamError unless the stream ended cleanly."""
        if self.done:
            return
        if self._fmt is None and not self._hdr:
            raise StreamError("empty stream")
        if self._hdr or self._skip:
            raise StreamError("stream truncated inside a record (%d bytes in)" % self.bytes_seen)
        raise StreamError("stream truncated: no final END record (%d bytes)" % self.bytes_seen)

    # -- internals ---------------------------------------------------------
    def _header(self, hdr):
        if self._fmt is None:
            self._detect(hdr)
        fmt = self._fmt
        rec = _decode(fmt, hdr)
        self.records += 1
        if self._verify:
            if rec.type == DRR_BEGIN:
                self._ck = Fletcher4(self.endian)   # each substream checksums on its own
            self._check(rec, hdr)
        self._advance(rec)
        if rec.payload_size:
            self._skip = rec.payload_size
            if rec.type == DRR_BEGIN:
                self._payload = bytearray()
                self._begin = rec
                return None
        return rec

    def _advance(self, rec):
        t, st = rec.type, self._state
        if t == DRR_BEGIN:
            if rec.info["magic"] != DMU_BACKUP_MAGIC:
                raise StreamError("BEGIN record with a bad magic %#x" % rec.info["magic"])
            compound = rec.info["hdrtype"] == DMU_COMPOUNDSTREAM
            if st == "start":
                self._compound = compound
                self._state = "header" if compound else "sub"
            elif st == "between" and not compound:
                self._state = "sub"
            else:
                raise StreamError("unexpected BEGIN record (%s)" % st)
        elif t == DRR_END:
            if st in ("header", "sub"):
                self._state = "between" if self._compound else "done"
            elif st == "between":
                self._state = "done"
            else:
                raise StreamError("unexpected END record")
            self.done = self._state == "done"
        elif st != "sub":
            raise StreamError("%s record outside BEGIN..END" % TYPE_NAMES[t])

    def _finish_begin(self):
        rec = self._begin._replace(info=dict(self._begin.info, payload=bytes(self._payload)))
        self._payload = None
        self._begin = None
        return rec

    def _detect(self, hdr):
        (magic,) = _MAGIC.unpack_from(hdr, 8)
        if magic == DMU_BACKUP_MAGIC:
            e = "<"
        elif _swap64(magic) == DMU_BACKUP_MAGIC:
            e = ">"
        else:
            raise StreamError("not a ZFS send stream (no BEGIN magic)")
        self._fmt = _FMT[e]
        self.endian = e
        self.byteswapped = e == ">"

    def _check(self, rec, hdr):
        """dump_record: the checksum field holds fletcher-4 of everything before
        it in this substream (earlier records, payloads, this header's first 280
        bytes); it is then folded in too.  BEGIN carries zeros."""
        ck = self._ck
        ck.update(bytes(hdr[:CHECKSUM_OFFSET]))
        want = self._fmt["cksum"].unpack_from(hdr, CHECKSUM_OFFSET)
        if rec.type != DRR_BEGIN and want != ck.value() and any(want):
            raise StreamError("stream checksum mismatch at record %d (%s)"
                              % (self.records, TYPE_NAMES[rec.type]))
        ck.update(bytes(hdr[CHECKSUM_OFFSET:]))


def _swap64(v):
    return int.from_bytes(v.to_bytes(8, "little"), "big")


def iter_records(fileobj, bufsize=1 << 20, parser=None):
    """Read `fileobj` (anything with readinto) to EOF through one reused
    buffer, yielding records; raises StreamError on a malformed stream."""
    p = parser if parser is not None else StreamParser()
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    while True:
        n = fileobj.readinto(buf)
        if not n:
            break
        for rec in p.feed(mv[:n]):
            yield rec
        if p.done:
            # drain: trailing bytes are an error, reported by feed()
            continue
    p.close()


# -- nvlist payloads (DRR_BEGIN) -------------------------------------------
# `nvlist_pack` layout (module/nvpair/nvpair.c): a 4-byte header (encoding:
# 0 native, 1 XDR; endian: 1 little), then the list.  The kernel packs BEGIN's
# payload natively (resume offsets, redaction lists); libzfs packs compound
# stream headers with XDR.  Scalars, strings and arrays are decoded; nested
# lists are skipped in XDR (their encoded size is known) and refused in native
# encoding (where it is not).

class NvlistError(ValueError):
    pass


_NV_INT = {2: "B", 3: "h", 4: "H", 5: "i", 6: "I", 7: "q", 8: "Q", 18: "q",
           21: "i", 22: "b", 23: "B", 27: "d"}
_NV_ARR = {10: "B", 11: "h", 12: "H", 13: "i", 14: "I", 15: "q", 16: "Q",
           24: "i", 25: "b", 26: "B"}
# XDR widens every scalar below 64 bits to a 4-byte int.
_XDR_INT = {2: "I", 3: "i", 4: "I", 5: "i", 6: "I", 7: "q", 8: "Q", 18: "q",
            21: "i", 22: "i", 23: "I", 27: "d"}
_XDR_ARR = {11: "i", 12: "I", 13: "i", 14: "I", 15: "q", 16: "Q", 24: "i"}
DATA_TYPE_BOOLEAN, DATA_TYPE_STRING, DATA_TYPE_STRING_ARRAY = 1, 9, 17
DATA_TYPE_NVLIST, DATA_TYPE_NVLIST_ARRAY = 19, 20


def decode_nvlist(buf):
    """Decode a packed nvlist into a dict (nested lists: see above)."""
    buf = bytes(buf)
    if len(buf) < 4:
        raise NvlistError("nvlist shorter than its header")
    enc, endian = buf[0], buf[1]
    try:
        if enc == 1:
            return _xdr_list(buf, 4)
        if enc == 0:
            return _native_list(buf, 4, "<" if endian == 1 else ">")
    except struct.error:
        raise NvlistError("nvlist truncated")
    raise NvlistError("unknown nvlist encoding %d" % enc)


def _xdr_list(buf, pos):
    pos += 8                                   # nvl_version, nvl_nvflag
    out = {}
    while True:
        esize, dsize = struct.unpack_from(">ii", buf, pos)
        if esize == 0 and dsize == 0:
            return out
        if esize < 16 or pos + esize > len(buf):
            raise NvlistError("bad XDR nvpair size %d" % esize)
        end = pos + esize
        p = pos + 8
        (nlen,) = struct.unpack_from(">I", buf, p)
        name = buf[p + 4:p + 4 + nlen].decode("utf-8", "replace")
        p += 4 + ((nlen + 3) & ~3)
        dtype, nelem = struct.unpack_from(">ii", buf, p)
        p += 8
        if dtype == DATA_TYPE_BOOLEAN:
            val = True
        elif dtype in _XDR_INT:
            val = struct.unpack_from(">" + _XDR_INT[dtype], buf, p)[0]
        elif dtype == DATA_TYPE_STRING:
            (slen,) = struct.unpack_from(">I", buf, p)
            val = buf[p + 4:p + 4 + slen].decode("utf-8", "replace")
        elif dtype in (10, 25, 26):            # xdr_opaque, no count
            val = list(buf[p:p + nelem])
        elif dtype in _XDR_ARR:                # xdr_array: count, then elements
            (cnt,) = struct.unpack_from(">I", buf, p)
            val = list(struct.unpack_from(">%d%s" % (cnt, _XDR_ARR[dtype]), buf, p + 4))
        elif dtype == DATA_TYPE_STRING_ARRAY:
            val = []
            for _ in range(nelem):
                (slen,) = struct.unpack_from(">I", buf, p)
                val.append(buf[p + 4:p + 4 + slen].decode("utf-8", "replace"))
                p += 4 + ((slen + 3) & ~3)
        else:
            val = None                         # nested list or unknown: skipped
        out[name] = val
        pos = end


def _native_list(buf, pos, e):
    pos += 24                                  # nvlist_t: version, flag, priv, flag, pad
    out = {}
    while True:
        (size,) = struct.unpack_from(e + "i", buf, pos)
        if size == 0:
            return out
        if size < 16 or pos + size > len(buf):
            raise NvlistError("bad native nvpair size %d" % size)
        name_sz, _res, nelem, dtype = struct.unpack_from(e + "hhii", buf, pos + 4)
        name = buf[pos + 16:pos + 16 + name_sz].split(b"\0", 1)[0].decode("utf-8", "replace")
        v = pos + 16 + _roundup8(name_sz)
        if dtype == DATA_TYPE_BOOLEAN:
            val = True
        elif dtype in _NV_INT:
            val = struct.unpack_from(e + _NV_INT[dtype], buf, v)[0]
        elif dtype == DATA_TYPE_STRING:
            val = buf[v:pos + size].split(b"\0", 1)[0].decode("utf-8", "replace")
        elif dtype in _NV_ARR:
            val = list(struct.unpack_from(e + "%d%s" % (nelem, _NV_ARR[dtype]), buf, v))
        elif dtype == DATA_TYPE_STRING_ARRAY:
            raw = buf[v + 8 * nelem:pos + size].split(b"\0")
            val = [s.decode("utf-8", "replace") for s in raw[:nelem]]
        elif dtype in (DATA_TYPE_NVLIST, DATA_TYPE_NVLIST_ARRAY):
            raise NvlistError("nested native nvlist %r is not supported" % name)
        else:
            raise NvlistError("unknown nvpair type %d for %r" % (dtype, name))
        out[name] = val
        pos += size
