"""The backup manifest (`manifest.json` in each backup directory) and the chain
logic.  Pure: paths and dicts in, dicts out; no ZFS, no sockets.

A repository is a directory; each backup is a subdirectory named by its id
(`<UTC time>-full` / `<UTC time>-incr`) holding

    manifest.json   this module's format (below), replaced atomically
    disk.raw        sparse raw image of the volume's size: the chunks of
                    `extents` at their volume offsets, holes elsewhere
    progress.sums   while running only: sha256 digests (32 bytes each) of the
                    first `done` chunks, in order (a kill -9 loses nothing
                    recorded here; `done` is advanced after fdatasync)

manifest.json (format "zfs-ng-backup", version 1):

    id, kind ("full" | "incr"), state ("running" | "complete"),
    created, completed (unix seconds)
    source:   {"volume": ZFS dataset or NBD label, "guid": volume guid or null,
               "nbd": uri or null}
    anchor:   {"snapshot": "V@zfsng-cbt-backup-...", "guid": int, "createtxg": int,
               "bookmark": "V#..." once the snapshot's data was dropped, or null}
              (NBD sources: {"label": text, "bitmap": name or null})
    parent:   null (full) or {"id": parent backup id, "anchor_guid": int or null}
    size:     volume size in bytes at the anchor
    chunk_size: bytes per chunk (65536: the CBT granularity)
    image:    "disk.raw", image_format: "raw" (or "disk.qcow2", "qcow2": converted
              with qemu-img once complete; while running, convert_to: "qcow2")
    extents:  [[offset, length], ...] sorted, chunk aligned (the last one may
              end at `size`): what this backup holds; the rest comes from the
              parent (incr) or is zeros (full)
    done:     chunks written, fsynced and summed so far (== total when complete)
    sha256:   [hex digest per chunk, in extent order] (complete only)
    stats:    {"bytes_read", "bytes_written", "seconds", "extents", ...}
"""

import errno
import json
import os
import time

FORMAT = "zfs-ng-backup"
VERSION = 1
MANIFEST = "manifest.json"
IMAGE = "disk.raw"
IMAGES = {"disk.raw": "raw", "disk.qcow2": "qcow2"}   # image file -> image_format
PROGRESS = "progress.sums"
DIGEST = 32


class BackupError(Exception):
    """A backup operation failed; the message is meant for the user."""


def chunks_of(extents, chunk_size):
    """[(offset, length)] of every chunk of `extents`, in order."""
    out = []
    for off, n in extents:
        end = off + n
        while off < end:
            out.append((off, min(chunk_size, end - off)))
            off += chunk_size
    return out


