"""Validation of everything that arrives from outside before it reaches zfs/zpool:
volume keys, SR strings (pool names), device paths, vdev specs, user text; and
the dataset names of an SR: one builder each (sr_root, volume_dataset,
reverting_dataset, readonly_dataset, session_dataset, session_snapshot,
hidden_name) beside the one parser (classify).

Layout of an SR on ZFS (one SR per pool):

    POOL/zfs-ng                  the SR root (filesystem, canmount=off): SR name,
                                 description, uuid, generation counter
    POOL/zfs-ng/<key>            a volume (sparse zvol); <key> is a uuid4
    POOL/zfs-ng/<ds>@<key>       a snapshot volume
    POOL/zfs-ng/h-<hex>          hidden: a destroyed volume kept for its snapshots,
                                 or the base of a snapshot-of-a-snapshot
    POOL/zfs-ng/<ds>@h-<hex>     hidden: origin of a clone of a live volume,
                                 or a destroyed snapshot that still has clones
    POOL/zfs-ng/r-<key>          a revert in progress (finished or undone on attach)
    POOL/zfs-ng/ro-<key>         a read-only device for a snapshot (locate/activate)
    POOL/zfs-ng/np-<key>, <key>@np-<hex>   a datapath's non-persistent session
                                 (plugins/datapath/zvol.py); only a crash's are
                                 reset (sr.reset_stale_devices)
    POOL/zfs-ng/<key>@zfsng-cbt-*  plugins/volume/cbt.py's anchors; never touched
"""

import binascii
import os
import re

from plugins import uri
from plugins.smapi import InvalidParameters

SR_DATASET = "zfs-ng"
HIDDEN = "h-"
REVERTING = "r-"
READONLY = "ro-"
SESSION = "np-"  # non-persistent sessions of plugins/datapath/zvol.py
CBT = "zfsng-cbt-"  # plugins/volume/cbt.py's anchors: not ours either

_KEY = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
# zpool names: start with a letter, then [A-Za-z0-9_.:-]; we also refuse the
# reserved prefixes zpool refuses (mirror, raidz, draid, spare, log).
_POOL = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]{0,200}\Z")
_RESERVED_POOL = re.compile(r"^(mirror|raidz|draid|spare|log|c[0-9])", re.I)
_DEVICE = re.compile(r"^/[A-Za-z0-9_.:/+@=-]+\Z")
_HEX = re.compile(r"^[0-9a-f]{32}\Z")

MAX_TEXT = 2048  # characters of a name/description/key/value (ZFS allows 8 KiB per value)


def uuid4_hex():
    """uuid.uuid4().hex, without the uuid module: it imports platform (with
    it 0.1 s of a plugin call in the TCG test VM, for 16 random bytes)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40     # version 4
    b[8] = (b[8] & 0x3F) | 0x80     # RFC 4122 variant
    return binascii.hexlify(bytes(b)).decode("ascii")


def new_key():
    """A new volume key: a random uuid4, lower case, as str(uuid.uuid4())."""
    h = uuid4_hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def hidden_name():
    return HIDDEN + uuid4_hex()


def is_key(s):
    return isinstance(s, str) and bool(_KEY.match(s))


def all_keys(strings):
    """Is every one of these strings a volume key?  (is_key over many, in C)"""
    return all(map(_KEY.match, strings))


def check_key(key, what="key"):
    if not is_key(key):
        raise InvalidParameters("%s %r is not a zfs-ng volume key (a lower-case uuid4)"
                                % (what, key))
    return key


def check_pool(name):
    if not isinstance(name, str) or not _POOL.match(name) or _RESERVED_POOL.match(name):
        raise InvalidParameters("%r is not a valid pool name" % (name,))
    return name


def is_pool(name):
    try:
        check_pool(name)
        return True
    except InvalidParameters:
        return False


def check_uuid(s):
    """uuid s in canonical form: s itself when it already is (every call
    names its SR's index by the uuid: the uuid module costs 0.1 s of a call in
    TCG), else what uuid.UUID makes of it (SR.create's uuid from xapi)."""
    if uri.is_uuid(s):
        return s
    import uuid
    try:
        return str(uuid.UUID(s))
    except (ValueError, TypeError, AttributeError):
        raise InvalidParameters("%r is not a uuid" % (s,))


def check_device(path):
    if not isinstance(path, str) or not _DEVICE.match(path) or "/../" in path + "/":
        raise InvalidParameters("%r is not an absolute device path" % (path,))
    return path


def check_text(s, what):
    if not isinstance(s, str):
        raise InvalidParameters("%s must be a string" % what)
    if len(s) > MAX_TEXT:
        raise InvalidParameters("%s is longer than %d characters" % (what, MAX_TEXT))
    if "\x00" in s:
        raise InvalidParameters("%s contains a NUL character" % what)
    return s


def sr_root(pool):
    return "%s/%s" % (pool, SR_DATASET)


# one dataset name component as we make them (KEY, h-..., r-KEY, ...; what
# the pool's journal and the carried deltas name, checked before use)
_COMPONENT = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}\Z")


