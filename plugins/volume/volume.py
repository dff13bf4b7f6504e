"""Volumes: the zvol code.  Every SMAPIv3 Volume method, and the public API the
datapath plugins call (`locate`, `activate_device`, `deactivate_device`).

What backs what in ZFS (layout in names.py):
  create          zfs create -s -V (sparse, size rounded up to volblocksize)
  snapshot        zfs snapshot DS@NEWKEY; of a snapshot: clone it to a hidden
                  dataset and snapshot that (same data, not the parent's now)
  clone           zfs clone SNAP NEWKEY; of a live volume: hidden snapshot
                  DS@h-..., clone, then defer-destroy the hidden snapshot
  destroy         zfs destroy; a volume with snapshots is renamed hidden, a
                  snapshot with clones is renamed hidden and defer-destroyed;
                  hidden leftovers are collected (here and on SR.attach)
  revert          clone SNAP to r-KEY, retire KEY (destroy, or hide if it has
                  snapshots), rename r-KEY to KEY (crash: finished on reconcile)
  resize          zfs set volsize (grow only)
  set/unset/...   user properties org.zfs-ng:keys/name/description
Each mutation runs under the SR lock with the pool generation bumped first
(sr.SR.mutate), so the local index is never trusted after a crash.
"""

import os

from plugins import smapi, uri, zfs
from plugins.smapi import BackendError, InvalidParameters
from plugins.volume import bookmarks
from plugins.volume import cbt_methods
from plugins.volume import lock
from plugins.volume import names
from plugins.volume import sr as sr_mod
from plugins.volume import vdi
from plugins.volume.sr import SR

DEFAULT_VOLBLOCKSIZE = 16384
MAX_VOLUME_SIZE = 1 << 60
MAX_KEYS_JSON = 8000  # ZFS user property values are at most 8192 bytes


