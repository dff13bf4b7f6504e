"""Backup, resume, restore and verify: the copy loops.  Sources are read
through blockio.backend.Backend (a snapshot's device, or a file) or an NBD
export (nbd_server.client.Reader); images are sparse raw files written
through Backend too.  See manifest.py for the on-disk format and zvol.py for
the ZFS anchors.

A backup is started (_start: the extents to copy, fixed in its manifest) or
resumed (mf.running finds it), copied (_copy: checkpoints make an interrupted
copy resume where the last one left it, whatever stops it) and finished
(_finish).  Nothing else may stop a copy: an interruption is an exception
from the source, the progress report or the user (KeyboardInterrupt)."""

import errno
import hashlib
import os
import time
from contextlib import ExitStack, closing, contextmanager

from blockio.backend import Backend
from nbd_server import constants as C
from nbd_server.client import NbdError, Reader
from plugins.volume import cbt
from sr_tools.backup import manifest as mf
from sr_tools.backup.manifest import BackupError

CHUNK = cbt.GRANULARITY           # 64 KiB: what CBT and dirty bitmaps can tell apart
READ_MAX = 4 << 20                # bytes per source read (contiguous chunks)
# progress saved at least this often... (the environment may lower it: tests, slow links)
CHECKPOINT_BYTES = int(os.environ.get("ZFSNG_BACKUP_CHECKPOINT_BYTES", 64 << 20))
CHECKPOINT_SECONDS = 5.0          # ...or this often


class Progress(object):
    """What the copy loops report to; the CLI gives a click progress bar."""

    def begin(self, label, total):
        pass

    def advance(self, nbytes):
        pass

    def end(self):
        pass


# -- sources -------------------------------------------------------------------------

class BlockSource(object):
    """A file or block device read through Backend."""

    def __init__(self, path):
        try:
            self.backend = Backend(path, readonly=True)
        except OSError as e:
            raise BackupError("cannot open %s: %s" % (path, e))
        self.size = self.backend.size

    def allocated(self):
        """[start, end) ranges that may hold data: SEEK_DATA/SEEK_HOLE on
        regular files, everything on block devices (they have no holes to tell)."""
        if self.backend.is_block:
            return [(0, self.size)]
        out, pos, fd = [], 0, self.backend.fd
        while pos < self.size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # only a hole is left
                    break
                return [(0, self.size)]         # no SEEK_DATA: all may be data
            end = min(os.lseek(fd, start, os.SEEK_HOLE), self.size)
            out.append((start, end))
            pos = end
        return out

    def read(self, offset, length):
        try:
            return self.backend.read(offset, length)
        except OSError as e:
            raise BackupError("read of %s at %d failed: %s" % (self.backend.path, offset, e))

    def close(self):
        self.backend.close()


class NbdSource(object):
    """An NBD export (nbd_server.client.Reader), with the dirty extents of
    bitmap `bitmap` when given."""

    def __init__(self, uri, bitmap=None):
        self.bitmap_context = C.DIRTY_BITMAP_PREFIX + bitmap if bitmap else None
        wanted = [C.BASE_ALLOCATION] + ([self.bitmap_context] if bitmap else [])
        try:
            self.reader = Reader(uri, wanted)
        except NbdError as e:
            raise BackupError(str(e))
        self.size = self.reader.size
        if bitmap and self.bitmap_context not in self.reader.contexts:
            self.reader.close()
            raise BackupError("%s offers no dirty bitmap %r" % (uri, bitmap))

    def allocated(self):
        """[start, end) ranges that may hold data (base:allocation not ZERO);
        everything if the server has no base:allocation."""
        if C.BASE_ALLOCATION not in self.reader.contexts:
            return [(0, self.size)]
        try:
            return self.reader.extents(C.BASE_ALLOCATION, lambda f: not f & C.STATE_ZERO)
        except NbdError as e:
            raise BackupError(str(e))

    def dirty(self):
        try:
            return self.reader.extents(self.bitmap_context, lambda f: f & 1)
        except NbdError as e:
            raise BackupError(str(e))

    def read(self, offset, length):
        try:
            return self.reader.read(offset, length)
        except NbdError as e:
            raise BackupError(str(e))

    def close(self):
        self.reader.close()


