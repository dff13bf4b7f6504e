"""Data-destroyed snapshots: the bookmarks Volume.data_destroy leaves, and
the index entries they are (metadata.read_entries lists them with the rest).

A data-destroyed snapshot DS@KEY becomes the bookmark DS#KEY (data gone,
block history kept) and stays a volume of the SR: xapi then sets
vdi-type=cbt_metadata on it and uses it as the base of the next incremental
backup, so SR.ls must keep listing it.  Bookmarks hold no user properties, so
its metadata lives on the parent dataset DS (it travels with the pool):

    org.zfs-ng:bm.<KEY>.name / .description / .keys / .sharable / .volsize

Index entries of kind "bookmark": read-only, physical_utilisation 0,
cbt_enabled true; they cannot be attached, snapshotted, cloned or reverted to
(check_has_data).  The CBT methods that make and drop them: cbt_methods.py.
"""

from plugins import smapi, zfs
from plugins.smapi import BackendError
from plugins.volume import names

FIELDS = ["name", "description", "keys", "sharable", "volsize"]
# datasets per `zfs get` when reading bookmark metadata (output is datasets x props)
_GET_BATCH = 64


def prop(key, field):
    return zfs.uprop("bm.%s.%s" % (key, field))


def split(zname, pool):
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


def entry(pool, zname, createtxg, props):
    """The index entry of bookmark zname from its parent's `zfs get` values."""
    got = split(zname, pool)
    if got is None:
        return None
    key = got[1]

    def user(field, default):
        v = props.get(prop(key, field))
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


def entries(pool, targets=None):
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
    return _entries(pool, rows)


def entries_of(pool, datasets):
    """Entries of the data-destroyed snapshots of datasets (those that exist)."""
    return _entries(pool, _listed_in(datasets, ("name", "createtxg")))


def _listed_in(datasets, props):
    """Rows (props) of the bookmarks of datasets, those that exist."""
    rows = []
    for i in range(0, len(datasets), _GET_BATCH):
        rows += zfs.list_names(datasets[i:i + _GET_BATCH], props, types="bookmark", depth=1,
                               missing_ok=True)
    return rows


def _entries(pool, rows):
    """Entries of the bookmarks among rows [name, createtxg]."""
    found = {}  # parent dataset -> [(zname, createtxg)]
    for r in rows:
        if len(r) == 2 and split(r[0], pool) is not None:
            found.setdefault(split(r[0], pool)[0], []).append((r[0], r[1]))
    out = []
    parents = sorted(found)
    for i in range(0, len(parents), _GET_BATCH):
        batch = parents[i:i + _GET_BATCH]
        props = sorted(set(prop(split(z, pool)[1], f)
                           for ds in batch for z, _ in found[ds] for f in FIELDS))
        got = zfs.get(batch, props)
        for ds in batch:
            for zname, txg in found[ds]:
                out.append(entry(pool, zname, txg, got.get(ds, {})))
    return out


def listed(ds):
    """The data-destroyed snapshots (listed volumes) of dataset ds."""
    pool = ds.split("/", 1)[0]
    rows = zfs.list_names(ds, ("name",), types="bookmark", depth=1)
    return [r[0] for r in rows if split(r[0], pool) is not None]


def datasets(pool, scope=None):
    """Datasets of the SR holding data-destroyed snapshots (not garbage); of
    those in scope (a list of datasets, missing ones skipped) if given."""
    if scope is None:
        rows = zfs.list_names(names.sr_root(pool), ("name",), types="bookmark")
    else:
        rows = _listed_in(scope, ("name",))
    return set(split(r[0], pool)[0] for r in rows
               if split(r[0], pool) is not None)


def field_prop(e, field):
    """(property, ZFS name) where metadata field of entry e is stored."""
    if e["kind"] == "bookmark":
        ds, key = e["zname"].split("#", 1)
        return prop(key, field), ds
    return zfs.uprop(field), e["zname"]


def check_has_data(e, what):
    if e["kind"] == "bookmark":
        raise BackendError("Volume_data_destroyed",
                           "%s holds no data (data_destroy was called on it): it cannot be %s"
                           % (e["key"], what))


def stat(handle, e):
    ds, _key = e["zname"].split("#", 1)
    if e["zname"] not in listed_or_empty(ds):
        handle.index().invalidate()
        raise smapi.VolumeDoesNotExist(e["key"])
    return e


def listed_or_empty(ds):
    try:
        return listed(ds)
    except zfs.NotFound:
        return []
