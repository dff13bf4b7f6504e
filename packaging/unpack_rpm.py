#!/usr/bin/env python3
"""Unpack an RPM's payload with Python alone, where rpm2cpio is missing (the
test VM): `python3 packaging/unpack_rpm.py PKG.rpm DEST`, the same tree as
`rpm2cpio PKG.rpm | cpio -idm` in DEST.

An RPM is a 96-byte lead, the signature header (padded to 8 bytes), the main
header, then the payload: a compressed cpio archive ("newc" format).  Our spec
makes it gzip (w9.gzdio); xz and bzip2 are read too, zstd is not (no stdlib
module before 3.14).  Regular files, directories and symlinks; hard links,
devices and %ghost files (never in the payload) do not occur in ours.
"""

import bz2
import gzip
import io
import lzma
import os
import stat
import struct
import sys

LEAD_MAGIC = b"\xed\xab\xee\xdb"
HEADER_MAGIC = b"\x8e\xad\xe8\x01"
RPMTAG_NAME, RPMTAG_VERSION, RPMTAG_RELEASE, RPMTAG_PAYLOADCOMPRESSOR = 1000, 1001, 1002, 1125


class RpmError(ValueError):
    pass


def _header(f, pad):
    """(tag -> raw bytes, string tags decoded) of the header at f's position."""
    intro = f.read(16)
    if len(intro) != 16 or intro[:4] != HEADER_MAGIC:
        raise RpmError("bad header magic")
    nindex, hsize = struct.unpack(">II", intro[8:])
    index = f.read(16 * nindex)
    data = f.read(hsize)
    if len(index) != 16 * nindex or len(data) != hsize:
        raise RpmError("truncated header")
    if pad:
        f.read((8 - (16 + 16 * nindex + hsize) % 8) % 8)
    tags = {}
    for i in range(nindex):
        tag, typ, off, count = struct.unpack(">IIII", index[16 * i:16 * i + 16])
        if typ == 6:  # STRING
            tags[tag] = data[off:data.index(b"\0", off)].decode("utf-8", "replace")
    return tags


def open_payload(path):
    """(metadata dict, decompressed payload stream) of the RPM at path."""
    f = open(path, "rb")
    lead = f.read(96)
    if len(lead) != 96 or lead[:4] != LEAD_MAGIC:
        f.close()
        raise RpmError("%s: not an RPM" % path)
    _header(f, pad=True)        # signature
    tags = _header(f, pad=False)
    head = f.read(6)
    f.seek(-len(head), os.SEEK_CUR)
    if head[:2] == b"\x1f\x8b":
        stream = gzip.GzipFile(fileobj=f)
    elif head[:6] == b"\xfd7zXZ\x00":
        stream = lzma.LZMAFile(f)
    elif head[:3] == b"BZh":
        stream = bz2.BZ2File(f)
    else:
        f.close()
        raise RpmError("%s: payload compressor %r is not supported (build with gzip)"
                       % (path, tags.get(RPMTAG_PAYLOADCOMPRESSOR)))
    meta = {"name": tags.get(RPMTAG_NAME), "version": tags.get(RPMTAG_VERSION),
            "release": tags.get(RPMTAG_RELEASE)}
    return meta, io.BufferedReader(stream)


def _read(stream, n):
    b = stream.read(n)
    if len(b) != n:
        raise RpmError("truncated cpio archive")
    return b


def cpio_entries(stream):
    """(name, mode, data) of every member of a newc cpio stream."""
    while True:
        hdr = _read(stream, 110)
        if hdr[:6] not in (b"070701", b"070702"):
            raise RpmError("bad cpio magic %r" % hdr[:6])
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        name = _read(stream, namesize)[:-1].decode("utf-8", "surrogateescape")
        _read(stream, (4 - (110 + namesize) % 4) % 4)
        if name == "TRAILER!!!":
            return
        data = _read(stream, filesize)
        _read(stream, (4 - filesize % 4) % 4)
        yield name, mode, data


def unpack(path, dest):
    """Unpack the payload of the RPM at path under dest; returns its metadata."""
    meta, stream = open_payload(path)
    root = os.path.realpath(dest)
    dirs = []
    with stream:
        for name, mode, data in cpio_entries(stream):
            rel = name[2:] if name.startswith("./") else name
            rel = os.path.normpath(rel.lstrip("/") or ".")
            if rel == ".." or rel.startswith("../"):
                raise RpmError("member %r leaves the destination" % name)
            target = os.path.join(root, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if stat.S_ISDIR(mode):
                os.makedirs(target, exist_ok=True)
                dirs.append((target, stat.S_IMODE(mode)))
            elif stat.S_ISLNK(mode):
                if os.path.lexists(target):
                    os.unlink(target)
                os.symlink(data.decode("utf-8", "surrogateescape"), target)
            elif stat.S_ISREG(mode):
                if os.path.lexists(target):
                    os.unlink(target)
                with open(target, "wb") as out:
                    out.write(data)
                os.chmod(target, stat.S_IMODE(mode))
            else:
                raise RpmError("member %r: unsupported file type %o" % (name, mode))
    for d, m in reversed(dirs):     # last: a read-only directory is filled first
        os.chmod(d, m)
    return meta


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: unpack_rpm.py PKG.rpm DEST")
    m = unpack(sys.argv[1], sys.argv[2])
    print("%(name)s-%(version)s-%(release)s" % m)