# -- backup: start or resume ----------------------------------------------------------

def backup(kind, volume, repo, nbd=None, bitmap=None, keep_snapshot=False, state_dir=None,
           progress=None, chunk_size=CHUNK, image_format="raw"):
    """Take (or resume) a full or incremental backup of `volume` into
    repository `repo`; returns the completed manifest.  With `nbd`, the data
    comes from that export (which must be a stable point, e.g. a snapshot
    export) and `volume` is only the chain's label; incr then reads the dirty
    extents of bitmap `bitmap`.  image_format "qcow2" converts the finished
    raw image with qemu-img (refused up front if qemu-img is missing)."""
    _check_request(kind, image_format, nbd, bitmap)
    _prepare_repo(repo)
    source = _source_of(kind, volume, nbd)
    d, m = mf.running(repo, source)
    if m is None:
        d, m = _start(kind, volume, repo, source, bitmap, state_dir, chunk_size, image_format)
    elif m["kind"] != kind:
        raise BackupError("an interrupted %s backup of %s is in %s: run `backup %s` to "
                          "resume it, or remove that directory" % (m["kind"], volume, d,
                                                                    m["kind"]))
    _copy(d, m, progress or Progress())
    _finish(d, m, keep_snapshot)
    return m


def _check_request(kind, image_format, nbd, bitmap):
    """What can be refused before anything is touched."""
    if kind not in ("full", "incr"):
        raise BackupError("unknown backup kind %r" % kind)
    if image_format not in ("raw", "qcow2"):
        raise BackupError("unknown image format %r (raw or qcow2)" % image_format)
    if image_format == "qcow2":
        from sr_tools.backup import qcow2
        qcow2.require()
    if nbd and kind == "incr" and not bitmap:
        raise BackupError("an incremental backup over NBD needs --bitmap NAME")


def _prepare_repo(repo):
    try:
        os.makedirs(repo, exist_ok=True)
    except OSError as e:
        raise BackupError("cannot create %s: %s" % (repo, e))


def _source_of(kind, volume, nbd):
    """The manifest's "source": what the chain is of (mf.same_source)."""
    if nbd:
        return {"volume": volume, "guid": None, "nbd": nbd}
    if volume.startswith("/"):
        # a file or device read as it is: the caller keeps it still
        path = os.path.realpath(volume)
        if not os.path.exists(path):
            raise BackupError("%s does not exist" % volume)
        if kind == "incr":
            raise BackupError("%s is a plain file or device: it has no changed-block tracking; "
                              "back up a ZFS volume, or read over NBD with --bitmap" % volume)
        return {"volume": path, "guid": None, "nbd": None, "path": path}
    from sr_tools.backup import zvol
    vol = zvol.resolve(volume)
    source = {"volume": vol["volume"], "guid": vol["guid"], "nbd": None}
    if vol["sr"]:
        source["sr"], source["key"] = vol["sr"], vol["key"]
    return source


def _new_id(repo, kind):
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + kind
    i, bid = 1, base
    while os.path.exists(os.path.join(repo, bid)):
        i += 1
        bid = "%s.%d" % (base, i)
    return bid