def is_component(text):
    return isinstance(text, str) and _COMPONENT.match(text) is not None


def dataset_of(zname):
    """The dataset of ZFS name zname: DS of DS, DS@SNAP and DS#BOOKMARK."""
    return zname.split("@", 1)[0].split("#", 1)[0]


def component(root, name):
    """The last part of dataset `name` if it is directly under `root`, else None."""
    if not isinstance(name, str) or not name.startswith(root + "/"):
        return None
    rest = name[len(root) + 1:]
    return rest if _COMPONENT.match(rest) else None


def volume_dataset(pool, key):
    return "%s/%s/%s" % (pool, SR_DATASET, key)


def reverting_dataset(pool, key):
    """Where Volume.revert builds KEY's new data (r-KEY; classify: 'reverting')."""
    return "%s/%s%s" % (sr_root(pool), REVERTING, key)


def readonly_dataset(pool, key):
    """The read-only device clone of snapshot KEY (ro-KEY; classify: 'readonly')."""
    return "%s/%s%s" % (sr_root(pool), READONLY, key)


def session_dataset(pool, key):
    """The clone of volume KEY's non-persistent session (np-KEY; classify: 'session')."""
    return "%s/%s%s" % (sr_root(pool), SESSION, key)


def session_snapshot(dataset, tag):
    """The snapshot DATASET@np-TAG a session's clone is made from (classify:
    ('session', None))."""
    return "%s@%s%s" % (dataset, SESSION, tag)


def is_session_snapshot(zname):
    return "@" + SESSION in zname


def classify(zname, pool):
    """What a ZFS name under the SR root is: ('volume', key), ('snapshot', key),
    ('hidden', None), ('reverting', key), ('readonly', key), ('session', key)
    for a non-persistent session's clone np-KEY, ('session', None) for its
    snapshot, or (None, None)."""
    prefix = sr_root(pool) + "/"
    if not zname.startswith(prefix):
        return None, None
    rest = zname[len(prefix):]
    if "/" in rest:
        return None, None
    if "@" in rest:
        ds, snap = rest.split("@", 1)
        if is_key(snap):
            return "snapshot", snap
        if snap.startswith(SESSION):
            return "session", None
        if snap.startswith(CBT):
            return "cbt", None
        return "hidden", None
    if is_key(rest):
        return "volume", rest
    if rest.startswith(HIDDEN):
        return "hidden", None
    if rest.startswith(REVERTING) and is_key(rest[len(REVERTING):]):
        return "reverting", rest[len(REVERTING):]
    if rest.startswith(READONLY) and is_key(rest[len(READONLY):]):
        return "readonly", rest[len(READONLY):]
    if rest.startswith(SESSION) and is_key(rest[len(SESSION):]):
        return "session", rest[len(SESSION):]
    return None, None


_SEPARATOR = {"snapshot": "@", "bookmark": "#"}


def all_named(pool, keys, znames, kinds):
    """Is each zname what classify() calls that kind with that key: a volume
    ROOT/KEY, a snapshot ROOT/DS@KEY, a bookmark ROOT/DS#KEY (bookmarks.py),
    DS one name component?  Keys are checked as keys already (all_keys);
    many at once (a carried index: metadata._sound_rows), so no classify()
    per name."""
    prefix = sr_root(pool) + "/"
    n = len(prefix)
    for key, zname, kind in zip(keys, znames, kinds):
        if kind == "volume":
            if zname != prefix + key:
                return False
            continue
        ds = zname[n:-len(key) - 1]
        if not (zname.startswith(prefix) and zname.endswith(_SEPARATOR[kind] + key) and ds
                and "/" not in ds and "@" not in ds and "#" not in ds):
            return False
    return True


# -- vdev specs -----------------------------------------------------------------

VDEV_TYPES = {"mirror": 2, "raidz1": 2, "raidz": 2, "raidz2": 3, "raidz3": 4}


