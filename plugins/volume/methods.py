"""The SMAPIv3 method tables of org.xen.xapi.storage.zfs-ng: name, parameters and
the library function behind each.  The entry scripts hand these to smapi.main."""

from plugins.smapi import Method, Param
from plugins.volume import cbt_methods
from plugins.volume import plugin
from plugins.volume import remote
from plugins.volume import sr
from plugins.volume import volume

P = Param


def _on_node(methods):
    """Every method taking the SR string runs where the SR is: here, or on
    its storage node (remote.routed) when this host attached it from afar."""
    out = []
    for m in methods:
        if any(p.name == "sr" for p in m.params) and m.full_name != "SR.detach":
            m.fn = remote.routed(m.full_name, m.fn)
        out.append(m)
    return out

PLUGIN = [
    Method("Plugin", "Query", plugin.query, doc="Describe the plugin and its features."),
    Method("Plugin", "ls", plugin.ls, doc="The SRs attached on this host."),
    Method("Plugin", "diagnostics", plugin.diagnostics, doc="Pool status of every SR."),
]

SR = _on_node([
    Method("SR", "probe", remote.probe, [P("configuration", dict)],
           doc="Find zfs-ng SRs on the given devices (imported or importable)."),
    Method("SR", "create", remote.create, [
        P("uuid", str, "the SR uuid"), P("configuration", dict, "see Plugin.Query"),
        P("name", str), P("description", str)],
        doc="Create (or adopt with zpool=) a pool; returns the configuration for attach."),
    Method("SR", "attach", remote.attach, [P("configuration", dict)],
           doc="Import the pool when needed; returns the SR string (the pool name, or "
               "zfs-ng://NODE/POOL on a host that is not the SR's node)."),
    Method("SR", "detach", remote.detach, [P("sr", str)]),
    Method("SR", "destroy", sr.destroy, [P("sr", str)]),
    Method("SR", "stat", sr.stat, [P("sr", str)]),
    Method("SR", "set_name", sr.set_name, [P("sr", str), P("new_name", str)]),
    Method("SR", "set_description", sr.set_description,
           [P("sr", str), P("new_description", str)]),
    Method("SR", "ls", volume.ls, [P("sr", str)]),
])

_SK = [P("sr", str), P("key", str)]

VOLUME = _on_node([
    Method("Volume", "create", volume.create, [
        P("sr", str), P("name", str), P("description", str),
        P("size", int, "bytes, rounded up to the volume block size"), P("sharable", bool)]),
    Method("Volume", "snapshot", volume.snapshot, _SK),
    Method("Volume", "clone", volume.clone, _SK),
    Method("Volume", "destroy", volume.destroy, _SK),
    Method("Volume", "revert", volume.revert,
           [P("sr", str), P("snapshot", str), P("key", str)]),
    Method("Volume", "set_name", volume.set_name, _SK + [P("new_name", str)]),
    Method("Volume", "set_description", volume.set_description,
           _SK + [P("new_description", str)]),
    Method("Volume", "set", volume.set_key, _SK + [P("k", str), P("v", str)]),
    Method("Volume", "unset", volume.unset_key, _SK + [P("k", str)]),
    Method("Volume", "resize", volume.resize, _SK + [P("new_size", int)]),
    Method("Volume", "stat", volume.stat, _SK),
    Method("Volume", "compare", volume.compare, _SK + [P("key2", str)]),
    Method("Volume", "similar_content", volume.similar_content, _SK),
    Method("Volume", "enable_cbt", cbt_methods.enable_cbt, _SK,
           doc="Start changed-block tracking of a live volume (idempotent)."),
    Method("Volume", "disable_cbt", cbt_methods.disable_cbt, _SK),
    Method("Volume", "data_destroy", cbt_methods.data_destroy, _SK,
           doc="Drop a snapshot's data, keep it listed for list_changed_blocks."),
    Method("Volume", "list_changed_blocks", cbt_methods.list_changed_blocks,
           _SK + [P("key2", str), P("offset", int), P("length", int, "< 0: to the end")],
           doc="Base64 bitmap of the 64 KiB blocks changed from key to key2."),
])