def _start(kind, volume, repo, source, bitmap, state_dir, chunk_size, image_format):
    """A new backup directory: its manifest (the extents to copy), a sparse
    image and an empty progress file -> (its path, the manifest)."""
    parent = _parent(volume, repo, source, chunk_size) if kind == "incr" else None
    bid = _new_id(repo, kind)
    stats = {}
    if source["nbd"]:
        size, ranges, anchor = _scan_nbd(kind, volume, source, bitmap)
    elif source.get("path"):
        size, ranges, anchor = _scan_path(source)
    else:
        size, ranges, anchor = _scan_zvol(kind, source, bid, repo, parent, state_dir, stats)
    if parent is not None and size < parent["size"]:
        raise BackupError("%s shrank since the previous backup: take a full backup" % volume)
    extents = mf.align(ranges, chunk_size, size)
    pref = {"id": parent["id"], "anchor_guid": parent["anchor"].get("guid")} if parent else None
    m = mf.new(bid, kind, source, anchor, size, extents, chunk_size, pref, image_format)
    m["stats"] = {"cbt": stats}
    d = os.path.join(repo, bid)
    try:
        os.mkdir(d)
        with open(os.path.join(d, mf.IMAGE), "wb") as f:
            f.truncate(size)
        open(os.path.join(d, mf.PROGRESS), "wb").close()
        mf.save(d, m)
    except OSError as e:
        raise BackupError("cannot create %s: %s" % (d, e))
    return d, m


def _parent(volume, repo, source, chunk_size):
    """The manifest an incremental backup builds on (the newest complete one)."""
    _d, parent = mf.latest(repo, source)
    if parent is None:
        raise BackupError("no complete backup of %s in %s: take a full backup first"
                          % (volume, repo))
    if parent["chunk_size"] != chunk_size:
        raise BackupError("the previous backup uses %d-byte chunks" % parent["chunk_size"])
    if not source["nbd"] and not parent["anchor"].get("snapshot"):
        raise BackupError("the newest backup of %s (%s) was not taken from a ZFS snapshot: "
                          "take a full backup" % (volume, parent["id"]))
    return parent


# The scans: (size, ranges to copy, anchor) of each kind of source.

def _scan_nbd(kind, volume, source, bitmap):
    bitmap = bitmap if kind == "incr" else None
    with closing(NbdSource(source["nbd"], bitmap)) as src:
        ranges = src.dirty() if bitmap else src.allocated()
        size = src.size
    return size, ranges, {"label": volume, "bitmap": bitmap, "snapshot": None, "guid": None}


def _scan_path(source):
    with closing(BlockSource(source["path"])) as src:
        size, ranges = src.size, src.allocated()
    return size, ranges, {"path": source["path"], "snapshot": None, "guid": None}


def _scan_zvol(kind, source, bid, repo, parent, state_dir, stats):
    """The anchor snapshot taken now; ranges from CBT (changed since the
    parent's anchor, or allocated).  stats gets CBT's figures."""
    from sr_tools.backup import zvol
    zvol.cleanup_orphans(source["volume"], repo)
    anchor = zvol.take_anchor(source["volume"], bid, repo)
    try:
        size = anchor.pop("size")
        if kind == "incr":
            ranges = zvol.changed(zvol.anchor_ref(parent["anchor"]), anchor["snapshot"],
                                  state_dir, stats)
        else:
            ranges = zvol.allocated(anchor["snapshot"], state_dir, stats)
    except BaseException:
        zvol.zfs("destroy", anchor["snapshot"])
        raise
    return size, ranges, anchor


# -- backup: the copy -------------------------------------------------------------------