def parse_vdev_spec(spec, devices):
    """The zpool vdev argv for spec and the device list.

    spec is "" or "stripe" (all devices striped), "mirror", "raidz1/2/3" (one
    group of all devices), or an explicit layout using the device list order:
    "mirror:2" / "raidz2:4" = groups of that many devices (stripes of mirrors),
    or the zpool form with device indexes, "mirror 0 1 mirror 2 3".
    Every device must be used exactly once."""
    devices = [check_device(d) for d in devices]
    if not devices:
        raise InvalidParameters("no devices given")
    if len(set(devices)) != len(devices):
        raise InvalidParameters("a device is listed twice")
    spec = (spec or "").strip()
    if spec in ("", "stripe"):
        return list(devices)
    words = spec.replace(",", " ").split()
    if len(words) == 1 and ":" in words[0]:
        kind, _, n = words[0].partition(":")
        if kind not in VDEV_TYPES or not n.isdigit() or int(n) < VDEV_TYPES[kind]:
            raise InvalidParameters("bad vdev spec %r" % spec)
        n = int(n)
        if len(devices) % n:
            raise InvalidParameters("vdev spec %r needs a multiple of %d devices, got %d"
                                    % (spec, n, len(devices)))
        out = []
        for i in range(0, len(devices), n):
            out += [kind] + devices[i:i + n]
        return out
    if len(words) == 1:
        kind = words[0]
        if kind not in VDEV_TYPES:
            raise InvalidParameters("unknown vdev type %r (stripe, mirror, raidz1, raidz2, "
                                    "raidz3, or e.g. mirror:2 for stripes of mirrors)" % kind)
        if len(devices) < VDEV_TYPES[kind]:
            raise InvalidParameters("%s needs at least %d devices, got %d"
                                    % (kind, VDEV_TYPES[kind], len(devices)))
        return [kind] + devices
    # explicit: "mirror 0 1 mirror 2 3"
    out, used, group = [], [], None
    for w in words:
        if w in VDEV_TYPES:
            if group is not None and group[1] < VDEV_TYPES[group[0]]:
                raise InvalidParameters("%s group too small in %r" % (group[0], spec))
            group = [w, 0]
            out.append(w)
        elif w.isdigit() and int(w) < len(devices):
            if group is None:
                raise InvalidParameters("vdev spec %r must start with a vdev type" % spec)
            used.append(int(w))
            group[1] += 1
            out.append(devices[int(w)])
        else:
            raise InvalidParameters("bad word %r in vdev spec %r" % (w, spec))
    if group is not None and group[1] < VDEV_TYPES[group[0]]:
        raise InvalidParameters("%s group too small in %r" % (group[0], spec))
    if sorted(used) != list(range(len(devices))):
        raise InvalidParameters("vdev spec %r must use every device exactly once" % spec)
    return out


COMPRESSION = re.compile(r"^(lz4|zstd|zstd-([1-9]|1[0-9])|zstd-fast|zstd-fast-[0-9]+|off)\Z")


def check_compression(v):
    if not COMPRESSION.match(v):
        raise InvalidParameters("compression %r not supported (lz4, zstd, zstd-N, off)" % v)
    return v


def check_ashift(v):
    if not v.isdigit() or not 9 <= int(v) <= 16:
        raise InvalidParameters("ashift %r must be 9..16" % v)
    return v


def check_bool_text(v, what):
    if v.lower() in ("on", "true", "1", "yes"):
        return "on"
    if v.lower() in ("off", "false", "0", "no"):
        return "off"
    raise InvalidParameters("%s %r must be on or off" % (what, v))


_NODE = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})\Z")


def check_endpoint(v, what="nvme-node"):
    """A network endpoint host:port ([ipv6]:port) from a configuration."""
    m = _NODE.match(v) if isinstance(v, str) else None
    if not m or not 0 < int(m.group(2)) < 65536:
        raise InvalidParameters("%s %r must be host:port" % (what, v))
    return v


def check_nvme_node(v):
    return check_endpoint(v, "nvme-node")


def check_auth(v):
    """nvme-auth: required or off."""
    if v not in ("required", "off"):
        raise InvalidParameters("nvme-auth %r must be required or off" % (v,))
    return v


def check_datapath(v):
    if v not in ("raw", "nbd", "nvme"):
        raise InvalidParameters("datapath %r must be raw, nbd or nvme" % v)
    return v
