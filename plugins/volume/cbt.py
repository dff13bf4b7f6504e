"""Changed-block tracking for zvols, computed from ZFS send streams.

No write tracking runs beside the guest: the changes between two snapshots
(or a bookmark and a snapshot) of a zvol are the record headers of
`zfs send -c -e -L -i FROM TO` for object 1 (ZVOL_OBJ, offsets are volume
offsets).  Payloads are skipped, so the cost is the kernel reading the changed
blocks (compressed) into the pipe.

FREE is not "changed": an incremental stream also frees never-written ranges
(holes with birth txg 0 are re-sent) and everything past the last block, so

    changed(A->B)  = WRITE u (FREE n allocated(A))
    allocated(B)   = (allocated(A) - FREE) u WRITE

which needs an allocation map per snapshot.  A map is a sorted list of
disjoint [start, end) byte ranges holding data.  A new zvol starts empty; a
clone starts from its origin's map; a snapshot with no history gets one from a
single full `zfs send` header scan (reads all its data once).

Where maps live (they must travel with the pool): user properties of the
*volume* (not the snapshot, so they outlive `data_destroy`), keyed by the
snapshot's guid, which its bookmark keeps:

    zfs-ng-cbt:map.<guid>.<i>   base64(zlib(varint ranges in 512-byte units)),
                                 4000-character chunks (user property values are
                                 limited to 8 KiB, 4 KiB in older libzfs);
                                 chunk 0 starts "v1,<chunks>,<crc32>,"
    zfs-ng-cbt:enabled          "on" while CBT is enabled

plus, if a state dir is given, a file cache `<state_dir>/maps/<guid>.map` and
`<state_dir>/changes/<guidA>-<guidB>.map` (changed ranges of an interval, so
that NBD block status does not re-send for every request).

enable(V) anchors CBT with a snapshot V@zfsng-cbt-anchor whose map is built,
then bookmarked (V#zfsng-cbt-anchor) and destroyed.  Names starting with
`zfsng-cbt-` are this module's: volume listings should hide them.  Like every
bookmark, the anchor makes `zfs rollback` to an older snapshot refuse unless
-r (which destroys it); after that the next interval is computed by a full
scan.  Call snapshot_taken(V@S) after each snapshot of a CBT volume so that
every map is an incremental scan from the previous one (otherwise the first
interval after enable reads everything written since enable, once).

Public API (extents are (offset, length) byte pairs; names are ZFS names,
validated here; every call raises CbtError with a readable message):

    enable(V, state_dir=None)             disable(V, state_dir=None)
    is_enabled(V) -> bool                 data_destroy(V@S, state_dir=None) -> "V#S"
    snapshot_taken(V@S, state_dir=None) -> allocated extents
    list_changed_blocks(V@A|V#A, V@B, offset=0, length=-1, state_dir=None)
        -> {"granularity": 65536, "bitmap": base64}
    changed_extents(V@A|V#A, V@B or live V, state_dir=None) -> extents
    allocation_map(V@S|V#S, state_dir=None) -> allocated extents
    allocation_extents(V@S, offset, length) / dirty_extents(A, V@B, offset, length)
        -> [(offset, length, flags)]  (NBD base:allocation / qemu:dirty-bitmap)
    bitmap(extents, volsize, offset=0, length=-1), allocation_window(),
    dirty_window(), bitmap_blocks(b64)    pure encoders/decoders
    gc(V)                                 drop maps of vanished snapshots

Callers serialise operations on one volume (the plugin's per-volume lock);
concurrent readers of the same interval only duplicate work.
"""

import base64
import binascii
import os
import re
import time
import zlib

from plugins import zfs
from plugins.volume import sendstream as ss