def _copy(d, m, progress):
    """Copy the chunks from m["done"] on from the source into the image, a
    digest per chunk into the progress file, a checkpoint (m["done"] saved)
    every CHECKPOINT_BYTES or CHECKPOINT_SECONDS and at the end; then m holds
    the digests and the run's figures, state "complete" (not saved yet)."""
    t0 = time.time()
    chunks = mf.chunks_of(m["extents"], m["chunk_size"])
    resumed = m["done"]
    stats = m.setdefault("stats", {})
    for k in ("bytes_read", "bytes_written", "zero_chunks"):
        stats.setdefault(k, 0)
    with ExitStack() as stack:
        src = stack.enter_context(_opened_source(d, m))
        img, sums = _open_outputs(d, stack)
        _drop_unvouched(m, chunks, img, sums)
        progress.begin("%s %s" % (m["kind"], m["id"]),
                       sum(n for _o, n in chunks[resumed:]))
        stack.callback(progress.end)
        checkpoint = _Checkpoints(d, m, img, sums)
        zeros = {m["chunk_size"]: bytes(m["chunk_size"])}
        for i, j, off, end in _runs(chunks, resumed):
            data = src.read(off, end - off)
            stats["bytes_read"] += len(data)
            _store(data, off, chunks[i:j], img, sums, stats, zeros)
            progress.advance(end - off)
            checkpoint.after(end - off, j)
        checkpoint.save(len(chunks))
        sums.seek(0)
        digests = sums.read()
    if len(digests) != len(chunks) * mf.DIGEST:
        raise BackupError("%s: progress file has %d bytes, expected %d"
                          % (d, len(digests), len(chunks) * mf.DIGEST))
    m["sha256"] = [digests[k:k + mf.DIGEST].hex() for k in range(0, len(digests), mf.DIGEST)]
    m["state"] = "complete"
    m["completed"] = int(time.time())
    stats["seconds"] = round(stats.get("seconds", 0.0) + time.time() - t0, 3)
    stats["extents"] = len(m["extents"])
    stats["chunks"] = len(chunks)
    stats["resumed_at_chunk"] = resumed if resumed else None


@contextmanager
def _opened_source(d, m):
    """The source of a running backup, open for reading (a snapshot through
    a temporary read-only clone), closed on exit."""
    source = m["source"]
    if source.get("path") or source.get("nbd"):
        where = source.get("path") or source["nbd"]
        with closing(BlockSource(where) if source.get("path") else NbdSource(where)) as src:
            if src.size < m["size"]:
                raise BackupError("%s is smaller than when the backup started" % where)
            yield src
        return
    from sr_tools.backup import zvol
    snap = m["anchor"]["snapshot"]
    if zvol.guids(snap).get(snap) != m["anchor"]["guid"]:
        raise BackupError("the anchor snapshot %s of this interrupted backup is gone: remove "
                          "the backup directory and start again" % snap)
    with zvol.SnapshotDevice(snap, m["id"], os.path.dirname(d)) as path:
        with closing(BlockSource(path)) as src:
            yield src


def _open_outputs(d, stack):
    """The image (a Backend) and the progress file of backup d, closed with stack."""
    try:
        img = stack.enter_context(Backend(os.path.join(d, mf.IMAGE)))
        sums = stack.enter_context(open(os.path.join(d, mf.PROGRESS), "r+b"))
    except (IOError, OSError) as e:
        raise BackupError("cannot open the backup in %s: %s" % (d, e))
    return img, sums


def _drop_unvouched(m, chunks, img, sums):
    """What follows the last checkpoint may hold data no manifest vouches
    for: digests cut back to m["done"], the image discarded from there."""
    done = m["done"]
    sums.truncate(done * mf.DIGEST)
    sums.seek(done * mf.DIGEST)
    if done < len(chunks):
        start = chunks[done][0]
        img.discard(start, m["size"] - start)


def _runs(chunks, start):
    """(i, j, offset, end): chunks[i:j] are contiguous, read at once (at most
    READ_MAX bytes, but at least one chunk)."""
    i = start
    while i < len(chunks):
        j, off = i, chunks[i][0]
        end = off
        while j < len(chunks) and chunks[j][0] == end and end - off < READ_MAX:
            end += chunks[j][1]
            j += 1
        yield i, j, off, end
        i = j


def _store(data, off, run, img, sums, stats, zeros):
    """The chunks `run` of data (read at off): each one's digest, and its
    bytes into the image unless all zero (a hole in the image already)."""
    view = memoryview(data)
    for coff, cn in run:
        piece = view[coff - off:coff - off + cn]
        sums.write(hashlib.sha256(piece).digest())
        zero = zeros.get(cn) or zeros.setdefault(cn, bytes(cn))
        if data[coff - off:coff - off + cn] == zero:
            stats["zero_chunks"] += 1
        else:
            img.write(coff, piece)
            stats["bytes_written"] += cn


