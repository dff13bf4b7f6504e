"""Non-persistent sessions, by ZFS alone (the volume plugin owns everything else).

Datapath.open(persistent=false) on POOL/zfs-ng/<key>:
    snapshot POOL/zfs-ng/<key>@np-<hex>, clone it to POOL/zfs-ng/np-<key>
    (volmode=dev); the attachments read and write the clone.
Datapath.close: destroy the clone and the snapshot: the volume is exactly as
it was at open, with no copy and no rollback (a rollback would also destroy
snapshots taken in between).  Neither name is a volume key, so the volume
plugin's SR.ls and garbage collection ignore them (plugins/volume/names.py).
"""

import os
import subprocess
import time
import uuid

from plugins import smapi

SR_DATASET = "zfs-ng"
RO_PREFIX = "ro-"
NP_PREFIX = "np-"
ZFS = os.environ.get("ZFSNG_ZFS", "zfs")


class ZfsError(smapi.SmapiError):
    name = "ZFS_error"


def _run(argv, check=True):
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    except OSError as e:
        raise ZfsError("cannot run %s: %s" % (argv[0], e.strerror))
    out, err = p.communicate()
    if check and p.returncode != 0:
        raise ZfsError("%s failed: %s" % (" ".join(argv[:2]), (err or out).strip()))
    return p.returncode, out, err


def zfs(*args, **kw):
    return _run([ZFS] + list(args), **kw)


def exists(name):
    return zfs("list", "-H", "-o", "name", name, check=False)[0] == 0


def get(name, prop):
    return zfs("get", "-H", "-p", "-o", "value", prop, name)[1].strip()


def root(pool):
    return "%s/%s" % (pool, SR_DATASET)


def device_path(dataset):
    return "/dev/zvol/" + dataset


def wait_device(dataset, timeout=30.0):
    """The block device of a zvol, making one if volmode=none (idle volumes
    of a large SR have none).  Returns (path, volmode_was_changed)."""
    path = device_path(dataset)
    changed = False
    if not os.path.exists(path) and get(dataset, "volmode") == "none":
        zfs("set", "volmode=dev", dataset)
        changed = True
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            raise ZfsError("no block device %s after %.0f s" % (path, timeout))
        subprocess.call(["udevadm", "settle", "--timeout=5"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
        time.sleep(0.1)
    return path, changed


def destroy(name):
    """Destroy a dataset or snapshot we created; a missing one is fine."""
    if not exists(name):
        return
    for attempt in range(50):
        rc, _, err = zfs("destroy", name, check=False)
        if rc == 0 or not exists(name):
            return
        if "busy" not in err:
            break
        time.sleep(0.2)  # udev or a closing reader still holds the device
    raise ZfsError("cannot destroy %s: %s" % (name, err.strip()))


def np_begin(pool, key, dataset):
    """Snapshot + writable clone for a non-persistent session; returns the record."""
    snap = "%s@%s%s" % (dataset, NP_PREFIX, uuid.uuid4().hex[:12])
    clone = "%s/%s%s" % (root(pool), NP_PREFIX, key)
    if exists(clone):  # a session whose close never came (host crash): discard it
        np_end({"clone": clone, "snapshot": _origin(clone)})
    zfs("snapshot", snap)
    try:
        zfs("clone", "-o", "volmode=dev", snap, clone)
    except ZfsError:
        destroy(snap)
        raise
    return {"snapshot": snap, "clone": clone}


def _origin(clone):
    try:
        o = get(clone, "origin")
    except ZfsError:
        return None
    return None if o in ("", "-") else o


def np_end(rec):
    if rec.get("clone"):
        destroy(rec["clone"])
    if rec.get("snapshot") and "@" + NP_PREFIX in rec["snapshot"]:
        destroy(rec["snapshot"])
