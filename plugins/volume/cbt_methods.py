"""SMAPIv3 changed-block tracking (VDI_CONFIG_CBT) over plugins/volume/cbt.py:
Volume.enable_cbt, disable_cbt, data_destroy, list_changed_blocks, and the
data-destroyed snapshots they leave behind.

A data-destroyed snapshot DS@KEY becomes the bookmark DS#KEY (data gone,
block history kept) and stays a volume of the SR: xapi then sets
vdi-type=cbt_metadata on it and uses it as the base of the next incremental
backup, so SR.ls must keep listing it.  Bookmarks hold no user properties, so
its metadata lives on the parent dataset DS (it travels with the pool):

    org.zfs-ng:bm.<KEY>.name / .description / .keys / .sharable / .volsize

Index entries of kind "bookmark": read-only, physical_utilisation 0,
cbt_enabled true; they cannot be attached, snapshotted, cloned or reverted to.

CBT state: cbt.PROP_ENABLED on the zvol; its snapshots inherit it (a
snapshot's own "off" overrides it: disable_cbt on a snapshot).

Every CBT call runs under the SR lock (cbt.py has none).
"""

import os

from plugins import smapi, zfs
from plugins.smapi import BackendError, InvalidParameters
from plugins.volume import cbt
from plugins.volume import metadata
from plugins.volume import names
from plugins.volume import sr as sr_mod

BM_FIELDS = ["name", "description", "keys", "sharable", "volsize"]
# datasets per `zfs get` when reading bookmark metadata (output is datasets x props)
_GET_BATCH = 64


def bm_prop(key, field):
    return zfs.uprop("bm.%s.%s" % (key, field))


def split_bookmark(zname, pool):
    """(parent dataset, key) of a listed data-destroyed snapshot
    POOL/zfs-ng/DS#KEY, or None (cbt.py's anchors, foreign bookmarks)."""
    prefix = names.sr_root(pool) + "/"
    if not zname.startswith(prefix) or "#" not in zname:
        return None
    ds, key = zname.split("#", 1)
    if not names.is_key(key) or "/" in ds[len(prefix):]:
        return None
    if names.classify(ds, pool)[0] not in ("volume", "hidden"):
        return None
    return ds, key


def bookmark_entry(pool, zname, createtxg, props):
    """The index entry of bookmark zname from its parent's `zfs get` values."""
    got = split_bookmark(zname, pool)
    if got is None:
        return None
    key = got[1]

    def user(field, default):
        v = props.get(bm_prop(key, field))
        return default if v is None else zfs.decode(v)

    keys = user("keys", {})
    if not isinstance(keys, dict):
        keys = {}
    try:
        volsize = int(user("volsize", 0))
    except (TypeError, ValueError):
        volsize = 0
    return {
        "key": key, "zname": zname, "kind": "bookmark",
        "name": str(user("name", "")), "description": str(user("description", "")),
        "keys": dict((str(k), str(v)) for k, v in keys.items()),
        "sharable": bool(user("sharable", False)),
        "virtual_size": volsize, "physical_utilisation": 0, "volblocksize": 0,
        "origin": "", "createtxg": int(createtxg), "cbt_enabled": True,
    }


def bookmark_entries(pool, targets=None):
    """Entries of the SR's data-destroyed snapshots (targets None) or of the
    DS#KEY names among targets (missing ones are skipped)."""
    if targets is None:
        rows = zfs.list_names(names.sr_root(pool), ("name", "createtxg"), types="bookmark")
    else:
        want = [t for t in targets if "#" in t]
        if not want:
            return []
        rows = zfs.rows(zfs.run([zfs.ZFS, "list", "-H", "-p", "-o", "name,createtxg",
                                 "-t", "bookmark"] + want, check=False))
    found = {}  # parent dataset -> [(zname, createtxg)]
    for r in rows:
        if len(r) == 2 and split_bookmark(r[0], pool) is not None:
            found.setdefault(split_bookmark(r[0], pool)[0], []).append((r[0], r[1]))
    out = []
    parents = sorted(found)
    for i in range(0, len(parents), _GET_BATCH):
        batch = parents[i:i + _GET_BATCH]
        props = sorted(set(bm_prop(split_bookmark(z, pool)[1], f)
                           for ds in batch for z, _ in found[ds] for f in BM_FIELDS))
        got = zfs.get(batch, props)
        for ds in batch:
            for zname, txg in found[ds]:
                out.append(bookmark_entry(pool, zname, txg, got.get(ds, {})))
    return out


def listed_bookmarks(ds):
    """The data-destroyed snapshots (listed volumes) of dataset ds."""
    pool = ds.split("/", 1)[0]
    rows = zfs.list_names(ds, ("name",), types="bookmark", depth=1)
    return [r[0] for r in rows if split_bookmark(r[0], pool) is not None]


def bookmarked_datasets(pool):
    """Datasets of the SR holding data-destroyed snapshots (not garbage)."""
    rows = zfs.list_names(names.sr_root(pool), ("name",), types="bookmark")
    return set(split_bookmark(r[0], pool)[0] for r in rows
               if split_bookmark(r[0], pool) is not None)


def drop_interrupted(pool):
    """Destroy the snapshots cbt.py makes and drops within one call (the
    anchor snapshot of an enable, the temporary end of a live interval) that
    a killed call left behind.  They would pin their volume for good: once
    destroyed it stays as a hidden dataset collect_garbage keeps (it has a
    snapshot).  Caller holds the SR lock, so no CBT call is using them."""
    for r in zfs.list_names(names.sr_root(pool), ("name",), types="snapshot"):
        snap = r[0].split("@", 1)[1] if "@" in r[0] else ""
        if snap == cbt.ANCHOR or snap.startswith(cbt.TMP_PREFIX):
            smapi.log.info("%s: left by an interrupted CBT call, destroyed", r[0])
            try:
                zfs.zfs("destroy", r[0])
            except zfs.NotFound:
                pass