class _Checkpoints(object):
    """Progress made durable: the image and digests synced, then m["done"]
    (and the figures) saved; after(nbytes, done) does it when
    CHECKPOINT_BYTES or CHECKPOINT_SECONDS have passed."""

    def __init__(self, d, m, img, sums):
        self.d, self.m, self.img, self.sums = d, m, img, sums
        self.last, self.since = time.time(), 0

    def after(self, nbytes, done):
        self.since += nbytes
        if self.since >= CHECKPOINT_BYTES or time.time() - self.last >= CHECKPOINT_SECONDS:
            self.save(done)

    def save(self, done):
        self.img.flush()
        self.sums.flush()
        os.fsync(self.sums.fileno())
        self.m["done"] = done
        mf.save(self.d, self.m)
        self.last, self.since = time.time(), 0


# -- backup: the end --------------------------------------------------------------------

def _finish(d, m, keep_snapshot):
    """A complete backup's last steps: the image converted (qcow2), the
    manifest saved, the progress file removed; the anchor snapshot's data
    dropped (its bookmark kept) unless keep_snapshot."""
    st = m["stats"]
    if m.get("convert_to") == "qcow2":
        from sr_tools.backup import qcow2
        qcow2.convert(os.path.join(d, mf.IMAGE), os.path.join(d, "disk.qcow2"))
        m["image"], m["image_format"] = "disk.qcow2", "qcow2"
        del m["convert_to"]
        st["image_bytes"] = os.path.getsize(os.path.join(d, m["image"]))
    mf.save(d, m)
    os.unlink(os.path.join(d, mf.PROGRESS))
    if m["image"] != mf.IMAGE:
        os.unlink(os.path.join(d, mf.IMAGE))
    if m["anchor"].get("snapshot") and not keep_snapshot:
        from sr_tools.backup import zvol
        m["anchor"]["bookmark"] = zvol.drop_data(m["anchor"])
        mf.save(d, m)


# -- restore and verify -------------------------------------------------------------

def open_image(d, m):
    """A backup's image for reading: read(offset, length), size, close()."""
    path = os.path.join(d, m["image"])
    if m["image_format"] == "qcow2":
        from sr_tools.backup import qcow2
        return qcow2.Image(path)
    return Backend(path, readonly=True)


def _layer_chunks(m):
    return dict((off, (n, h)) for (off, n), h in
                zip(mf.chunks_of(m["extents"], m["chunk_size"]), m["sha256"]))


def restore(backup_dir, target, progress=None, verify=True, create_size=None, force=False):
    """Rebuild the point of `backup_dir` from its chain into `target`: a block
    device (its size at least the backup's; it is discarded first), or an image
    file (created sparse; an existing one only with force).  Returns a summary."""
    progress = progress or Progress()
    t0 = time.time()
    chain = mf.chain(backup_dir)
    ms = [m for _d, m in chain]
    for d, m in chain:
        if m["state"] != "complete":
            raise BackupError("%s is not complete" % d)
        if m["chunk_size"] != ms[0]["chunk_size"]:
            raise BackupError("%s: chunk size differs from its chain's" % d)
    size = ms[-1]["size"]
    cs = ms[0]["chunk_size"]
    tb = _open_target(target, size, force)
    images = []
    try:
        for d, m in chain:
            images.append(open_image(d, m))
        plan = mf.layers(ms, cs)
        maps = [_layer_chunks(m) for m in ms]
        progress.begin("restore %s" % ms[-1]["id"], sum(n for _o, n, _l in plan))
        read_b = written_b = 0
        bad = []
        for off, n, layer in plan:
            pos = off
            while pos < off + n:
                ln, digest = maps[layer][pos]
                data = images[layer].read(pos, ln)
                read_b += ln
                if verify and hashlib.sha256(data).hexdigest() != digest:
                    bad.append((chain[layer][0], pos))
                keep = min(ln, size - pos)
                if data.count(0) != ln:
                    tb.write(pos, memoryview(data)[:keep])
                    written_b += keep
                progress.advance(keep)
                pos += ln
        if bad:
            raise BackupError("checksum mismatch in %d chunk(s), first: %s at offset %d; the "
                              "restored target is not trustworthy" % (len(bad), bad[0][0],
                                                                      bad[0][1]))
        tb.flush()
    finally:
        progress.end()
        for b in images:
            b.close()
        tb.close()
    return {"target": target, "size": size, "chain": [m["id"] for m in ms],
            "bytes_read": read_b, "bytes_written": written_b,
            "seconds": round(time.time() - t0, 3), "extents": len(plan)}


