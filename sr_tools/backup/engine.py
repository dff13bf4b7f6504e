"""Backup, resume, restore and verify: the copy loops.  Sources are read
through blockio.backend.Backend (a snapshot's device, or a file) or an NBD
export (nbd_reader.Reader); images are sparse raw files written through
Backend too.  See manifest.py for the on-disk format and zvol.py for the
ZFS anchors."""

import errno
import hashlib
import os
import time

from blockio.backend import Backend
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
    def __init__(self, uri, bitmap=None):
        from sr_tools.backup import nbd_reader
        from nbd_server import constants as C
        self._err = nbd_reader.NbdError
        self.bitmap_context = C.DIRTY_BITMAP_PREFIX + bitmap if bitmap else None
        wanted = [C.BASE_ALLOCATION] + ([self.bitmap_context] if bitmap else [])
        try:
            self.reader = nbd_reader.Reader(uri, wanted)
        except nbd_reader.NbdError as e:
            raise BackupError(str(e))
        self.size = self.reader.size
        if bitmap and self.bitmap_context not in self.reader.contexts:
            self.reader.close()
            raise BackupError("%s offers no dirty bitmap %r" % (uri, bitmap))

    def allocated(self):
        """[start, end) ranges that may hold data (base:allocation not ZERO);
        everything if the server has no base:allocation."""
        from nbd_server import constants as C
        if C.BASE_ALLOCATION not in self.reader.contexts:
            return [(0, self.size)]
        try:
            return self.reader.extents(C.BASE_ALLOCATION, lambda f: not f & C.STATE_ZERO)
        except self._err as e:
            raise BackupError(str(e))

    def dirty(self):
        try:
            return self.reader.extents(self.bitmap_context, lambda f: f & 1)
        except self._err as e:
            raise BackupError(str(e))

    def read(self, offset, length):
        try:
            return self.reader.read(offset, length)
        except self._err as e:
            raise BackupError(str(e))

    def close(self):
        self.reader.close()


# -- backup ----------------------------------------------------------------------------

def _new_id(repo, kind):
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + kind
    i, bid = 1, base
    while os.path.exists(os.path.join(repo, bid)):
        i += 1
        bid = "%s.%d" % (base, i)
    return bid


def _prepare_repo(repo):
    try:
        os.makedirs(repo, exist_ok=True)
    except OSError as e:
        raise BackupError("cannot create %s: %s" % (repo, e))


