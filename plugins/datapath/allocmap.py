"""The ZFS allocation map of a snapshot, as an extent file for nbd_server
(`--allocation EXPORT FILE`, nbd_server.config.load_allocation), so that NBD
base:allocation (NBD_CMD_BLOCK_STATUS) shows the snapshot's holes: a zvol
answers SEEK_HOLE with EINVAL, and without a map every byte is "data".

Only snapshots get one: their map never changes, so a file written at attach
stays right for the life of the export.  A live read-write volume changes
under the export; a map taken at attach would soon call freshly written data
a hole, and a client trusting it (qemu-img convert, nbdcopy, a backup) would
skip that data.  Its exports keep the safe answer, all data.

The map comes from plugins.volume.cbt (a `zfs send` header scan, incremental
from an earlier mapped snapshot when there is one, cached in the SR's CBT
state dir, so the backup and CBT code reuse it).  A snapshot with no earlier
map costs one read of its data at the first attach.
"""

import json
import os

from plugins import smapi


def snapshot_map(loc):
    """[(offset, length, flags)] covering the whole snapshot described by
    volume.locate()'s dict, or None for a writable volume."""
    if not loc.get("readonly") or "@" not in loc.get("dataset", ""):
        return None
    from plugins.volume import cbt, metadata
    state_dir = metadata.cbt_state_dir(loc["sr_uuid"])
    # Not under the SR lock: the first map of a large snapshot is a full
    # `zfs send` scan, and holding the lock would stall every SR operation
    # (other VMs' attaches too) for that long.  The scan only reads; the map
    # it stores is keyed by the snapshot's guid (a racing destroy fails the
    # call, which then serves without a map; cbt.gc drops orphans), and two
    # scans at once only duplicate work (cbt.py).
    return cbt.allocation_extents(loc["dataset"], 0, int(loc["size"]), state_dir=state_dir)


def write(extents, path):
    """Atomically write the extent file nbd_server loads (data elsewhere: default 0)."""
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump({"extents": [[int(o), int(n), int(fl)] for o, n, fl in extents],
                   "default": 0}, f)
    os.rename(tmp, path)
    return path


def for_export(sr, key, path):
    """Write the map of snapshot KEY of SR to path and return path; None when
    the volume gets no map (writable) or it cannot be computed now (logged:
    serving without a map is correct, only slower for sparse-aware clients)."""
    from plugins.volume import cbt, volume
    try:
        extents = snapshot_map(volume.locate(sr, key))
        if extents is None:
            return None
        return write(extents, path)
    except (cbt.CbtError, smapi.SmapiError, OSError, IOError, ValueError, KeyError) as e:
        smapi.log.warning("no allocation map for %s/%s over NBD: %s", sr, key, e)
        return None