def _open_target(target, size, force):
    import stat as st_mod
    try:
        st = os.stat(target)
    except OSError:
        st = None
    if st is not None and st_mod.S_ISBLK(st.st_mode):
        b = Backend(target)
        if b.size < size:
            b.close()
            raise BackupError("%s is %d bytes, the backup needs %d" % (target, b.size, size))
        b.discard(0, b.size)       # reads back as zeros: only data is written
        return b
    if st is not None and not force:
        raise BackupError("%s exists (use --force to overwrite it)" % target)
    try:
        with open(target, "wb") as f:
            f.truncate(size)
        return Backend(target)
    except (IOError, OSError) as e:
        raise BackupError("cannot create %s: %s" % (target, e))


def verify(backup_dir, chain=True, progress=None):
    """Recompute every chunk checksum of a backup (and of its chain) and check
    the chain's links.  Returns {"backups": [...], "chunks", "bytes", "bad": [...],
    "ok"}."""
    progress = progress or Progress()
    t0 = time.time()
    items = mf.chain(backup_dir) if chain else [(os.path.abspath(backup_dir),
                                                  mf.load(backup_dir))]
    bad, nchunks, nbytes = [], 0, 0
    for d, m in items:
        if m["state"] != "complete":
            bad.append({"backup": m["id"], "error": "not complete (%d of %d chunks)" % (
                m["done"], len(mf.chunks_of(m["extents"], m["chunk_size"])))})
            continue
        try:
            img = open_image(d, m)
        except (OSError, BackupError) as e:
            bad.append({"backup": m["id"], "error": "cannot open image: %s" % e})
            continue
        try:
            if img.size != m["size"]:
                bad.append({"backup": m["id"], "error": "image is %d bytes, manifest says %d"
                            % (img.size, m["size"])})
                continue
            chunks = mf.chunks_of(m["extents"], m["chunk_size"])
            progress.begin("verify %s" % m["id"], sum(n for _o, n in chunks))
            for (off, n), h in zip(chunks, m["sha256"]):
                if hashlib.sha256(img.read(off, n)).hexdigest() != h:
                    bad.append({"backup": m["id"], "offset": off, "error": "checksum mismatch"})
                nchunks += 1
                nbytes += n
                progress.advance(n)
            progress.end()
        finally:
            img.close()
    return {"backups": [m["id"] for _d, m in items], "chunks": nchunks, "bytes": nbytes,
            "bad": bad, "ok": not bad, "seconds": round(time.time() - t0, 3)}


def verify_repo(repo, progress=None):
    """verify() of every backup of a repository, each image once, every chain
    link checked.  Running (interrupted) backups are listed, not failed."""
    t0 = time.time()
    items = mf.backups(repo)
    if not items:
        raise BackupError("%s holds no backups" % repo)
    out = {"backups": [], "running": [], "chunks": 0, "bytes": 0, "bad": []}
    for d, m in items:
        if m["state"] == "running":
            out["running"].append(m["id"])
            continue
        try:
            mf.chain(d)
        except BackupError as e:
            out["bad"].append({"backup": m["id"], "error": str(e)})
        r = verify(d, chain=False, progress=progress)
        out["backups"].append(m["id"])
        out["chunks"] += r["chunks"]
        out["bytes"] += r["bytes"]
        out["bad"] += r["bad"]
    out["ok"] = not out["bad"]
    out["seconds"] = round(time.time() - t0, 3)
    return out
