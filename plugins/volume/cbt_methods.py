"""SMAPIv3 changed-block tracking (VDI_CONFIG_CBT) over plugins/volume/cbt.py:
Volume.enable_cbt, disable_cbt, data_destroy, list_changed_blocks, and what
Volume.snapshot and Volume.destroy do for CBT volumes and data-destroyed
snapshots (bookmarks.py: what those are and how they are listed).

CBT state: cbt.PROP_ENABLED on the zvol; its snapshots inherit it (a
snapshot's own "off" overrides it: disable_cbt on a snapshot).  The maps'
file cache: metadata.cbt_state_dir(sr uuid).

Every CBT call runs under the SR lock (cbt.py has none).
"""

from plugins import smapi, zfs
from plugins.smapi import BackendError, InvalidParameters
from plugins.volume import bookmarks
from plugins.volume import cbt
from plugins.volume import metadata
from plugins.volume import names
from plugins.volume import sr as sr_mod

def destroy_bookmark(e):
    """Volume.destroy of a data-destroyed snapshot: the bookmark, its
    metadata and the maps nothing needs any more."""
    ds, key = e["zname"].split("#", 1)
    try:
        zfs.zfs("destroy", e["zname"])
    except zfs.NotFound:
        pass
    try:
        have = zfs.get([ds], [bookmarks.prop(key, f) for f in bookmarks.FIELDS]).get(ds, {})
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
    return metadata.cbt_state_dir(handle.uuid)


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
        bookmarks.check_has_data(e, "tracked")
        if e["kind"] != "volume":
            raise BackendError("Volume_is_a_snapshot",
                               "CBT is enabled on live volumes, not on snapshot %s" % key)
        with handle.mutate(e["zname"]) as txn:
            _call(cbt.enable, e["zname"], state_dir(handle))
            txn.refresh += _snapshot_entries(handle, e)
    return None


def disable_cbt(sr, key):
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        bookmarks.check_has_data(e, "untracked (it only exists for CBT)")
        with handle.mutate(e["zname"]) as txn:
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
        ro = names.readonly_dataset(handle.pool, key)
        if zfs.exists(ro):
            raise BackendError("Volume_in_use", "snapshot %s is activated read-only" % key)
        ds = e["zname"].split("@", 1)[0]
        meta = {"name": e["name"], "description": e["description"], "keys": e["keys"],
                "sharable": e["sharable"], "volsize": e["virtual_size"]}
        with handle.mutate(ds) as txn:
            # metadata first: it is ignored until the bookmark exists
            zfs.zfs("set", *(["%s=%s" % (bookmarks.prop(key, f), zfs.encode(meta[f]))
                              for f in bookmarks.FIELDS] + [ds]))
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
        bookmarks.check_has_data(b, "the newer end of an interval")
        if b["kind"] == "snapshot":
            return _call(cbt.list_changed_blocks, a["zname"], b["zname"], offset, length,
                         state_dir(handle))
        # a live end is a temporary snapshot a kill would leave: SR.attach sweeps it
        mark = handle.index().want_sweep("live CBT interval of %s" % key2)
        changed = _call(cbt.changed_extents, a["zname"], b["zname"], state_dir(handle))
        handle.index().swept(mark)
        size = int(zfs.get([b["zname"]], ["volsize"])[b["zname"]]["volsize"])
        return cbt.bitmap(changed, size, offset, length)