def align(ranges, chunk_size, size):
    """[start, end) ranges -> sorted, merged, chunk-aligned [[offset, length]]
    clipped to size."""
    out = []
    for s, e in sorted(ranges):
        s = s - s % chunk_size
        e = min(size, -(-e // chunk_size) * chunk_size)
        if s >= e:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [[s, e - s] for s, e in out]


def new(backup_id, kind, source, anchor, size, extents, chunk_size, parent=None,
        image_format="raw"):
    m = {
        "format": FORMAT, "version": VERSION, "id": backup_id, "kind": kind,
        "state": "running", "created": int(time.time()), "completed": None,
        "source": source, "anchor": anchor, "parent": parent, "size": int(size),
        "chunk_size": int(chunk_size), "image": IMAGE, "image_format": "raw",
        "extents": [list(e) for e in extents], "done": 0, "sha256": None, "stats": {},
    }
    if image_format != "raw":
        m["convert_to"] = image_format
    return m


def check(m, where):
    """Refuse what this code did not write (or a damaged manifest)."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BackupError("%s is not a zfs-ng backup manifest" % where)
    if m.get("version") != VERSION:
        raise BackupError("%s: unsupported manifest version %r" % (where, m.get("version")))
    try:
        cs, size = int(m["chunk_size"]), int(m["size"])
        if cs <= 0 or cs % 512 or size < 0 or m["kind"] not in ("full", "incr"):
            raise ValueError("bad chunk size, size or kind")
        pos = 0
        for off, n in m["extents"]:
            if off < pos or n <= 0 or off % cs or off + n > size or (n % cs and off + n != size):
                raise ValueError("bad extent %r" % ([off, n],))
            pos = off + n
        if m["state"] == "complete":
            if len(m["sha256"]) != len(chunks_of(m["extents"], cs)):
                raise ValueError("checksum count does not match the extents")
        elif m["state"] != "running":
            raise ValueError("bad state %r" % m["state"])
        if (m["kind"] == "incr") != bool(m.get("parent")):
            raise ValueError("an incremental backup needs a parent, a full one has none")
        if IMAGES.get(m["image"]) != m["image_format"] or os.path.basename(m["id"]) != m["id"]:
            raise ValueError("bad image or id")
    except (KeyError, TypeError, ValueError) as e:
        raise BackupError("%s: damaged manifest: %s" % (where, e))
    return m


def load(backup_dir):
    path = os.path.join(backup_dir, MANIFEST)
    try:
        with open(path) as f:
            m = json.load(f)
    except (IOError, OSError) as e:
        if e.errno == errno.ENOENT:
            raise BackupError("%s: no backup here (no %s)" % (backup_dir, MANIFEST))
        raise BackupError("cannot read %s: %s" % (path, e))
    except ValueError as e:
        raise BackupError("%s: not JSON: %s" % (path, e))
    return check(m, path)


def save(backup_dir, m):
    """Atomic replace (write, fsync, rename, fsync dir): a crash leaves the old
    or the new manifest, never half of one."""
    path = os.path.join(backup_dir, MANIFEST)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(m, f, sort_keys=True, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(backup_dir)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- repositories and chains ------------------------------------------------------

def backups(repo):
    """[(backup_dir, manifest)] of a repository, oldest first; damaged or
    foreign subdirectories are skipped."""
    out = []
    try:
        names = sorted(os.listdir(repo))
    except OSError as e:
        raise BackupError("cannot list %s: %s" % (repo, e))
    for name in names:
        d = os.path.join(repo, name)
        if os.path.isfile(os.path.join(d, MANIFEST)):
            try:
                out.append((d, load(d)))
            except BackupError:
                continue
    return out


def same_source(a, b):
    sa, sb = a["source"], b["source"]
    if sa.get("guid") is not None and sb.get("guid") is not None:
        return sa["guid"] == sb["guid"]
    return sa.get("volume") == sb.get("volume")


def latest(repo, source):
    """(dir, manifest) of the newest complete backup of `source` (a source
    dict), or (None, None)."""
    probe = {"source": source}
    found = (None, None)
    for d, m in backups(repo):
        if m["state"] == "complete" and same_source(m, probe):
            if found[1] is None or (m["created"], m["id"]) >= (found[1]["created"], found[1]["id"]):
                found = (d, m)
    return found


def running(repo, source):
    """(dir, manifest) of an interrupted backup of `source`, or (None, None)."""
    probe = {"source": source}
    for d, m in reversed(backups(repo)):
        if m["state"] == "running" and same_source(m, probe):
            return d, m
    return None, None


def chain(backup_dir):
    """[(dir, manifest)] from the full backup to `backup_dir`.  Checks every
    link: the parent exists next to it, is complete, has the same source and
    the anchor the child was taken from."""
    out = []
    d = os.path.abspath(backup_dir)
    seen = set()
    while True:
        m = load(d)
        out.append((d, m))
        if m["kind"] == "full":
            break
        p = m["parent"]
        pd = os.path.join(os.path.dirname(d), p["id"])
        if pd in seen or len(out) > 10000:
            raise BackupError("%s: the chain loops" % d)
        seen.add(pd)
        if not os.path.isdir(pd):
            raise BackupError("%s: parent backup %s is missing" % (d, p["id"]))
        pm = load(pd)
        if pm["state"] != "complete":
            raise BackupError("%s: parent backup %s is not complete" % (d, p["id"]))
        if not same_source(pm, m):
            raise BackupError("%s: parent backup %s is of another volume" % (d, p["id"]))
        if p.get("anchor_guid") is not None and pm["anchor"].get("guid") != p["anchor_guid"]:
            raise BackupError("%s: parent backup %s has another anchor than the one this "
                              "backup was taken from" % (d, p["id"]))
        d = pd
    out.reverse()
    return out


def layers(chain_manifests, chunk_size):
    """Which backup holds each range of the newest point: sorted
    [(offset, length, index into the chain)] (newest layer wins); ranges not
    listed are zeros."""
    from plugins.volume import cbt
    cover = []     # [(start, end, layer)]
    for i, m in enumerate(chain_manifests):
        mine = cbt.normalize((o, o + n) for o, n in m["extents"])
        cover = [(s, e, l) for s, e, l in _subtract_tagged(cover, mine)]
        cover += [(s, e, i) for s, e in mine]
        cover.sort()
    size = chain_manifests[-1]["size"]
    return [(s, min(e, size) - s, l) for s, e, l in cover if s < size]


def _subtract_tagged(tagged, ranges):
    from plugins.volume import cbt
    out = []
    for s, e, l in tagged:
        for a, b in cbt.subtract([(s, e)], ranges):
            out.append((a, b, l))
    return out