def backup(kind, volume, repo, nbd=None, bitmap=None, keep_snapshot=False, state_dir=None,
           progress=None, chunk_size=CHUNK, image_format="raw", _stop_after=None):
    """Take (or resume) a full or incremental backup of `volume` into
    repository `repo`; returns the completed manifest.  With `nbd`, the data
    comes from that export (which must be a stable point, e.g. a snapshot
    export) and `volume` is only the chain's label; incr then reads the dirty
    extents of bitmap `bitmap`.  image_format "qcow2" converts the finished
    raw image with qemu-img (refused up front if qemu-img is missing)."""
    if kind not in ("full", "incr"):
        raise BackupError("unknown backup kind %r" % kind)
    if image_format not in ("raw", "qcow2"):
        raise BackupError("unknown image format %r (raw or qcow2)" % image_format)
    if image_format == "qcow2":
        from sr_tools.backup import qcow2
        qcow2.require()
    progress = progress or Progress()
    _prepare_repo(repo)
    if nbd:
        source = {"volume": volume, "guid": None, "nbd": nbd}
        if kind == "incr" and not bitmap:
            raise BackupError("an incremental backup over NBD needs --bitmap NAME")
    elif volume.startswith("/"):
        # a file or device read as it is: the caller keeps it still
        path = os.path.realpath(volume)
        if not os.path.exists(path):
            raise BackupError("%s does not exist" % volume)
        if kind == "incr":
            raise BackupError("%s is a plain file or device: it has no changed-block tracking; "
                              "back up a ZFS volume, or read over NBD with --bitmap" % volume)
        source = {"volume": path, "guid": None, "nbd": None, "path": path}
    else:
        from sr_tools.backup import zvol
        vol = zvol.resolve(volume)
        source = {"volume": vol["volume"], "guid": vol["guid"], "nbd": None}
        if vol["sr"]:
            source["sr"], source["key"] = vol["sr"], vol["key"]
    d, m = mf.running(repo, source)
    if m is not None:
        if m["kind"] != kind:
            raise BackupError("an interrupted %s backup of %s is in %s: run `backup %s` to "
                              "resume it, or remove that directory" % (m["kind"], volume, d,
                                                                        m["kind"]))
        return _copy(d, m, progress, keep_snapshot, state_dir, bitmap, _stop_after)
    parent_dir, parent = (None, None)
    if kind == "incr":
        parent_dir, parent = mf.latest(repo, source)
        if parent is None:
            raise BackupError("no complete backup of %s in %s: take a full backup first"
                              % (volume, repo))
        if parent["chunk_size"] != chunk_size:
            raise BackupError("the previous backup uses %d-byte chunks" % parent["chunk_size"])
        if not nbd and not parent["anchor"].get("snapshot"):
            raise BackupError("the newest backup of %s (%s) was not taken from a ZFS snapshot: "
                              "take a full backup" % (volume, parent["id"]))
    stats = {}
    bid = _new_id(repo, kind)
    d = os.path.join(repo, bid)
    if nbd:
        src = NbdSource(nbd, bitmap if kind == "incr" else None)
        try:
            size = src.size
            ranges = src.dirty() if kind == "incr" else src.allocated()
        finally:
            src.close()
        anchor = {"label": volume, "bitmap": bitmap if kind == "incr" else None,
                  "snapshot": None, "guid": None}
    elif source.get("path"):
        src = BlockSource(source["path"])
        try:
            size, ranges = src.size, src.allocated()
        finally:
            src.close()
        anchor = {"path": source["path"], "snapshot": None, "guid": None}
    else:
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
    if parent is not None and size < parent["size"]:
        raise BackupError("%s shrank since the previous backup: take a full backup" % volume)
    extents = mf.align(ranges, chunk_size, size)
    pref = {"id": parent["id"], "anchor_guid": parent["anchor"].get("guid")} if parent else None
    m = mf.new(bid, kind, source, anchor, size, extents, chunk_size, pref, image_format)
    m["stats"] = {"cbt": stats}
    try:
        os.mkdir(d)
        with open(os.path.join(d, mf.IMAGE), "wb") as f:
            f.truncate(size)
        open(os.path.join(d, mf.PROGRESS), "wb").close()
        mf.save(d, m)
    except OSError as e:
        raise BackupError("cannot create %s: %s" % (d, e))
    return _copy(d, m, progress, keep_snapshot, state_dir, bitmap, _stop_after)


def _open_source(d, m, bitmap):
    if m["source"].get("path"):
        src = BlockSource(m["source"]["path"])
        if src.size < m["size"]:
            src.close()
            raise BackupError("%s is smaller than when the backup started" % src.backend.path)
        return src, None
    if m["source"].get("nbd"):
        src = NbdSource(m["source"]["nbd"])
        if src.size < m["size"]:
            src.close()
            raise BackupError("%s is smaller than when the backup started" % m["source"]["nbd"])
        return src, None
    from sr_tools.backup import zvol
    snap = m["anchor"]["snapshot"]
    if zvol.guids(snap).get(snap) != m["anchor"]["guid"]:
        raise BackupError("the anchor snapshot %s of this interrupted backup is gone: remove "
                          "the backup directory and start again" % snap)
    dev = zvol.SnapshotDevice(snap, m["id"], os.path.dirname(d))
    path = dev.__enter__()
    try:
        return BlockSource(path), dev
    except BaseException:
        dev.__exit__(None, None, None)
        raise


