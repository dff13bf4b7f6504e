"""The Plugin interface of org.xen.xapi.storage.zfs-ng: query, ls, diagnostics."""

from plugins import smapi
from plugins.volume import names
from plugins.volume import sr as sr_mod
from plugins.volume import zfs

VERSION = "0.1.0"

# The daemon adds SR_* and VDI_CREATE/CLONE/SNAPSHOT/RESIZE/DELETE/UPDATE from the
# scripts present; these are the ones it cannot infer.  Only what works:
# no VDI_COMPOSE, no VDI_MIRROR_IN.
FEATURES = [
    "SR_PROBE",
    "SR_UPDATE",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_SNAPSHOT",
    "VDI_CLONE",
    "VDI_RESIZE",
    "VDI_UPDATE",
    "VDI_REVERT",
    "VDI_CONFIG_CBT",
    "THIN_PROVISIONING",
    "LARGE_VDI",
]


def query():
    return {
        "plugin": "zfs-ng",
        "name": "zfs-ng volume plugin",
        "description": "Every VDI is a sparse zvol of a ZFS pool (stripe, mirror, raidz1/2/3); "
                       "snapshots, clones of live volumes, revert, pool-carried metadata",
        "vendor": "zfs-ng",
        "copyright": "(C) the zfs-ng authors, GPL-2.0-or-later",
        "version": VERSION,
        "required_api_version": smapi.API_VERSION,
        "features": list(FEATURES),
        "configuration": dict(sr_mod.CONFIGURATION),
        "required_cluster_stack": [],
    }


def ls():
    return sr_mod.attached()


def diagnostics():
    lines = []
    for pool in zfs.pools():
        props = sr_mod.read_root_props(pool) if names.is_pool(pool) else None
        if props is None:
            continue
        lines.append("SR %s (%s) on pool %s, generation %s" % (
            props.get("sr-uuid"), props.get("sr-name", ""), pool, props.get("generation")))
        lines.append(zfs.pool_status(pool).rstrip())
    return "\n".join(lines) + "\n" if lines else "no zfs-ng SR attached\n"