def round_up(size, block):
    return max(block, (size + block - 1) // block * block)


def _check_size(size, what="size"):
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidParameters("%s must be a non-negative integer, got %r" % (what, size))
    if size > MAX_VOLUME_SIZE:
        raise InvalidParameters("%s %d is too large" % (what, size))
    return size


def _user_props(name, description, sharable, keys=None):
    props = {
        zfs.uprop("name"): zfs.encode(name),
        zfs.uprop("description"): zfs.encode(description),
        zfs.uprop("sharable"): zfs.encode(bool(sharable)),
    }
    if keys:
        props[zfs.uprop("keys")] = _encode_keys(keys)
    return props


def _encode_keys(keys):
    text = zfs.encode(keys)
    if len(text) > MAX_KEYS_JSON:
        raise InvalidParameters("volume keys exceed %d bytes in total" % MAX_KEYS_JSON)
    return text


def _dataset_of(e):
    return e["zname"].split("@", 1)[0]


# -- methods -------------------------------------------------------------------------

def ls(sr):
    """Every volume, from the index.  Sizes are current: the index has them
    as of the last mutation, and only volumes whose device was activated since
    (Index.touched) can have been written, so only those are read from ZFS
    (one `zfs get`; xapi's sr-scan takes VDI usage from here).  Each record's
    JSON is kept in the index with its row (Index.rendered), and the whole
    list in /run while no row changes (Index.listing): a warm SR.ls of 100k
    volumes is one file sent to stdout, one after a change joins stored texts."""
    handle = SR.open(sr)
    idx = handle.fresh_index()
    _refresh_usage(idx, handle.pool)

    render_key, render = vdi.renderer(handle)
    return idx.listing(render_key, render, sr_mod.listing_path(handle.uuid))


def _refresh_usage(idx, pool):
    """Usage of the marked keys read again; a mark goes once nothing of its
    key is active (volume without volmode=dev, no ro-KEY, no np-KEY)."""
    keys = idx.touched()
    if not keys:
        return
    entries = dict((k, idx.get(k)) for k in keys)
    wanted = []
    for k, e in entries.items():
        if e is not None:
            wanted += [e["zname"], names.readonly_dataset(pool, k), names.session_dataset(pool, k)]
    try:
        got = zfs.get_existing(wanted, ["referenced", "volmode"])
    except zfs.ZfsError as err:
        smapi.log.info("usage of %d activated volumes not read: %s", len(keys), err.message)
        return
    usage, done = {}, []
    for k, e in entries.items():
        if e is None:
            done.append(k)
            continue
        p = got.get(e["zname"], {})
        if e["kind"] == "volume" and "referenced" in p:
            usage[k] = int(p["referenced"])
        active = (e["kind"] == "volume" and p.get("volmode") == "dev") or \
            names.readonly_dataset(pool, k) in got or names.session_dataset(pool, k) in got
        if not active and e["zname"] in got:
            done.append(k)
    idx.set_usage(usage, done)


def stat(sr, key):
    handle = SR.open(sr)
    e = handle.lookup(key)
    if e["kind"] == "bookmark":  # data-destroyed: no data, sizes as recorded
        return vdi.record(handle, bookmarks.stat(handle, e))
    # sizes fresh from ZFS (the index holds them as of the last mutation)
    try:
        e["virtual_size"], e["physical_utilisation"] = zfs.sizes(e["zname"])
    except zfs.NotFound:
        handle.index().invalidate()
        raise smapi.VolumeDoesNotExist(key)
    return vdi.record(handle, e)


def create(sr, name, description, size, sharable):
    names.check_text(name, "name")
    names.check_text(description, "description")
    size = round_up(_check_size(size), DEFAULT_VOLBLOCKSIZE)
    key = names.new_key()
    props = _user_props(name, description, sharable)
    props["volblocksize"] = str(DEFAULT_VOLBLOCKSIZE)
    with sr_mod.locked(sr) as handle:
        ds = names.volume_dataset(handle.pool, key)
        with handle.mutate(ds) as txn:
            zfs.zfs("create", "-s", "-V", str(size), *(zfs.prop_args(props) + [ds]))
            txn.entries.append({
                "key": key, "zname": ds, "kind": "volume", "name": name,
                "description": description, "keys": {}, "sharable": bool(sharable),
                "virtual_size": size, "physical_utilisation": 0,
                "volblocksize": DEFAULT_VOLBLOCKSIZE, "origin": "", "createtxg": 0})
        return vdi.record(handle, handle.index().get(key))


def snapshot(sr, key):
    names.check_key(key)
    new = names.new_key()
    with sr_mod.locked(sr) as handle:
        src = handle.find(key)
        bookmarks.check_has_data(src, "snapshotted")
        props = zfs.prop_args(_user_props(src["name"], src["description"], src["sharable"]))
        # ZFS cannot snapshot a snapshot: a hidden clone of it carries the new one
        base = src["zname"] if src["kind"] == "volume" else \
            "%s/%s" % (handle.root, names.hidden_name())
        with handle.mutate(base) as txn:
            if src["kind"] == "volume":
                snap = "%s@%s" % (src["zname"], new)
            else:
                zfs.clone(src["zname"], base, {"readonly": "on"})
                snap = "%s@%s" % (base, new)
            zfs.zfs("snapshot", *(props + [snap]))
            if src["kind"] == "volume" and src.get("cbt_enabled"):
                cbt_methods.snapshot_taken(handle, snap)
            txn.refresh.append(snap)
        return vdi.record(handle, handle.index().get(new))


def clone(sr, key):
    names.check_key(key)
    new = names.new_key()
    with sr_mod.locked(sr) as handle:
        src = handle.find(key)
        bookmarks.check_has_data(src, "cloned")
        ds = names.volume_dataset(handle.pool, new)
        props = _user_props(src["name"], src["description"], src["sharable"])
        with handle.mutate(src["zname"], ds) as txn:
            if src["kind"] == "snapshot":
                zfs.clone(src["zname"], ds, props)
            else:
                origin = "%s@%s" % (src["zname"], names.hidden_name())
                zfs.zfs("snapshot", origin)
                zfs.clone(origin, ds, props)
                # goes away by itself with the clone (collect_garbage if we crash here)
                zfs.zfs("destroy", "-d", origin)
            txn.refresh.append(ds)
        return vdi.record(handle, handle.index().get(new))


# The key xapi-storage-script records a volume's on-boot=reset transient under
# (main.ml, _clone_on_boot_key; set in vdi_epoch_begin_impl).
CLONE_ON_BOOT = "clone-on-boot"


def destroy(sr, key):
    """Destroy a volume, snapshot or data-destroyed snapshot.

    Idempotent: destroying a key this host destroyed succeeds (xapi repeats
    calls, and VDI.destroy of a VDI still carrying a clone-on-boot key calls
    Volume.destroy on the original twice: main.ml, vdi_destroy_impl).  A volume
    carrying clone-on-boot (a reset-on-boot VM that never reached epoch_end)
    takes its transient clone along, which xapi would otherwise leave behind as
    a new VDI at the next scan."""
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        try:
            e = handle.find(key)
        except smapi.VolumeDoesNotExist:
            if handle.index().was_destroyed(key):
                return None
            raise
        if e["kind"] == "volume":
            transient = _clone_on_boot_of(handle, e)
            _check_idle(handle, e)
            if transient is not None:
                _check_idle(handle, transient)
            retiring = [(v, "%s/%s" % (handle.root, names.hidden_name()))
                        for v in ([transient] if transient is not None else []) + [e]]
            with handle.mutate(*[z for v, hidden in retiring
                                 for z in (v["zname"], hidden, v["origin"]) if z]) as txn:
                for v, hidden in retiring:
                    _destroy_volume(handle, v, txn, hidden)
                    txn.delete.append(v["key"])
                    txn.destroyed.append(v["key"])
        elif e["kind"] == "bookmark":
            with handle.mutate(e["zname"]) as txn:
                cbt_methods.destroy_bookmark(e)
                _collect_from(handle, e["zname"].split("#", 1)[0])
                txn.delete.append(key)
                txn.destroyed.append(key)
        else:
            _release_readonly(handle, e)
            with handle.mutate(e["zname"]) as txn:
                _destroy_snapshot(handle, e, txn)
                txn.delete.append(key)
                txn.destroyed.append(key)
    return None


def _clone_on_boot_of(handle, e):
    """The index entry of e's clone-on-boot transient, if it still exists and
    really is a clone of e (never trust a key to name what to destroy)."""
    t = e["keys"].get(CLONE_ON_BOOT)
    if not t or t == e["key"]:
        return None
    try:
        names.check_key(t)
        te = handle.find(t)
    except smapi.SmapiError:
        return None
    if te["kind"] != "volume" or te["origin"].split("@", 1)[0] != e["zname"]:
        smapi.log.warning("volume %s: clone-on-boot %s is not its clone; left alone", e["key"], t)
        return None
    return te


def _check_idle(handle, e):
    """Refuse to retire a volume whose device is activated or that has an open
    non-persistent session (np-KEY, plugins/datapath/zvol.py)."""
    np = names.session_dataset(handle.pool, e["key"])
    out = zfs.run([zfs.ZFS, "get", "-H", "-p", "-o", "name,value,source", "volmode",
                   e["zname"], np], check=False)
    for r in zfs.rows(out):
        if r[0] == np:
            raise BackendError("Volume_in_use", "volume %s has an open session" % e["key"])
        if r[0] == e["zname"] and len(r) == 3 and r[2] == "local" and r[1] == "dev":
            raise BackendError("Volume_in_use", "volume %s is activated (deactivate it first)"
                               % e["key"])


def _release_readonly(handle, e):
    ro = names.readonly_dataset(handle.pool, e["key"])
    try:
        zfs.zfs("destroy", ro)
    except zfs.NotFound:
        pass
    except zfs.Busy:
        raise BackendError("Volume_in_use", "snapshot %s is activated read-only" % e["key"])


def _destroy_volume(handle, e, txn, hidden):
    """Destroy volume e, or if it has snapshots rename it to hidden (a
    name the mutation's journal holds already)."""
    ds = e["zname"]
    try:
        if bookmarks.listed(ds):  # zfs destroy would take them along
            raise zfs.HasChildren("%s has data-destroyed snapshots" % ds)
        # udev's probe (a just-deactivated node, a rename's event) may hold
        # the device a moment: busy for ~5 s is really in use
        zfs.destroy_retrying(ds, tries=12)
    except zfs.NotFound:
        pass
    except zfs.HasChildren:
        # it has snapshots (volumes of their own): keep the data, hidden
        zfs.zfs("rename", ds, hidden)
        txn.rename.append((ds, hidden))
        return
    if e["origin"]:
        _collect_from(handle, e["origin"].split("@", 1)[0])


def _destroy_snapshot(handle, e, txn):
    snap = e["zname"]
    try:
        zfs.zfs("destroy", snap)
    except zfs.NotFound:
        pass
    except zfs.HasClones:
        ds = snap.split("@", 1)[0]
        hidden = "%s@%s" % (ds, names.hidden_name())
        zfs.zfs("rename", snap, hidden)
        zfs.zfs("destroy", "-d", hidden)  # removed with its last clone
        return
    _collect_from(handle, snap.split("@", 1)[0])


def _collect_from(handle, ds):
    """Destroy what a destroyed clone of a snapshot of ds left: hidden
    snapshots of ds without clones, then ds itself if it is hidden and has
    nothing left, walking up the origins.  A hidden snapshot is normally
    destroyed by ZFS with its last clone (`zfs destroy -d`), but a
    Volume.destroy killed between its rename and that destroy leaves one
    without the mark, and once the SR.attach after the kill has swept (the
    clone still there) nothing else would look at it again (found by
    test_kill_9_at_random_points_of_plugin_calls, seed 1070240819)."""
    for _ in range(1000):
        kind, _key = names.classify(ds, handle.pool)
        if kind not in ("hidden", "volume") or "@" in ds:
            return
        handle.journal([ds])        # up the chain: each in the journal before it changes
        try:
            snaps = []
            for r in zfs.list_names(ds, ("name", "clones"), types="snapshot", depth=1):
                if names.classify(r[0], handle.pool)[0] == "hidden" and \
                        (len(r) < 2 or r[1] in ("", "-")):
                    zfs.run([zfs.ZFS, "destroy", "-d", r[0]], check=False)
                    if zfs.exists(r[0]):        # held, or a clone came: kept
                        snaps.append(r[0])
                else:
                    snaps.append(r[0])
            if kind != "hidden" or snaps or bookmarks.listed(ds):
                return
            origin = zfs.get([ds], ["origin"]).get(ds, {}).get("origin", "-")
            zfs.destroy_retrying(ds, tries=12)
        except zfs.NotFound:
            return
        except zfs.Busy:
            handle.index().want_sweep("garbage %s was busy" % ds)
            return
        if origin in ("-", ""):
            return
        okind, _ = names.classify(origin, handle.pool)
        if okind == "hidden":
            zfs.run([zfs.ZFS, "destroy", "-d", origin], check=False)
        ds = origin.split("@", 1)[0]


def revert(sr, snapshot, key):
    names.check_key(snapshot, "snapshot")
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        snap = handle.find(snapshot)
        vol = handle.find(key)
        bookmarks.check_has_data(snap, "reverted to")
        if snap["kind"] != "snapshot":
            raise InvalidParameters("%s is not a snapshot" % snapshot)
        if vol["kind"] != "volume":
            raise InvalidParameters("%s is not a writable volume" % key)
        _check_idle(handle, vol)
        ds = vol["zname"]
        tmp = names.reverting_dataset(handle.pool, key)
        props = _user_props(vol["name"], vol["description"], vol["sharable"], vol["keys"])
        hidden = "%s/%s" % (handle.root, names.hidden_name())
        with handle.mutate(ds, tmp, hidden, vol["origin"]) as txn:
            # crash after any step: SR.reconcile finishes or undoes it (r-KEY)
            zfs.clone(snap["zname"], tmp, props)
            try:
                if bookmarks.listed(ds):  # keep data-destroyed snapshots
                    raise zfs.HasChildren("%s has data-destroyed snapshots" % ds)
                zfs.zfs("destroy", ds)
            except zfs.HasChildren:
                zfs.zfs("rename", ds, hidden)
                txn.rename.append((ds, hidden))
            zfs.zfs("rename", tmp, ds)
            txn.refresh.append(ds)
    return None


def resize(sr, key, new_size):
    names.check_key(key)
    _check_size(new_size, "new_size")
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        if e["kind"] != "volume":
            raise InvalidParameters("%s is a snapshot (read-only)" % key)
        size = round_up(new_size, e["volblocksize"])
        cur = int(zfs.get([e["zname"]], ["volsize"])[e["zname"]]["volsize"])
        if size < cur:
            raise BackendError("Shrink_refused", "volume %s is %d bytes; shrinking to %d "
                               "would destroy data" % (key, cur, size))
        if size == cur:
            return None
        with handle.mutate(e["zname"]) as txn:
            zfs.zfs("set", "volsize=%d" % size, e["zname"])
            e["virtual_size"] = size
            txn.entries.append(e)
    return None


def _set_field(sr, key, field, compute, prop_text):
    """Set one metadata field to compute(current entry), under the lock."""
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        value = compute(e)
        text = prop_text(value)
        with handle.mutate(e["zname"]) as txn:
            prop, target = bookmarks.field_prop(e, field)
            zfs.zfs("set", "%s=%s" % (prop, text), target)
            e[field] = value
            txn.entries.append(e)
    return None


def set_name(sr, key, new_name):
    names.check_text(new_name, "name")
    return _set_field(sr, key, "name", lambda e: new_name, zfs.encode)


def set_description(sr, key, new_description):
    names.check_text(new_description, "description")
    return _set_field(sr, key, "description", lambda e: new_description, zfs.encode)


def _with(d, k, v):
    d = dict(d)
    d[k] = v
    return d


def set_key(sr, key, k, v):
    names.check_text(k, "k")
    names.check_text(v, "v")
    return _set_field(sr, key, "keys", lambda e: _with(e["keys"], k, v), _encode_keys)


def unset_key(sr, key, k):
    names.check_text(k, "k")
    return _set_field(sr, key, "keys",
                      lambda e: dict((a, b) for a, b in e["keys"].items() if a != k),
                      _encode_keys)


def similar_content(sr, key):
    """Keys sharing blocks with key, nearest first: its own snapshots and
    clones and those of its origin, by distance in createtxg."""
    handle = SR.open(sr)
    e = handle.lookup(key)
    idx = handle.index()
    family = {}
    datasets = [_dataset_of(e)]
    if e["origin"]:
        datasets.append(e["origin"].split("@", 1)[0])
    for ds in datasets:
        for o in idx.by_dataset(ds) + idx.clones_of(ds):
            family[o["key"]] = o
    family.pop(key, None)
    return [o["key"] for o in sorted(family.values(),
                                     key=lambda o: (abs(o["createtxg"] - e["createtxg"]),
                                                    o["key"]))]


COMPARE_BLOCK = 65536


def compare(sr, key, key2):
    """The 64 KiB blocks where key and key2 differ, read from both devices
    (activated for the comparison if idle).  Past the end of the shorter one,
    the longer one's non-zero blocks differ."""
    a, b = locate(sr, key), locate(sr, key2)
    opened = []
    try:
        for loc in (a, b):
            if not loc["active"]:
                activate_device(sr, loc["key"])
                opened.append(loc["key"])
        ranges = []
        with open(a["device"], "rb", buffering=0) as fa, open(b["device"], "rb",
                                                              buffering=0) as fb:
            off, end = 0, max(a["size"], b["size"])
            while off < end:
                x = fa.read(COMPARE_BLOCK) if off < a["size"] else b""
                y = fb.read(COMPARE_BLOCK) if off < b["size"] else b""
                n = max(len(x), len(y)) or COMPARE_BLOCK
                if x.ljust(n, b"\0") != y.ljust(n, b"\0"):
                    if ranges and ranges[-1][0] + ranges[-1][1] == off:
                        ranges[-1][1] += n
                    else:
                        ranges.append([off, n])
                off += n
        return {"blocksize": COMPARE_BLOCK, "ranges": ranges}
    finally:
        for k in opened:
            deactivate_device(sr, k)


# -- for the datapath plugins -----------------------------------------------------

def _volmode_local(ds):
    value, local = zfs.native_prop(ds, "volmode")
    return value if local else None


def locate(sr, key):
    """Where a volume's data is, for the datapath plugins:

        {"sr", "key", "uuid", "dataset", "device", "readonly", "size", "kind",
         "sr_uuid", "subnqn", "active"}

    `dataset` is the ZFS name (POOL/zfs-ng/KEY, or POOL/zfs-ng/DS@KEY for a
    snapshot).  `device` is the block device to open; it exists only after
    activate_device() (idle volumes have volmode=none, so 100k volumes need no
    minors).  A snapshot's device is a read-only clone POOL/zfs-ng/ro-KEY.
    Raises smapi.SrNotAttached / SrDoesNotExist / VolumeDoesNotExist."""
    handle = SR.open(sr)
    return _locate(handle, handle.lookup(key))


def _locate(handle, e):
    key = e["key"]
    if e["kind"] == "volume":
        dev_ds = e["zname"]
    else:
        dev_ds = names.readonly_dataset(handle.pool, key)
    device = zfs.device_path(dev_ds)
    return {
        "sr": handle.pool,
        "sr_uuid": handle.uuid,
        "key": key,
        "uuid": key,
        "dataset": e["zname"],
        "device": device,
        "readonly": e["kind"] != "volume",
        "size": e["virtual_size"],
        "kind": e["kind"],
        "subnqn": uri.subnqn_for(handle.uuid, key),
        "active": os.path.exists(device),
    }


def activate_device(sr, key, timeout=60.0, link=True):
    """Make the volume's block device exist and return locate() with it.
    Idempotent.  Volumes: volmode=dev on the zvol.  Snapshots: a read-only
    clone (ro-KEY, volmode=dev) that deactivate_device destroys.  The caller
    (a datapath) counts its own users: one deactivate undoes any number of
    activates.  link=False: return once the zvol's minor is there, before
    udev's /dev/zvol link (zfs.wait_for_device), for a device path handed only
    to our own servers, which open the minor by name until the link is made
    (blockio/zvol.py); tapdisk and any other opener need link=True."""
    # one reading of the SR root's properties, under the lock: the journal
    # below must be the pool's current one
    with sr_mod.locked(sr) as handle:
        e = handle.find(key)
        bookmarks.check_has_data(e, "attached")
        loc = _locate(handle, e)
        # before the device exists: SR.ls reads a volume's usage again, and a
        # crash reset knows what to look at (sr.reset_stale_devices), here and
        # on a host that takes the pool after a crash (the pool's journal)
        handle.index().touch(key)
        handle.journal([e["zname"] if e["kind"] == "volume"
                        else names.readonly_dataset(handle.pool, key)])
        if e["kind"] == "volume":
            # an idle volume (no device node) is set at once; a node may also
            # be one a deactivate just left, going away: then look first
            if not loc["active"] or _volmode_local(e["zname"]) != "dev":
                zfs.set_prop(e["zname"], "volmode", "dev")
        else:
            ro = names.readonly_dataset(handle.pool, key)
            if not zfs.exists(ro):
                zfs.clone(e["zname"], ro, {"readonly": "on", "volmode": "dev"})
    zfs.wait_for_device(loc["device"], timeout, link=link)
    loc["active"] = True
    return loc


def note_session(sr, key):
    """A datapath is about to make volume KEY's non-persistent session clone
    (np-KEY, plugins/datapath/zvol.py): mark the key like activate_device."""
    names.check_key(key)
    with sr_mod.locked(sr) as handle:
        handle.index().touch(key)
        handle.journal([names.session_dataset(handle.pool, key)])


def deactivate_device(sr, key):
    """Undo activate_device (idempotent).  Fails with Volume_in_use while the
    snapshot's read-only device is open."""
    handle = SR.open(sr)
    e = handle.lookup(key)
    with lock.sr_lock(handle.pool):
        if e["kind"] == "volume":
            if _volmode_local(e["zname"]) is not None:
                zfs.inherit_prop(e["zname"], "volmode")
        else:
            ro = names.readonly_dataset(handle.pool, key)
            try:
                # udev's probe of the new node may still hold it for a moment
                # (a detach right after an attach): busy for ~5 s is really open
                zfs.destroy_retrying(ro, tries=12)
            except zfs.NotFound:
                pass
            except zfs.Busy:
                raise BackendError("Volume_in_use", "%s is still open" % ro)
    return None
