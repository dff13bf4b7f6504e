"""Export definitions from the command line and files (used by
`zfs-ng nbd serve` and nbd_server.run).

    --export NAME=PATH[:ro]          a volume, snapshot device or file
    --bitmap EXPORT BITMAP FILE      qemu:dirty-bitmap:BITMAP on EXPORT; FILE is the
                                     raw CBT bitmap (64 KiB per bit, MSB first),
                                     or base64 text when FILE ends in .b64
    --allocation EXPORT FILE         base:allocation of EXPORT from a JSON file:
                                       {"allocated": [[offset, length], ...]}
                                       (everything else is HOLE|ZERO), or
                                       {"extents": [[offset, length, flags], ...],
                                        "default": flags}
"""

import json
import os

from blockio import volpath
from blockio.backend import Backend
from nbd_server.exports import Export, check_name
from nbd_server.extents import DirtyBitmap, ExtentMap


def parse_export(spec):
    """"NAME=PATH[:ro|:rw]" -> (name, path, readonly); raises ValueError."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError("export must be NAME=PATH[:ro], got %r" % spec)
    readonly = False
    if rest.endswith(":ro") or rest.endswith(":rw"):
        readonly = rest.endswith(":ro")
        rest = rest[:-3]
    check_name(name)
    if not name.isprintable():
        raise ValueError("export name %r has non-printable characters" % name)
    return name, rest, readonly


def load_bitmap(path):
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".b64"):
        try:
            return DirtyBitmap.from_base64(raw.strip())
        except ValueError as e:
            raise ValueError("%s: not base64: %s" % (path, e))
    return DirtyBitmap(raw)


def load_allocation(path):
    with open(path) as f:
        try:
            doc = json.load(f)
        except ValueError as e:
            raise ValueError("%s: not JSON: %s" % (path, e))
    try:
        if "allocated" in doc:
            return ExtentMap.from_allocated((int(o), int(n)) for o, n in doc["allocated"])
        return ExtentMap(((int(o), int(n), int(fl)) for o, n, fl in doc["extents"]),
                         default=int(doc.get("default", 0)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError("%s: bad allocation map: %s" % (path, e))


def _loaded(what, loader, path):
    try:
        return loader(path)
    except OSError as e:
        raise ValueError("%s %s: %s" % (what, path, e.strerror or e))


def build_exports(specs, bitmaps=(), allocations=(), descriptions=(), file_dirs=None):
    """Export objects from parsed command-line values; raises ValueError with
    a clear message.  Only volumes are exported (blockio/volpath.py): block
    devices, and regular files under file_dirs (None: ZFSNG_TARGET_FILE_DIRS)."""
    dirs = volpath.normalize_dirs(volpath.file_dirs_from_env() if file_dirs is None
                                  else file_dirs)
    exports = {}
    order = []
    for spec in specs:
        name, path, ro = parse_export(spec)
        if name in exports:
            raise ValueError("export %r given twice" % name)
        if not os.path.exists(path):
            raise ValueError("export %r: %s does not exist" % (name, path))
        volpath.check_path(path, dirs)
        try:        # fail now, not at the first client; no fd is kept
            Backend(path, readonly=ro).close()
        except OSError as e:
            raise ValueError("export %r: %s" % (name, e.strerror or e))
        exports[name] = {"path": path, "readonly": ro, "bitmaps": {}, "allocation": None,
                         "description": ""}
        order.append(name)

    def known(name):
        if name not in exports:
            raise ValueError("no --export named %r" % name)
        return exports[name]

    for export, bname, path in bitmaps:
        check_name(bname)
        entry = known(export)
        entry["bitmaps"][bname] = _loaded("bitmap", load_bitmap, path)
    for export, path in allocations:
        entry = known(export)
        entry["allocation"] = _loaded("allocation map", load_allocation, path)
    for export, text in descriptions:
        known(export)["description"] = text
    out = []
    for name in order:
        e = exports[name]
        kw = {}
        if e["allocation"] is not None:
            kw["allocation"] = e["allocation"]
        out.append(Export(name, e["path"], readonly=e["readonly"], description=e["description"],
                          bitmaps=e["bitmaps"], **kw))
    return out
