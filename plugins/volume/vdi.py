"""The SMAPIv3 volume record of an index entry (what SR.ls, Volume.stat and
the Volume methods answer): record() is its one definition, uris() its URI
list (the contract with the datapath plugins, plugins/uri.py), and
record_text() renders it as JSON text fast enough for SR.ls at 100k volumes.
renderer() pairs that render with the key that names everything else a
stored text depends on (metadata.Index keeps texts per row: Index.rendered,
replace_all)."""

import json

from plugins import uri
from plugins.volume import names


def uris(handle, key):
    """The URI list of a volume (contract with the datapath plugins: plugins/uri.py)."""
    out = {"raw": [uri.local_uri(uri.RAW, handle.pool, key)],
           "nbd": [uri.local_uri(uri.NBD, handle.pool, key)], "nvme": [], "nbdtls": []}
    node = handle.props.get("nvme-node")
    if node:
        out["nvme"] = [uri.remote_uri(uri.NVME_TCP, node, handle.uuid, key)]
    nbd_node = handle.props.get("nbd-node")
    if nbd_node:
        out["nbdtls"] = [uri.remote_uri(uri.NBD_TLS, nbd_node, handle.uuid, key)]
    first = handle.props.get("datapath", "raw")
    if first not in out:
        first = "raw"
    order = [first] + [k for k in ("raw", "nbd", "nvme", "nbdtls") if k != first]
    return [u for k in order for u in out[k]]


def record(handle, e):
    return {
        "key": e["key"],
        "uuid": e["key"],
        "name": e["name"],
        "description": e["description"],
        "read_write": e["kind"] == "volume",
        "sharable": e["sharable"],
        "virtual_size": e["virtual_size"],
        "physical_utilisation": e["physical_utilisation"],
        "uri": uris(handle, e["key"]),
        "keys": e["keys"],
        "cbt_enabled": bool(e.get("cbt_enabled")),  # plugins/volume/cbt_methods.py
    }


def record_text(handle):
    """render(entry) -> json.dumps(record(handle, entry), sort_keys=True), the
    same text, made by filling in a template instead (a new host's SR.attach
    and every rebuild render every row: natively at 100k rows 3.5 s of Python
    -> 0.5 s).

    The template is record()'s own output for a probe whose fields are
    markers, so record() stays the one definition of the format.  It is
    checked against record() on two probes that differ in every field; where
    they disagree (a field record() computes some other way) render falls
    back to record() itself.  Strings are escaped as json.dumps does
    (encode_basestring_ascii), the key is checked as uri.py checks it."""
    slow = _render_slow(handle)
    fields = ("cbt_enabled", "description", "key", "keys", "name", "physical_utilisation",
              "read_write", "sharable", "uuid", "virtual_size")
    probe = dict(RENDER_PROBE)
    rec = record(handle, probe)
    if sorted(rec) != sorted(fields + ("uri",)):
        return slow
    for f in fields:
        rec[f] = "@@zfsng-%s@@" % f
    text = json.dumps(rec, sort_keys=True).replace("%", "%%")
    found = []                      # (position, field) of each place to fill
    for f in fields:
        marker = '"@@zfsng-%s@@"' % f
        if text.count(marker) != 1:
            return slow
        found.append((text.index(marker), f, marker))
    at = text.find(probe["key"])    # what is left of the probe's key: in its URIs
    while at >= 0:
        found.append((at, "uri-key", probe["key"]))
        at = text.find(probe["key"], at + 1)
    found.sort()
    # each place becomes a named conversion of one mapping made per row
    # (C fills the template; no call per field)
    spec = {"key": '"%(key)s"', "uuid": '"%(key)s"', "uri-key": "%(key)s",
            "name": "%(name)s", "description": "%(description)s",
            "read_write": "%(read_write)s", "sharable": "%(sharable)s",
            "cbt_enabled": "%(cbt_enabled)s", "keys": "%(keys)s",
            "virtual_size": "%(virtual_size)d",
            "physical_utilisation": "%(physical_utilisation)d"}
    parts, at = [], 0
    for pos, f, marker in found:
        parts.append(text[at:pos] + spec[f])
        at = pos + len(marker)
    text = "".join(parts) + text[at:]
    quote = json.encoder.encode_basestring_ascii
    dumps = json.dumps
    is_key = names.is_key

    def fast(e):
        key, size, used, sharable = e["key"], e["virtual_size"], e["physical_utilisation"], \
            e["sharable"]
        name, description, keys = e["name"], e["description"], e["keys"]
        if not is_key(key) or type(size) is not int or type(used) is not int or \
                type(sharable) is not bool or type(name) is not str or \
                type(description) is not str:
            return slow(e)       # what the template does not write as record() would
        return text % {"key": key, "name": quote(name), "description": quote(description),
                       "read_write": "true" if e["kind"] == "volume" else "false",
                       "sharable": "true" if sharable else "false",
                       "cbt_enabled": "true" if e.get("cbt_enabled") else "false",
                       "keys": dumps(keys, sort_keys=True) if keys else "{}",
                       "virtual_size": size, "physical_utilisation": used}

    other = dict(probe, key="ffffffff-ffff-4fff-bfff-ffffffffffff", kind="snapshot",
                 name='n\u00e9 "q" \\ %s\n', description="d%d", sharable=True,
                 virtual_size=7, physical_utilisation=3, keys={"b": "1", "a": ["%"]},
                 cbt_enabled=True)
    if any(fast(p) != slow(p) for p in (probe, other)):
        return slow
    return fast


def _render_slow(handle):
    def render(e):
        return json.dumps(record(handle, e), sort_keys=True)
    return render


# An entry rendered to name what else a stored record depends on (Index.rendered):
# the SR's settings that shape its URIs, and record()'s own format.
RENDER_PROBE = {"key": "00000000-0000-4000-8000-000000000000", "kind": "volume", "name": "",
                "description": "", "sharable": False, "virtual_size": 0,
                "physical_utilisation": 0, "keys": {}, "cbt_enabled": False}


def renderer(handle):
    """(render key, render) for handle's SR: what Index.listing and
    Index.replace_all take."""
    render = record_text(handle)
    return render(RENDER_PROBE), render
