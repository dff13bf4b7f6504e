"""The ZFS side of a backup: which dataset a VOLUME names, the anchor
snapshot, a readable device for it, dropping its data afterwards.

Anchors are plain ZFS snapshots `V@zfsng-cbt-backup-<id>`.  The `zfsng-cbt-`
prefix makes the volume plugin classify them as CBT state: xapi never sees
them, SR garbage collection never touches them, and they work the same on
SR volumes and on raw datasets.  After a backup completes, the anchor's data
is dropped like cbt.data_destroy does (bookmark V#zfsng-cbt-backup-<id>, whose
allocation map stays in the volume's properties), so it costs no space and
still anchors the next incremental.

A snapshot's data is read through a temporary read-only clone
`<V>.zfsng-bk-<id>` with volmode=dev (SR volumes are volmode=none when idle
and the SR hides snapshot devices); it is destroyed when the copy ends, and
a resumed backup reuses it.  zfs runs through plugins/zfs.py; its errors
become BackupError here."""

import os
import re

from plugins import zfs as zfs_lib
from plugins.smapi import BackendError
from plugins.volume import cbt
from sr_tools.backup.manifest import BackupError

SNAP_PREFIX = "zfsng-cbt-backup-"
CLONE_SUFFIX = ".zfsng-bk-"
_DATASET = re.compile(r"^[A-Za-z][A-Za-z0-9_.:\-]*(/[A-Za-z0-9_.:\-]+)+\Z")


def zfs(*args):
    try:
        return zfs_lib.zfs(*args)
    except zfs_lib.ZfsError as e:
        raise BackupError("zfs %s: %s" % (args[0], e.message))


def exists(name):
    try:
        return zfs_lib.exists(name)
    except zfs_lib.ZfsError:
        return False


def props(name, *names):
    out = zfs("get", "-H", "-p", "-o", "property,value", ",".join(names), name)
    res = {}
    for line in out.splitlines():
        k, _, v = line.partition("\t")
        res[k] = v
    return res


def resolve(volume):
    """The zvol dataset a VOLUME argument names: `SR:KEY` (an SR volume, through
    the volume plugin's library) or a ZFS volume name POOL/...  Returns
    {"volume", "guid", "size", "sr", "key"}."""
    sr = key = None
    if ":" in volume and "/" not in volume:
        sr, key = volume.split(":", 1)
        from plugins.volume import volume as vol_lib
        try:
            loc = vol_lib.locate(sr, key)
        except Exception as e:      # the plugin's errors carry user-meant messages
            raise BackupError("cannot find volume %s on SR %s: %s" % (key, sr, e))
        if loc["kind"] != "volume":
            raise BackupError("%s is a snapshot: back up its volume instead" % volume)
        ds = loc["dataset"]
    else:
        ds = volume
    if not _DATASET.match(ds) or len(ds) > 200 or CLONE_SUFFIX in ds:
        raise BackupError("%r is not a ZFS volume name (POOL/PATH) nor SR:KEY" % volume)
    try:
        p = props(ds, "guid", "volsize", "type")
    except BackupError as e:
        raise BackupError("no ZFS volume %s (%s)" % (ds, e))
    if p.get("type") != "volume":
        raise BackupError("%s is a %s, not a volume" % (ds, p.get("type")))
    return {"volume": ds, "guid": int(p["guid"]), "size": int(p["volsize"]), "sr": sr,
            "key": key}


REPO_PROP = "zfs-ng-backup:repo"


def _repo_value(repo):
    value = os.path.abspath(repo)
    if len(value) > 1024 or any(c in value for c in "\t\n\r\0"):
        raise BackupError("repository path %r cannot be recorded on a snapshot" % repo)
    return value


def take_anchor(ds, backup_id, repo):
    """Snapshot V@zfsng-cbt-backup-<id>, tagged with the repository that owns
    it (so that cleanup_orphans can recognise it after a crash)."""
    snap = "%s@%s%s" % (ds, SNAP_PREFIX, backup_id)
    zfs("snapshot", "-o", "%s=%s" % (REPO_PROP, _repo_value(repo)), snap)
    return describe(snap)


def cleanup_orphans(ds, repo):
    """Destroy the anchor snapshots of `ds` (and their reading clones) that
    this repository made but holds no backup directory for: left by a crash
    between the snapshot and the first manifest, or by an interrupted backup
    whose directory was removed.  One zfs list of ds's snapshots (never of
    the SR's 100k volumes).  Returns the names destroyed."""
    mine = _repo_value(repo)
    out = zfs("list", "-H", "-o", "name,clones,%s" % REPO_PROP, "-t", "snapshot", "-d", "1", ds)
    gone = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) != 3 or fields[2] != mine:
            continue
        name, clones = fields[0], [c for c in fields[1].split(",") if c not in ("", "-")]
        bid = name.split("@", 1)[1][len(SNAP_PREFIX):]
        if not name.startswith(ds + "@" + SNAP_PREFIX) or \
                os.path.exists(os.path.join(mine, bid, "manifest.json")):
            continue
        if any(CLONE_SUFFIX not in c for c in clones):
            continue        # someone else cloned it: not ours to destroy
        for c in clones:
            zfs("destroy", c)
            gone.append(c)
        zfs("destroy", name)
        gone.append(name)
    return gone