def _copy(d, m, progress, keep_snapshot, state_dir, bitmap, stop_after):
    t0 = time.time()
    cs = m["chunk_size"]
    chunks = mf.chunks_of(m["extents"], cs)
    done = m["done"]
    resumed = done
    sums_path = os.path.join(d, mf.PROGRESS)
    st = m.setdefault("stats", {})
    read_b = st.get("bytes_read", 0)
    written_b = st.get("bytes_written", 0)
    zero_chunks = st.get("zero_chunks", 0)
    src, dev = _open_source(d, m, bitmap)
    try:
        img = Backend(os.path.join(d, mf.IMAGE))
        sums = open(sums_path, "r+b")
    except (IOError, OSError) as e:
        src.close()
        if dev:
            dev.__exit__(None, None, None)
        raise BackupError("cannot open the backup in %s: %s" % (d, e))
    try:
        # what follows the last checkpoint may hold data no manifest vouches for
        sums.truncate(done * mf.DIGEST)
        sums.seek(done * mf.DIGEST)
        if done < len(chunks):
            start = chunks[done][0]
            img.discard(start, m["size"] - start)
        progress.begin("%s %s" % (m["kind"], m["id"]),
                       sum(n for _o, n in chunks[done:]))
        last_ck, since_ck = time.time(), 0
        zero = bytes(cs)
        short_zero = {}
        i = done
        while i < len(chunks):
            # one read for a run of contiguous chunks
            j, off = i, chunks[i][0]
            end = off
            while j < len(chunks) and chunks[j][0] == end and end - off < READ_MAX:
                end += chunks[j][1]
                j += 1
            data = src.read(off, end - off)
            read_b += len(data)
            view = memoryview(data)
            for k in range(i, j):
                coff, cn = chunks[k]
                piece = view[coff - off:coff - off + cn]
                sums.write(hashlib.sha256(piece).digest())
                z = zero if cn == cs else short_zero.setdefault(cn, bytes(cn))
                if data[coff - off:coff - off + cn] == z:
                    zero_chunks += 1        # a hole in the image already
                else:
                    img.write(coff, piece)
                    written_b += cn
            progress.advance(end - off)
            since_ck += end - off
            i = j
            if stop_after is not None and i >= stop_after:
                _checkpoint(d, m, img, sums, i, read_b, written_b, zero_chunks)
                raise KeyboardInterrupt("stopped for a test")
            if since_ck >= CHECKPOINT_BYTES or time.time() - last_ck >= CHECKPOINT_SECONDS:
                _checkpoint(d, m, img, sums, i, read_b, written_b, zero_chunks)
                last_ck, since_ck = time.time(), 0
        _checkpoint(d, m, img, sums, i, read_b, written_b, zero_chunks)
        sums.seek(0)
        raw = sums.read()
    finally:
        progress.end()
        sums.close()
        img.close()
        src.close()
        if dev:
            dev.__exit__(None, None, None)
    if len(raw) != len(chunks) * mf.DIGEST:
        raise BackupError("%s: progress file has %d bytes, expected %d"
                          % (d, len(raw), len(chunks) * mf.DIGEST))
    m["sha256"] = [raw[k:k + mf.DIGEST].hex() for k in range(0, len(raw), mf.DIGEST)]
    m["state"] = "complete"
    m["completed"] = int(time.time())
    st["seconds"] = round(st.get("seconds", 0.0) + time.time() - t0, 3)
    st["extents"] = len(m["extents"])
    st["chunks"] = len(chunks)
    st["resumed_at_chunk"] = resumed if resumed else None
    if m.get("convert_to") == "qcow2":
        from sr_tools.backup import qcow2
        qcow2.convert(os.path.join(d, mf.IMAGE), os.path.join(d, "disk.qcow2"))
        m["image"], m["image_format"] = "disk.qcow2", "qcow2"
        del m["convert_to"]
        st["image_bytes"] = os.path.getsize(os.path.join(d, m["image"]))
    mf.save(d, m)
    os.unlink(sums_path)
    if m["image"] != mf.IMAGE:
        os.unlink(os.path.join(d, mf.IMAGE))
    if m["anchor"].get("snapshot") and not keep_snapshot:
        from sr_tools.backup import zvol
        m["anchor"]["bookmark"] = zvol.drop_data(m["anchor"])
        mf.save(d, m)
    return m


def _checkpoint(d, m, img, sums, done, read_b, written_b, zero_chunks):
    img.flush()
    sums.flush()
    os.fsync(sums.fileno())
    m["done"] = done
    m["stats"].update(bytes_read=read_b, bytes_written=written_b, zero_chunks=zero_chunks)
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