def field_prop(e, field):
    """(property, ZFS name) where metadata field of entry e is stored."""
    if e["kind"] == "bookmark":
        ds, key = e["zname"].split("#", 1)
        return bm_prop(key, field), ds
    return zfs.uprop(field), e["zname"]


def check_has_data(e, what):
    if e["kind"] == "bookmark":
        raise BackendError("Volume_data_destroyed",
                           "%s holds no data (data_destroy was called on it): it cannot be %s"
                           % (e["key"], what))


def stat_bookmark(handle, e):
    ds, _key = e["zname"].split("#", 1)
    if e["zname"] not in listed_bookmarks_or_empty(ds):
        handle.index().invalidate()
        raise smapi.VolumeDoesNotExist(e["key"])
    return e


def listed_bookmarks_or_empty(ds):
    try:
        return listed_bookmarks(ds)
    except zfs.NotFound:
        return []


def destroy_bookmark(e):
    """Volume.destroy of a data-destroyed snapshot: the bookmark, its
    metadata and the maps nothing needs any more."""
    ds, key = e["zname"].split("#", 1)
    try:
        zfs.zfs("destroy", e["zname"])
    except zfs.NotFound:
        pass
    try:
        have = zfs.get([ds], [bm_prop(key, f) for f in BM_FIELDS]).get(ds, {})
    except zfs.NotFound:
        return
    for prop in sorted(have):
        zfs.zfs("inherit", prop, ds)
    _call(cbt.gc, ds)


def snapshot_taken(handle, snap):
    """After a snapshot of a CBT volume: build its map now, incrementally from
    the previous one.  Only an optimisation: a failure is logged, not raised
    (the map is rebuilt when an interval needs it)."""
    try:
        cbt.snapshot_taken(snap, state_dir(handle))
    except cbt.CbtError as e:
        smapi.log.warning("CBT map of %s not built now: %s", snap, e)


def state_dir(handle):
    return os.path.join(metadata.STATE_DIR, "cbt", handle.uuid)


def _call(fn, *args):
    try:
        return fn(*args)
    except cbt.CbtError as e:
        raise BackendError("CBT_error", str(e))


def _snapshot_entries(handle, e):
    return [o["zname"] for o in handle.index().by_dataset(e["zname"])]


# -- the SMAPIv3 methods ------------------------------------------------------------

def enable_cbt(sr, key):
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        check_has_data(e, "tracked")
        if e["kind"] != "volume":
            raise BackendError("Volume_is_a_snapshot",
                               "CBT is enabled on live volumes, not on snapshot %s" % key)
        with handle.mutate() as txn:
            _call(cbt.enable, e["zname"], state_dir(handle))
            txn.refresh += _snapshot_entries(handle, e)
    return None


def disable_cbt(sr, key):
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        check_has_data(e, "untracked (it only exists for CBT)")
        with handle.mutate() as txn:
            if e["kind"] == "volume":
                _call(cbt.disable, e["zname"], state_dir(handle))
                txn.refresh += _snapshot_entries(handle, e)
            else:
                zfs.zfs("set", "%s=off" % cbt.PROP_ENABLED, e["zname"])
                txn.refresh.append(e["zname"])
    return None


def data_destroy(sr, key):
    """Drop a snapshot's data, keep its block history (idempotent)."""
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        if e["kind"] == "bookmark":
            return None
        if e["kind"] != "snapshot":
            raise BackendError("Volume_not_a_snapshot",
                               "data_destroy applies to snapshots; %s is a live volume" % key)
        ro = "%s/%s%s" % (handle.root, names.READONLY, key)
        if zfs.exists(ro):
            raise BackendError("Volume_in_use", "snapshot %s is activated read-only" % key)
        ds = e["zname"].split("@", 1)[0]
        meta = {"name": e["name"], "description": e["description"], "keys": e["keys"],
                "sharable": e["sharable"], "volsize": e["virtual_size"]}
        with handle.mutate() as txn:
            # metadata first: it is ignored until the bookmark exists
            zfs.zfs("set", *(["%s=%s" % (bm_prop(key, f), zfs.encode(meta[f]))
                              for f in BM_FIELDS] + [ds]))
            _call(cbt.data_destroy, e["zname"], state_dir(handle))
            txn.refresh.append("%s#%s" % (ds, key))
    return None


def list_changed_blocks(sr, key, key2, offset, length):
    """The 64 KiB blocks that differ from key (a snapshot, or a data-destroyed
    one) to key2 (a later snapshot, or the live volume)."""
    names.check_key(key)
    names.check_key(key2, "key2")
    if offset < 0:
        raise InvalidParameters("offset must not be negative, got %d" % offset)
    with sr_mod.locked(sr) as handle:
        a, b = handle.find(key), handle.find(key2, "key2")
        if a["kind"] == "volume":
            raise InvalidParameters("key %s is a live volume: the older end must be a "
                                    "snapshot" % key)
        check_has_data(b, "the newer end of an interval")
        if b["kind"] == "snapshot":
            return _call(cbt.list_changed_blocks, a["zname"], b["zname"], offset, length,
                         state_dir(handle))
        changed = _call(cbt.changed_extents, a["zname"], b["zname"], state_dir(handle))
        size = int(zfs.get([b["zname"]], ["volsize"])[b["zname"]]["volsize"])
        return cbt.bitmap(changed, size, offset, length)