def describe(snap):
    p = props(snap, "guid", "createtxg", "volsize")
    return {"snapshot": snap, "guid": int(p["guid"]), "createtxg": int(p["createtxg"]),
            "size": int(p["volsize"]), "bookmark": None}


def guids(*names):
    """{name: guid} of the snapshots/bookmarks among names that exist (one zfs
    call: zfs get prints what it finds and complains about the rest)."""
    text = zfs_lib.run([zfs_lib.ZFS, "get", "-H", "-p", "-o", "name,value", "guid"]
                       + list(names), check=False)
    out = {}
    for line in text.splitlines():
        n, _, v = line.partition("\t")
        if v.isdigit():
            out[n] = int(v)
    return out


def anchor_ref(anchor):
    """The name an interval can start from: the snapshot if it still exists,
    else its bookmark (both checked to be the anchor's guid)."""
    snap = anchor["snapshot"]
    bm = anchor.get("bookmark") or snap.replace("@", "#", 1)
    found = guids(snap, bm)
    for name in (snap, bm):
        if found.get(name) == anchor["guid"]:
            return name
    raise BackupError("the anchor of the previous backup (%s) is gone: take a full backup" % snap)


def drop_data(anchor):
    """Turn the anchor snapshot into a bookmark, like cbt.data_destroy but in
    two zfs calls: the anchor's allocation map was stored when its extents were
    computed (cbt.allocation_map / changed_extents), and the only clone, ours,
    is gone.  Returns the bookmark name."""
    snap = anchor["snapshot"]
    bm = snap.replace("@", "#", 1)
    zfs("bookmark", snap, bm)
    zfs("destroy", snap)
    return bm


def allocated(snap, state_dir=None, stats=None):
    """Sorted [start, end) ranges holding data in snapshot `snap`."""
    try:
        return cbt.to_ranges(cbt.allocation_map(snap, state_dir, stats))
    except cbt.CbtError as e:
        raise BackupError(str(e))


def changed(from_ref, snap, state_dir=None, stats=None):
    """Sorted [start, end) ranges that differ between from_ref and snap."""
    try:
        return cbt.to_ranges(cbt.changed_extents(from_ref, snap, state_dir, stats))
    except cbt.CbtError as e:
        raise BackupError(str(e))


class SnapshotDevice(object):
    """Context manager: the path of a readable block device with the data of
    `snap` (a temporary read-only clone)."""

    def __init__(self, snap, backup_id, repo, timeout=60.0):
        self.snap = snap
        self.repo = _repo_value(repo)
        self.clone = "%s%s%s" % (snap.split("@", 1)[0], CLONE_SUFFIX, backup_id)
        self.timeout = timeout

    def __enter__(self):
        try:
            zfs("clone", "-o", "readonly=on", "-o", "volmode=dev", "-o",
                "%s=%s" % (REPO_PROP, self.repo), self.snap, self.clone)
        except BackupError:
            # left by an interrupted run? then it is ours to reuse
            if props(self.clone, "origin").get("origin") != self.snap:
                raise BackupError("%s exists and is not a clone of %s" % (self.clone, self.snap))
        path = zfs_lib.device_path(self.clone)
        try:
            zfs_lib.wait_for_device(path, self.timeout)
        except BackendError as e:
            self._destroy()
            raise BackupError(e.message)
        return path

    def _destroy(self):
        try:   # udev may still hold the new device for a moment
            zfs_lib.destroy_retrying(self.clone, tries=50)
        except zfs_lib.ZfsError as e:
            if exists(self.clone):
                raise BackupError("cannot destroy %s: %s" % (self.clone, e.message))

    def __exit__(self, *exc):
        self._destroy()


def create_volume(ds, size):
    """A new sparse zvol to restore into; returns its device path."""
    if not _DATASET.match(ds) or len(ds) > 200:
        raise BackupError("%r is not a ZFS volume name" % ds)
    if exists(ds):
        raise BackupError("%s already exists" % ds)
    zfs("create", "-s", "-V", str(size), "-o", "volmode=dev", ds)
    path = zfs_lib.device_path(ds)
    try:
        zfs_lib.wait_for_device(path, 60)
    except BackendError as e:
        raise BackupError(e.message)
    return path


def sr_volume_device(spec, force=False):
    """(device path, undo) of an SR volume `SR:KEY` to restore into, through
    the volume plugin's activate_device.  A volume already active (attached
    somewhere) is refused unless force: restoring under a running guest
    corrupts it.  undo() deactivates what this call activated."""
    sr, key = spec.split(":", 1)
    from plugins.volume import volume as vol_lib
    try:
        loc = vol_lib.locate(sr, key)
        if loc["kind"] != "volume":
            raise BackupError("%s is a snapshot (read-only): restore into a volume" % spec)
        if loc["active"] and not force:
            raise BackupError("%s is active (attached?): detach it first, or --force" % spec)
        was_active = loc["active"]
        loc = vol_lib.activate_device(sr, key)
    except BackupError:
        raise
    except Exception as e:      # the plugin's errors carry user-meant messages
        raise BackupError("cannot activate %s: %s" % (spec, e))

    def undo():
        if not was_active:
            try:
                vol_lib.deactivate_device(sr, key)
            except Exception as e:
                raise BackupError("cannot deactivate %s: %s" % (spec, e))
    return loc["device"], undo
