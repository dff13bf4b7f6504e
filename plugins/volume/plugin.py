"""The Plugin interface of org.xen.xapi.storage.zfs-ng: query, ls, diagnostics."""

from plugins import smapi, zfs
from plugins.volume import names
from plugins.volume import sr as sr_mod

VERSION = "0.1.0"

# xapi-storage-script passes these through verbatim (main.ml, QueryImpl.query_impl)
# and adds SR_ATTACH/DETACH/CREATE/DELETE/SCAN/PROBE/UPDATE and VDI_CREATE/
# CLONE/SNAPSHOT/RESIZE/DELETE/UPDATE from the scripts present, VDI_ATTACH/
# DETACH/ACTIVATE/DEACTIVATE/INTRODUCE always, and VDI_RESET_ON_BOOT/2 with
# VDI_CLONE.  What only the plugin can say (xapi's capability table is
# ocaml/xapi/smint.ml; an unknown name is dropped there with a warning):
FEATURES = [
    "SR_PROBE",
    "SR_UPDATE",
    "VDI_CREATE",
    "VDI_DELETE",
    "VDI_SNAPSHOT",
    "VDI_CLONE",
    "VDI_RESIZE",
    "VDI_UPDATE",
    # storage_mux.ml activate3: a read-only plug (snapshots, vdi-export/copy,
    # xapi-nbd's dom0 VBD per NBD connection) calls Datapath.activate_readonly
    # only if the SR declares this; otherwise Datapath.activate, read-write
    "VDI_ACTIVATE_READONLY",
    "VDI_REVERT",           # Volume.revert (xapi_vdi.ml feature_of_op: vdi_revert)
    "VDI_CONFIG_CBT",       # enable/disable_cbt, data_destroy, list_changed_blocks
    "THIN_PROVISIONING",    # every zvol is sparse
    "LARGE_VDI",            # zvols up to the pool's size, no 2 TiB limit
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
