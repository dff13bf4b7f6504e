"""The ZFS side of local datapaths: find the dataset behind <sr>/<key>, give it
a block device, expose snapshots read-only, and make volumes non-persistent.

Names follow the volume plugin's layout (plugins/volume/names.py):
    POOL/zfs-ng/<key>          a volume            -> /dev/zvol/POOL/zfs-ng/<key>
    POOL/zfs-ng/<ds>@<key>     a snapshot: not a block device, so attaching it
                               clones it once, read-only, to POOL/zfs-ng/ro-<key>,
                               shared by all its attachments, destroyed with the last
    POOL/zfs-ng/<key>@np-<hex> + POOL/zfs-ng/np-<key>
                               Datapath.open(persistent=false): the guest writes to
                               a clone; close destroys clone and snapshot, so the
                               volume is back to its state at open, by ZFS alone
Snapshots of many volumes are not made visible with snapdev=visible: that
would create a device for every snapshot of the volume (65,536 minors per host).
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


class Source(object):
    """What an attachment reads and writes: a zvol dataset (maybe a clone we
    made) and whether it may be written."""

    def __init__(self, dataset, writable, snapshot=None):
        self.dataset = dataset
        self.writable = writable
        self.snapshot = snapshot   # the snapshot behind a read-only clone

    @property
    def device(self):
        return device_path(self.dataset)


def device_path(dataset):
    return "/dev/zvol/" + dataset


def locate(pool, key):
    """('volume', dataset) or ('snapshot', snapshot name) for a key, else
    Volume_does_not_exist."""
    ds = "%s/%s" % (root(pool), key)
    if exists(ds):
        return "volume", ds
    rc, out, _ = zfs("list", "-H", "-o", "name", "-t", "snapshot", "-r", root(pool), check=False)
    if rc == 0:
        for line in out.splitlines():
            name = line.strip()
            if name.endswith("@" + key) and name.count("/") == ds.count("/"):
                return "snapshot", name
    rc, _, _ = zfs("list", "-H", "-o", "name", root(pool), check=False)
    if rc != 0:
        raise smapi.SrNotAttached(pool)
    raise smapi.VolumeDoesNotExist(key)


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


def ro_clone_name(pool, key):
    return "%s/%s%s" % (root(pool), RO_PREFIX, key)


def ro_clone(pool, key, snapshot):
    """A read-only zvol with the snapshot's content (created if missing)."""
    clone = ro_clone_name(pool, key)
    if not exists(clone):
        rc, _, err = zfs("clone", "-o", "readonly=on", "-o", "volmode=dev", snapshot, clone,
                         check=False)
        if rc != 0 and not exists(clone):
            raise ZfsError("cannot clone %s for read-only access: %s" % (snapshot, err.strip()))
    return clone


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
