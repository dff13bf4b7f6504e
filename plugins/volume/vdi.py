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
    same text, made by filling in a template instead (SR.ls renders every row
    of a new host's index: natively at 100k rows 3.5 s of Python -> 0.5 s).

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
    parts, at = [], 0
    for pos, _, marker in found:
        parts.append(text[at:pos])
        at = pos + len(marker)
    text = "%s".join(parts + [text[at:]])
    order = [f for _, f, _ in found]
    quote = json.encoder.encode_basestring_ascii
    bools = ("false", "true")
    get = {"key": lambda e: '"%s"' % e["key"], "uuid": lambda e: '"%s"' % e["key"],
           "uri-key": lambda e: e["key"],
           "name": lambda e: quote(e["name"]), "description": lambda e: quote(e["description"]),
           "read_write": lambda e: bools[e["kind"] == "volume"],
           "sharable": lambda e: bools[bool(e["sharable"])],
           "cbt_enabled": lambda e: bools[bool(e.get("cbt_enabled"))],
           "keys": lambda e: json.dumps(e["keys"], sort_keys=True) if e["keys"] else "{}",
           "virtual_size": lambda e: "%d" % e["virtual_size"],
           "physical_utilisation": lambda e: "%d" % e["physical_utilisation"]}
    getters = [get[f] for f in order]

    def fast(e):
        if not names.is_key(e["key"]) or type(e["virtual_size"]) is not int or \
                type(e["physical_utilisation"]) is not int or type(e["sharable"]) is not bool \
                or type(e["name"]) is not str or type(e["description"]) is not str:
            return slow(e)       # what the template does not write as record() would
        return text % tuple([g(e) for g in getters])

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