GRANULARITY = 65536
ZVOL_OBJ = 1
PROP_PREFIX = "zfs-ng-cbt:"
PROP_ENABLED = PROP_PREFIX + "enabled"
MAP_PROP = PROP_PREFIX + "map."
CHUNK = 4000
ANCHOR = "zfsng-cbt-anchor"
TMP_PREFIX = "zfsng-cbt-tmp-"
SECTOR = 512
# NBD base:allocation flags
NBD_STATE_HOLE = 1
NBD_STATE_ZERO = 2
NBD_STATE_DIRTY = 1

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*(/[A-Za-z0-9_.:\-]+)*([@#][A-Za-z0-9_.:\-]+)?\Z")


class CbtError(Exception):
    """A CBT operation failed; the message is meant for the user."""


class NoMap(CbtError):
    """No allocation map can be found or built for a bookmark."""


# --------------------------------------------------------------------------
# ranges (pure): sorted lists of disjoint, non-adjacent (start, end) tuples

def normalize(ranges):
    """Sort and merge overlapping or touching ranges; drop empty ones."""
    out = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def union(a, b):
    return normalize(list(a) + list(b))


def intersect(a, b):
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s = max(a[i][0], b[j][0])
        e = min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b):
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s = max(s, b[k][1])
            if s >= e:
                break
            k += 1
        if s < e:
            out.append((s, e))
    return out


def clip(ranges, end):
    return [(s, min(e, end)) for s, e in ranges if s < end]


def total(ranges):
    return sum(e - s for s, e in ranges)


# --------------------------------------------------------------------------
# stream analysis (pure: records in, ranges out)

class _Acc(object):
    """Collects ranges arriving mostly in order, merging neighbours on the fly."""
    __slots__ = ("out", "s", "e")

    def __init__(self):
        self.out, self.s, self.e = [], None, None

    def add(self, s, e):
        if self.s is not None and self.s <= s <= self.e:
            if e > self.e:
                self.e = e
            return
        if self.s is not None:
            self.out.append((self.s, self.e))
        self.s, self.e = s, e

    def ranges(self):
        if self.s is not None:
            self.out.append((self.s, self.e))
            self.s = None
        return normalize(self.out)


def scan_records(records, volsize):
    """Object-1 WRITE and FREE ranges of a stream: (writes, frees, info), with
    FREEs clipped to volsize.  WRITE_BYREF and REDACT count as writes (data we
    were not given is data that may differ)."""
    writes, frees = _Acc(), _Acc()
    info = {}
    W, WE, F = ss.DRR_WRITE, ss.DRR_WRITE_EMBEDDED, ss.DRR_FREE
    others = (ss.DRR_WRITE_BYREF, ss.DRR_REDACT)
    for r in records:
        t = r.type
        if r.object != ZVOL_OBJ:
            if t == ss.DRR_BEGIN:
                info = r.info
            continue
        if t == W or t == WE or t in others:
            writes.add(r.offset, r.offset + r.length)
        elif t == F:
            if r.offset < volsize:
                end = volsize if r.length == ss.OBJECT_END else min(volsize, r.offset + r.length)
                frees.add(r.offset, end)
    return writes.ranges(), frees.ranges(), info


def apply_interval(alloc_a, writes, frees):
    """(changed, allocated(B)) from allocated(A) and an A->B stream's ranges.
    alloc_a None means unknown: every FREE then counts as changed and
    allocated(B) is an upper bound (data is always a safe answer)."""
    if alloc_a is None:
        return union(writes, frees), None
    changed = union(writes, intersect(frees, alloc_a))
    return changed, union(subtract(alloc_a, frees), writes)


# --------------------------------------------------------------------------
# encodings (pure)

def bitmap(extents, volsize, offset=0, length=-1, granularity=GRANULARITY):
    """The list_changed_blocks result, from (offset, length) extents, for the
    window [offset, offset+length)
    (length < 0: up to the end of the volume; xapi passes 0, -1): bit i covers
    [offset + i*G, offset + (i+1)*G), MSB first in each byte, ceil(window/G)
    bits, zero-padded to a multiple of 4 bytes (XO reads u32 words)."""
    if offset < 0 or volsize < 0:
        raise ValueError("negative offset or size")
    end = volsize if length < 0 else min(volsize, offset + length)
    end = max(end, offset)
    nbits = (end - offset + granularity - 1) // granularity
    nbytes = (nbits + 7) // 8
    nbytes += -nbytes % 4
    bits = bytearray(nbytes)
    for s, n in extents:
        s, e = max(s, offset), min(s + n, end)
        if s >= e:
            continue
        _set_bits(bits, (s - offset) // granularity, (e - offset + granularity - 1) // granularity)
    return {"granularity": granularity, "bitmap": base64.b64encode(bytes(bits)).decode("ascii")}


def _set_bits(bits, b0, b1):
    while b0 < b1 and b0 & 7:
        bits[b0 >> 3] |= 0x80 >> (b0 & 7)
        b0 += 1
    full = (b1 - b0) >> 3
    if full:
        bits[b0 >> 3:(b0 >> 3) + full] = b"\xff" * full
        b0 += full << 3
    while b0 < b1:
        bits[b0 >> 3] |= 0x80 >> (b0 & 7)
        b0 += 1


def bitmap_blocks(b64):
    """Indices of the set bits of a base64 bitmap (for checks and tools)."""
    raw = base64.b64decode(b64)
    return [i * 8 + k for i, byte in enumerate(bytearray(raw)) if byte
            for k in range(8) if byte & (0x80 >> k)]


def round_out(ranges, granularity=GRANULARITY):
    return normalize([(s - s % granularity, -(-e // granularity) * granularity)
                      for s, e in ranges])


def window_extents(ranges, volsize, offset, length, in_flag, out_flag):
    """Contiguous [(offset, length, flag)] covering [offset, offset+length)
    clipped to volsize: in_flag inside [start, end) `ranges`, out_flag elsewhere."""
    end = min(volsize, offset + length)
    out = []
    pos = offset
    for s, e in ranges:
        if e <= pos:
            continue
        if s >= end:
            break
        if s > pos:
            out.append((pos, s - pos, out_flag))
            pos = s
        e = min(e, end)
        if e > pos:
            out.append((pos, e - pos, in_flag))
            pos = e
    if pos < end:
        out.append((pos, end - pos, out_flag))
    return out


def to_ranges(extents):
    """(offset, length) extents -> normalized [start, end) ranges."""
    return normalize((o, o + n) for o, n in extents)


def to_extents(ranges):
    return [(s, e - s) for s, e in ranges]


def allocation_window(allocated, volsize, offset, length, thick=False):
    """NBD base:allocation [(offset, length, flags)] from allocated (offset,
    length) extents: data 0, unwritten HOLE|ZERO (sparse) or ZERO (thick: a
    refreservation guarantees the write)."""
    hole = NBD_STATE_ZERO if thick else NBD_STATE_HOLE | NBD_STATE_ZERO
    return window_extents(to_ranges(allocated), volsize, offset, length, 0, hole)


def dirty_window(changed, volsize, offset, length, granularity=GRANULARITY):
    """qemu:dirty-bitmap [(offset, length, flags)] from changed (offset,
    length) extents, at the bitmap's granularity (DIRTY = 1)."""
    return window_extents(round_out(to_ranges(changed), granularity), volsize, offset, length,
                          NBD_STATE_DIRTY, 0)


def encode_map(ranges):
    """Varint (gap, length) pairs in 512-byte units, zlib'd."""
    out = bytearray()
    pos = 0
    for s, e in ranges:
        if s % SECTOR or e % SECTOR:
            s, e = s - s % SECTOR, -(-e // SECTOR) * SECTOR
        for v in ((s - pos) // SECTOR, (e - s) // SECTOR):
            while v >= 0x80:
                out.append((v & 0x7F) | 0x80)
                v >>= 7
            out.append(v)
        pos = e
    return zlib.compress(bytes(out), 6)


def decode_map(blob):
    try:
        raw = bytearray(zlib.decompress(blob))
    except zlib.error as e:
        raise CbtError("corrupt allocation map: %s" % e)
    vals, v, shift = [], 0, 0
    for byte in raw:
        v |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            vals.append(v)
            v, shift = 0, 0
    if shift or len(vals) % 2:
        raise CbtError("corrupt allocation map: truncated")
    out, pos = [], 0
    for i in range(0, len(vals), 2):
        s = pos + vals[i] * SECTOR
        e = s + vals[i + 1] * SECTOR
        out.append((s, e))
        pos = e
    return out


def map_to_props(guid, ranges):
    """{property: value} holding a map (chunk 0 carries count and crc32)."""
    text = base64.b64encode(encode_map(ranges)).decode("ascii")
    crc = binascii.crc32(text.encode("ascii")) & 0xFFFFFFFF
    head_room = CHUNK - 32
    parts = [text[:head_room]] + [text[i:i + CHUNK] for i in range(head_room, len(text), CHUNK)]
    parts[0] = "v1,%d,%08x,%s" % (len(parts), crc, parts[0])
    return dict(("%s%d.%d" % (MAP_PROP, guid, i), p) for i, p in enumerate(parts))


def map_from_props(guid, props):
    """The map of `guid` from a {property: value} dict, or None if absent/incomplete."""
    base = "%s%d." % (MAP_PROP, guid)
    head = props.get(base + "0")
    if head is None:
        return None
    try:
        ver, n, crc, first = head.split(",", 3)
        n = int(n)
        crc = int(crc, 16)
    except ValueError:
        return None
    if ver != "v1":
        return None
    parts = [first]
    for i in range(1, n):
        p = props.get(base + str(i))
        if p is None:
            return None
        parts.append(p)
    text = "".join(parts)
    if binascii.crc32(text.encode("ascii")) & 0xFFFFFFFF != crc:
        return None
    return decode_map(base64.b64decode(text))


# --------------------------------------------------------------------------
# zfs calls: plugins/zfs.py runs them; its errors become CbtError here

def _check_name(name):
    if not isinstance(name, str) or len(name) > 255 or not _NAME.match(name):
        raise CbtError("invalid dataset name %r" % (name,))
    return name


def _zfs(*args):
    try:
        return zfs.zfs(*args)
    except zfs.ZfsError as e:
        raise CbtError("zfs %s: %s" % (args[0], e.message))


def _destroy_snapshot(name):
    """zfs destroy of a snapshot, retried while it is busy: with
    snapdev=visible udev opens a new snapshot's device node for a moment."""
    try:
        zfs.destroy_retrying(name)
    except zfs.ZfsError as e:
        raise CbtError("zfs destroy: %s" % e.message)


def _exists(name):
    try:
        return zfs.exists(name)
    except zfs.ZfsError:
        return False


def _props(name, *props):
    """{prop: value} (exact -p values) of one dataset, snapshot or bookmark."""
    out = _zfs("get", "-H", "-p", "-o", "property,value", ",".join(props), name)
    res = {}
    for line in out.splitlines():
        k, _, v = line.partition("\t")
        res[k] = v
    return res


def _get_many(names, props):
    """{name: {prop: value}} in one zfs call (bookmarks answer "-" for the
    properties they lack)."""
    out = _zfs(*(["get", "-H", "-p", "-o", "name,property,value", ",".join(props)] + list(names)))
    res = dict((n, {}) for n in names)
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) == 3 and f[0] in res:
            res[f[0]][f[1]] = f[2]
    return res


def _local_props(name):
    out = _zfs("get", "-H", "-p", "-s", "local", "-o", "property,value", "all", name)
    res = {}
    for line in out.splitlines():
        k, _, v = line.partition("\t")
        if k.startswith(PROP_PREFIX):
            res[k] = v
    return res


def _dataset(ref):
    return re.split("[@#]", ref, maxsplit=1)[0]


class _Ref(object):
    """A snapshot or bookmark with its identity."""
    __slots__ = ("name", "guid", "txg", "dataset")

    def __init__(self, name, guid, txg):
        self.name, self.guid, self.txg = name, guid, txg
        self.dataset = _dataset(name)

    @property
    def is_snapshot(self):
        return "@" in self.name


def _ref(name):
    _check_name(name)
    if "@" not in name and "#" not in name:
        raise CbtError("%s is not a snapshot or a bookmark" % name)
    p = _props(name, "guid", "createtxg")
    try:
        return _Ref(name, int(p["guid"]), int(p["createtxg"]))
    except (KeyError, ValueError):
        raise CbtError("cannot read guid/createtxg of %s" % name)


def _history(dataset):
    """Snapshots and bookmarks of a dataset, newest first."""
    out = _zfs("list", "-H", "-p", "-o", "name,guid,createtxg", "-t", "snapshot,bookmark",
               "-d", "1", dataset)
    refs = []
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) == 3 and _dataset(f[0]) == dataset:
            refs.append(_Ref(f[0], int(f[1]), int(f[2])))
    refs.sort(key=lambda r: (r.txg, "#" in r.name), reverse=True)
    return refs


def _send(from_ref, to_snap, stats=None, bufsize=1 << 20, volsize=None):
    """Run zfs send (incremental if from_ref) and scan its headers: the
    stream's (writes, frees, volsize) for object 1, FREEs within volsize."""
    args = ["-c", "-e", "-L"]
    if from_ref:
        args += ["-i", from_ref]
    args.append(to_snap)
    if volsize is None:
        volsize = int(_props(to_snap, "volsize")["volsize"])
    t0 = time.time()
    import tempfile   # here, not at the top: it pulls shutil, random, bz2, lzma
    err = tempfile.TemporaryFile()
    try:
        proc = zfs.send(args, err)
    except zfs.ZfsError as e:
        err.close()
        raise CbtError("cannot run zfs send: %s" % e.message)
    _grow_pipe(proc.stdout.fileno())
    parser = ss.StreamParser()
    try:
        try:
            writes, frees, info = scan_records(ss.iter_records(proc.stdout, bufsize, parser),
                                               volsize)
        except ss.StreamError as e:
            proc.kill()
            proc.wait()
            err.seek(0)
            msg = err.read().decode("utf-8", "replace").strip()
            raise CbtError("zfs send %s: %s" % (to_snap, msg or "bad stream: %s" % e))
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            raise CbtError("zfs send %s: %s" % (
                to_snap, err.read().decode("utf-8", "replace").strip() or "exit %d" % rc))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        err.close()
    if stats is not None:
        stats["send_s"] = stats.get("send_s", 0.0) + time.time() - t0
        stats["sends"] = stats.get("sends", 0) + 1
        stats["stream_bytes"] = stats.get("stream_bytes", 0) + parser.bytes_seen
        stats["payload_bytes"] = stats.get("payload_bytes", 0) + parser.payload_bytes
        stats["records"] = stats.get("records", 0) + parser.records
    return writes, frees, volsize


F_SETPIPE_SZ = 1031      # fcntl.F_SETPIPE_SZ, named only since Python 3.10


def _grow_pipe(fd, size=1 << 20):
    """A 1 MiB pipe (the default pipe-max-size) means 16x fewer wakeups than
    the 64 KiB default; refused (EPERM above the limit) is harmless."""
    try:
        import fcntl
        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
    except (ImportError, OSError, IOError):
        pass


def send_estimate(from_ref, to_snap):
    """`zfs send -nvP` estimate of the stream size in bytes (for comparison)."""
    argv = ["send", "-n", "-v", "-P", "-c", "-e", "-L"]
    if from_ref:
        argv += ["-i", _check_name(from_ref)]
    out = _zfs(*(argv + [_check_name(to_snap)]))
    for line in out.splitlines():
        f = line.split("\t")
        if f[0] == "size" and len(f) > 1:
            return int(f[1])
    raise CbtError("no size in zfs send -nvP output")


# --------------------------------------------------------------------------
# map store: volume properties (authoritative, in the pool) + file cache

class MapStore(object):
    def __init__(self, state_dir=None):
        self.state_dir = state_dir
        self._props = {}          # dataset -> local zfs-ng-cbt props (per call)

    def _file(self, kind, key):
        return os.path.join(self.state_dir, kind, "%s.map" % key)

    def _read_file(self, kind, key):
        if not self.state_dir:
            return None
        try:
            with open(self._file(kind, key), "rb") as f:
                return decode_map(f.read())
        except (OSError, IOError, CbtError):
            return None

    def _write_file(self, kind, key, ranges):
        if not self.state_dir:
            return
        path = self._file(kind, key)
        d = os.path.dirname(path)
        try:
            os.makedirs(d, exist_ok=True)
            import tempfile
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(encode_map(ranges))
            os.rename(tmp, path)
        except OSError:
            pass                  # the cache is an optimisation only

    def props(self, dataset, refresh=False):
        if refresh or dataset not in self._props:
            self._props[dataset] = _local_props(dataset)
        return self._props[dataset]

    def load(self, ref):
        m = self._read_file("maps", ref.guid)
        if m is not None:
            return m
        m = map_from_props(ref.guid, self.props(ref.dataset))
        if m is not None:
            self._write_file("maps", ref.guid, m)
        return m

    def save(self, ref, ranges):
        props = map_to_props(ref.guid, ranges)
        _zfs(*(["set"] + ["%s=%s" % kv for kv in sorted(props.items())] + [ref.dataset]))
        self.props(ref.dataset).update(props)
        self._write_file("maps", ref.guid, ranges)

    def drop_dataset(self, dataset, keep_guids=None):
        """Remove map properties (all, or those whose guid is not kept)."""
        props = self.props(dataset, refresh=True)
        gone = []
        for k in props:
            if not k.startswith(MAP_PROP):
                continue
            guid = int(k[len(MAP_PROP):].split(".")[0])
            if keep_guids is None or guid not in keep_guids:
                gone.append(k)
                if self.state_dir:
                    try:
                        os.unlink(self._file("maps", guid))
                    except OSError:
                        pass
        _inherit(dataset, gone)
        for k in gone:
            props.pop(k, None)
        return len(gone)

    def load_changes(self, a, b):
        return self._read_file("changes", "%d-%d" % (a.guid, b.guid))

    def save_changes(self, a, b, ranges):
        self._write_file("changes", "%d-%d" % (a.guid, b.guid), ranges)


_INHERIT_LUA = """
args = ...
argv = args["argv"]
for i = 2, #argv do
    zfs.sync.inherit(argv[1], argv[i])
end
return 0
"""


def _inherit(dataset, props):
    """Remove many user properties with one channel program (one txg)."""
    if not props:
        return
    pool = dataset.split("/", 1)[0]
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as f:
        f.write(_INHERIT_LUA)
        f.flush()
        for i in range(0, len(props), 500):
            _zfs("program", pool, f.name, dataset, *props[i:i + 500])


# --------------------------------------------------------------------------
# the operations

def allocation_map(name, state_dir=None, stats=None):
    """Allocated (offset, length) extents of snapshot or bookmark `name` (built and stored if
    needed: incremental from the newest earlier mapped snapshot/bookmark, or a
    clone's origin, else a full header scan of the snapshot)."""
    return to_extents(_map(_ref(name), MapStore(state_dir), stats, 0))


def _map(ref, store, stats, depth):
    m = store.load(ref)
    if m is not None:
        return m
    if not ref.is_snapshot:
        # a bookmark's data is gone: only its own map, saved before, can help
        raise NoMap("no allocation map for bookmark %s" % ref.name)
    if depth > 8:
        raise NoMap("no allocation map for %s (origin chain too deep)" % ref.name)
    base, base_map = None, None
    for r in _history(ref.dataset):
        if r.txg < ref.txg:
            m = store.load(r)
            if m is not None:
                base, base_map = r, m
                break
    if base is None:
        origin = _props(ref.dataset, "origin").get("origin", "-")
        if origin not in ("", "-"):
            base = _ref(origin)
            try:
                base_map = _map(base, store, stats, depth + 1)
            except NoMap:
                base = None
    if base is None:
        writes, _frees, _vs = _send(None, ref.name, stats)
        alloc = writes
    else:
        writes, frees, _vs = _send(base.name, ref.name, stats)
        _changed, alloc = apply_interval(base_map, writes, frees)
    store.save(ref, alloc)
    return alloc


def snapshot_taken(snap, state_dir=None, stats=None):
    """Build and store the map of a new snapshot of a CBT volume (cheap when
    the previous snapshot has one).  Returns its allocated (offset, length) extents."""
    return allocation_map(snap, state_dir, stats)


def changed_extents(from_ref, to_ref, state_dir=None, stats=None):
    """Sorted [(offset, length)] byte ranges that differ between from_ref
    (V@A or V#A) and to_ref (V@B; a live volume V gets a temporary snapshot).
    `stats`, if a dict, receives stream_bytes/payload_bytes/records/sends and
    fast_path."""
    _check_name(from_ref)
    _check_name(to_ref)
    if "@" not in to_ref and "#" not in to_ref:
        return _live_changes(from_ref, to_ref, state_dir, stats)
    if "#" in to_ref:
        raise CbtError("the newer end of an interval must be a snapshot, not %s" % to_ref)
    return to_extents(_changes(from_ref, to_ref, state_dir, stats)[0])


def _live_changes(from_ref, vol, state_dir, stats):
    tmp = "%s@%s%s" % (vol, TMP_PREFIX, binascii.hexlify(os.urandom(6)).decode())
    _zfs("snapshot", tmp)
    try:
        return to_extents(_changes(from_ref, tmp, state_dir, stats, save=False)[0])
    finally:
        _destroy_snapshot(tmp)


def _changes(from_ref, to_ref, state_dir, stats, save=True):
    """(changed ranges, volsize)."""
    if "@" not in from_ref and "#" not in from_ref:
        raise CbtError("%s is not a snapshot or a bookmark" % from_ref)
    store = MapStore(state_dir)
    a_ds, b_ds = _dataset(from_ref), _dataset(to_ref)
    sep = "@" if "@" in from_ref else "#"
    written = "written" + sep + from_ref.split(sep, 1)[1]
    props = ["guid", "createtxg", "volsize"] + ([written] if a_ds == b_ds else [])
    got = _get_many([from_ref, to_ref], props)       # one zfs call for both ends
    try:
        a = _Ref(from_ref, int(got[from_ref]["guid"]), int(got[from_ref]["createtxg"]))
        b = _Ref(to_ref, int(got[to_ref]["guid"]), int(got[to_ref]["createtxg"]))
        volsize = int(got[to_ref]["volsize"])
    except (KeyError, ValueError):
        raise CbtError("cannot read guid/createtxg/volsize of %s and %s" % (from_ref, to_ref))
    if stats is not None:
        for k in ("sends", "stream_bytes", "payload_bytes", "records"):
            stats.setdefault(k, 0)
        stats.setdefault("fast_path", False)
    cached = store.load_changes(a, b)
    if cached is not None:
        return cached, volsize
    if a.guid == b.guid:
        return [], volsize        # V#S against V@S: the same point in time
    if a.txg >= b.txg:
        raise CbtError("%s is not older than %s" % (from_ref, to_ref))
    try:
        alloc_a = _map(a, store, stats, 0)
    except NoMap:
        alloc_a = None            # exact changes impossible: FREEs count as changed
    if alloc_a is not None and got[to_ref].get(written) == "0":
        # nothing was born after A: no send needed, B's map is A's
        if stats is not None:
            stats["fast_path"] = True
        if save and store.load(b) is None:
            store.save(b, alloc_a)
        store.save_changes(a, b, [])
        return [], volsize
    writes, frees, volsize = _send(from_ref, to_ref, stats, volsize=volsize)
    changed, alloc_b = apply_interval(alloc_a, writes, frees)
    if alloc_b is not None:       # a conservative answer is not worth caching
        if save and store.load(b) is None:
            store.save(b, alloc_b)
        store.save_changes(a, b, changed)
    return changed, volsize


def list_changed_blocks(from_ref, to_ref, offset=0, length=-1, state_dir=None, stats=None):
    """Volume.list_changed_blocks: {"granularity": 65536, "bitmap": base64}."""
    if "@" not in to_ref:
        raise CbtError("the newer end of an interval must be a snapshot, not %s" % to_ref)
    changed, volsize = _changes(_check_name(from_ref), _check_name(to_ref), state_dir, stats)
    return bitmap(to_extents(changed), volsize, offset, length)


def allocation_extents(snap, offset, length, state_dir=None, thick=None):
    """NBD base:allocation extents [(offset, length, flags)] of a snapshot
    (thick None: a refreservation covering volsize means thick)."""
    _check_name(snap)
    volsize = int(_props(snap, "volsize")["volsize"])
    if thick is None:
        try:
            thick = int(_props(_dataset(snap), "refreservation")["refreservation"]) >= volsize
        except (KeyError, ValueError):
            thick = False
    return allocation_window(allocation_map(snap, state_dir), volsize, offset, length, thick)


def dirty_extents(from_ref, to_snap, offset, length, state_dir=None):
    """qemu:dirty-bitmap extents [(offset, length, 1 dirty / 0 clean)] of an
    interval, at 64 KiB granularity like the bitmap."""
    changed, volsize = _changes(_check_name(from_ref), _check_name(to_snap), state_dir, None)
    return dirty_window(to_extents(changed), volsize, offset, length)


def is_enabled(vol):
    _check_name(vol)
    return _props(vol, PROP_ENABLED).get(PROP_ENABLED) == "on"


def enable(vol, state_dir=None, stats=None):
    """Anchor CBT on a volume (idempotent): snapshot, map, bookmark, drop the
    snapshot, mark enabled.  Cost: one full header scan of the volume."""
    _check_name(vol)
    if "@" in vol or "#" in vol:
        raise CbtError("CBT is enabled on volumes, not on %s" % vol)
    snap, bm = "%s@%s" % (vol, ANCHOR), "%s#%s" % (vol, ANCHOR)
    store = MapStore(state_dir)
    if is_enabled(vol) and _exists(bm):
        return
    if not _exists(snap):
        if _exists(bm):
            _zfs("destroy", bm)     # stale anchor of an interrupted enable
        try:
            _zfs("snapshot", snap)
        except CbtError:
            if not _exists(snap):   # not a concurrent enable: a real failure
                raise
    ref = _ref(snap)
    if store.load(ref) is None:
        writes, _f, _v = _send(None, snap, stats)
        store.save(ref, writes)
    if not _exists(bm):
        _zfs("bookmark", snap, bm)
    _destroy_snapshot(snap)
    _zfs("set", "%s=on" % PROP_ENABLED, vol)


def disable(vol, state_dir=None):
    """Forget CBT state of a volume (idempotent): the anchor, every map, the
    enabled mark.  Bookmarks left by data_destroy stay (their VDIs are the
    plugin's); intervals from them then count FREEs as changed."""
    _check_name(vol)
    store = MapStore(state_dir)
    # the mark first: killed later, the volume reads as disabled (what was
    # asked) with leftovers the next enable/disable drops, never as enabled
    # without its anchor
    if PROP_ENABLED in store.props(vol, refresh=True):
        _zfs("inherit", PROP_ENABLED, vol)
    if _exists("%s@%s" % (vol, ANCHOR)):
        _destroy_snapshot("%s@%s" % (vol, ANCHOR))
    if _exists("%s#%s" % (vol, ANCHOR)):
        _zfs("destroy", "%s#%s" % (vol, ANCHOR))
    store.drop_dataset(vol)


def data_destroy(snap, state_dir=None, stats=None):
    """Volume.data_destroy (idempotent): keep the snapshot's map, bookmark it
    as V#S, destroy V@S.  Later intervals are computed from the bookmark."""
    _check_name(snap)
    if "@" not in snap:
        raise CbtError("%s is not a snapshot" % snap)
    vol, name = snap.split("@", 1)
    bm = "%s#%s" % (vol, name)
    if not _exists(snap):
        if _exists(bm):
            return bm
        raise CbtError("neither %s nor %s exists" % (snap, bm))
    ref = _ref(snap)
    clones = _props(snap, "clones").get("clones", "")
    if clones not in ("", "-"):
        raise CbtError("cannot destroy the data of %s: it has clones (%s)" % (snap, clones))
    store = MapStore(state_dir)
    _map(ref, store, stats, 0)
    if _exists(bm):
        if _ref(bm).guid != ref.guid:
            raise CbtError("bookmark %s exists for another snapshot" % bm)
    else:
        _zfs("bookmark", snap, bm)
    _destroy_snapshot(snap)
    return bm


def gc(vol, state_dir=None):
    """Drop maps of snapshots/bookmarks that no longer exist.  Returns how many
    properties were removed."""
    _check_name(vol)
    keep = set(r.guid for r in _history(vol))
    return MapStore(state_dir).drop_dataset(vol, keep)
