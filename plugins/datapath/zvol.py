"""Non-persistent sessions, by ZFS alone (the volume plugin owns everything else).

Datapath.open(persistent=false) on POOL/zfs-ng/<key>:
    snapshot POOL/zfs-ng/<key>@np-<hex>, clone it to POOL/zfs-ng/np-<key>
    (volmode=dev); the attachments read and write the clone.
Datapath.close: destroy the clone and the snapshot: the volume is exactly as
it was at open, with no copy and no rollback (a rollback would also destroy
snapshots taken in between).  Neither name is a volume key, so the volume
plugin's SR.ls and garbage collection ignore them (names.py builds both and
classifies them as 'session').  zfs runs through plugins/zfs.py.
"""

import os

from plugins import zfs
from plugins.volume import names


def wait_device(dataset, timeout=30.0):
    """The block device of a zvol, making one if volmode=none (idle volumes
    of a large SR have none).  Returns (path, volmode_was_changed)."""
    path = zfs.device_path(dataset)
    changed = False
    if not os.path.exists(path) and zfs.get([dataset], ["volmode"]).get(
            dataset, {}).get("volmode") == "none":
        zfs.zfs("set", "volmode=dev", dataset)
        changed = True
    zfs.wait_for_device(path, timeout)
    return path, changed


def destroy(name):
    """Destroy a dataset or snapshot we created; a missing one is fine."""
    if not zfs.exists(name):
        return
    try:
        zfs.destroy_retrying(name, tries=50)  # udev or a closing reader holds the device
    except zfs.NotFound:
        pass
    except zfs.ZfsError:
        if zfs.exists(name):
            raise


def np_begin(pool, key, dataset):
    """Snapshot + writable clone for a non-persistent session; returns the record."""
    snap = names.session_snapshot(dataset, names.uuid4_hex()[:12])
    clone = names.session_dataset(pool, key)
    if zfs.exists(clone):  # a session whose close never came (host crash): discard it
        np_end({"clone": clone, "snapshot": _origin(clone)})
    zfs.zfs("snapshot", snap)
    try:
        zfs.clone(snap, clone, {"volmode": "dev"})
    except zfs.ZfsError:
        destroy(snap)
        raise
    return {"snapshot": snap, "clone": clone}


def _origin(clone):
    try:
        o = zfs.get([clone], ["origin"]).get(clone, {}).get("origin", "-")
    except zfs.ZfsError:
        return None
    return None if o in ("", "-") else o


def np_end(rec):
    if rec.get("clone"):
        destroy(rec["clone"])
    if rec.get("snapshot") and names.is_session_snapshot(rec["snapshot"]):
        destroy(rec["snapshot"])
