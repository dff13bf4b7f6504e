"""zfs and zpool, called with argv lists (never a shell) and parsed from
`-H -p` output.

This is the only module that runs zfs/zpool: both plugins (the volume
plugin's library, cbt.py's send-stream scans, the datapaths' non-persistent
sessions) and the CLI's backups go through run(), send() and the helpers
here.  Failures become ZfsError subclasses chosen from the command's message,
so callers can tell "does not exist" from "busy" from "has dependent clones"
without parsing text themselves; modules with an error type of their own
(cbt.CbtError, the backup's BackupError) translate at their edge.  pyzfs is
not used: it cannot list or get/set properties, and one code path is easier
to get right; the fork cost is paid once per call.  The exception is the
few calls on a device's activation path (exists, one dataset's user
properties or one native property read, one property set or inherited, a
clone: a snapshot's device, and Volume.clone and revert alike): they go
through libzfs in-process (plugins/libzfs.py, whose only user is this
module) where it loads, the command otherwise, with the same typed errors
either way (_in_process).
"""

import json
import os
import subprocess
import time

from blockio import zvol as zvol_dev
from plugins.smapi import BackendError

PREFIX = "org.zfs-ng:"


class ZfsError(BackendError):
    def __init__(self, message, argv=None):
        BackendError.__init__(self, "ZFS_error", message)
        self.argv = argv


class NotFound(ZfsError):
    pass


class Exists(ZfsError):
    pass


class Busy(ZfsError):
    pass


class HasChildren(ZfsError):
    """A volume with snapshots (zfs calls them children)."""


class HasClones(ZfsError):
    pass


_PATTERNS = [
    ("has dependent clones", HasClones),
    ("has children", HasChildren),
    ("does not exist", NotFound),
    ("no such pool", NotFound),
    ("no such", NotFound),
    ("already exists", Exists),
    ("is busy", Busy),
    ("pool is busy", Busy),
    ("dataset is busy", Busy),
]


def _binary(name):
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return name


ZFS = _binary("zfs")
ZPOOL = _binary("zpool")


def _run(argv):
    """(returncode, stdout, stderr) of argv."""
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True)
    except OSError as e:
        raise ZfsError("cannot run %s: %s" % (argv[0], e), argv)
    out, err = p.communicate()
    return p.returncode, out, err


def _error(argv, rc, err):
    """The typed error of a failed argv, with zfs's own message."""
    msg = " ".join(err.split()) or "%s exited with %d" % (argv[0], rc)
    low = msg.lower()
    for needle, c in _PATTERNS:
        if needle in low:
            return c(msg, argv)
    return ZfsError(msg, argv)


def run(argv, check=True):
    """stdout of argv; ZfsError (or a subclass) with zfs's own message on failure."""
    rc, out, err = _run(argv)
    if rc != 0 and check:
        raise _error(argv, rc, err)
    return out


def zfs(*args):
    return run([ZFS] + list(args))


def send(args, stderr):
    """A running `zfs send ARGS`: the stream is its stdout (unbuffered), its
    messages go to the file `stderr`; the caller reads, waits and kills it."""
    argv = [ZFS, "send"] + list(args)
    try:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, bufsize=0)
    except OSError as e:
        raise ZfsError("cannot run %s: %s" % (argv[0], e), argv)


def destroy_retrying(name, tries=40):
    """zfs destroy NAME, retried while it is busy (udev opens a new zvol's or
    snapshot's device node for a moment); Busy once `tries` are spent."""
    delay = 0.05
    for i in range(tries):
        try:
            zfs("destroy", name)
            return
        except Busy:
            if i == tries - 1:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def device_path(dataset):
    """The block device node of a zvol (it exists only with volmode=dev)."""
    return "/dev/zvol/" + dataset


def wait_for_device(path, timeout, link=True):
    """Wait for a zvol's device node (udev makes the /dev/zvol link a moment
    after ZFS adds the zvol's minor); Device_timeout.  Polled, a few ms apart
    at first: `udevadm settle` is a process of its own (a tenth of a second
    in a slow guest) and waits for every queued event, not only this one, so
    it is run only once the node is late.  link=False: the zvol's minor made
    since the wait began, found by its name (blockio/zvol.py), is enough too,
    for a caller that hands the path only to openers that find the minor the
    same way when the link is not there yet (the target, the NBD server)."""
    start = time.time()
    delay = 0.002
    dataset = None if link else zvol_dev.dataset_of(path)
    while not os.path.exists(path):
        if dataset is not None and zvol_dev.find(dataset, since=start - 0.05) is not None:
            return
        waited = time.time() - start
        if waited > timeout:
            raise BackendError("Device_timeout", "%s did not appear within %d s"
                               % (path, timeout))
        if waited > 2.0:
            subprocess.call(["udevadm", "settle", "--timeout=5"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
        time.sleep(delay)
        delay = min(delay * 1.5, 0.05)


def zpool(*args):
    return run([ZPOOL] + list(args))


def rows(text):
    return [line.split("\t") for line in text.splitlines() if line]


# -- user property values: JSON text, so tabs/newlines/unicode never break -H --

def encode(value):
    return json.dumps(value, ensure_ascii=True, sort_keys=True)


def decode(text):
    try:
        return json.loads(text)
    except ValueError:
        return text  # set by hand, not by us


def uprop(name):
    return PREFIX + name


def prop_args(props):
    """-o k=v arguments for zfs create/snapshot/clone."""
    out = []
    for k in sorted(props):
        out += ["-o", "%s=%s" % (k, props[k])]
    return out


# -- reading --------------------------------------------------------------------

def get(targets, props, recursive=False, types=None, local_only_prefix=True, missing_ok=False):
    """{name: {prop: value}} from one `zfs get -H -p`.  User properties are kept
    only where set locally (they are always inherited).  missing_ok: targets
    that do not exist are left out, not an error (a failure that answered
    nothing at all, as without the pool, still raises)."""
    argv = [ZFS, "get", "-H", "-p", "-o", "name,property,value,source"]
    if recursive:
        argv.append("-r")
    if types:
        argv += ["-t", types]
    argv += [",".join(props)] + list(targets)
    out = {}
    for r in rows(_listing(argv, missing_ok)):
        if len(r) != 4:
            continue
        name, prop, value, source = r
        d = out.setdefault(name, {})
        if prop.startswith(PREFIX) and local_only_prefix and source != "local":
            continue
        if value == "-" and source == "-":
            continue
        d[prop] = value
    return out


_COMMAND = object()


def _in_process(argv, call, *args):
    """libzfs.<call>(*args); _COMMAND where libzfs can't be used (the caller
    runs the command), and its failure typed as that of argv would be.
    libzfs (and ctypes with it) is imported on the first such call: most
    plugin calls never make one."""
    from plugins import libzfs
    try:
        return getattr(libzfs, call)(*args)
    except libzfs.Unusable:
        return _COMMAND
    except libzfs.LibZfsError as e:
        raise _error(argv, 1, e.message)


def local_user_props(name, props):
    """{prop: value} of those user properties (PREFIX...) set on dataset name
    itself (not inherited): what get([name], props)[name] holds."""
    assert all(p.startswith(PREFIX) for p in props)
    got = _in_process([ZFS, "get", ",".join(props), name], "user_props", name)
    if got is _COMMAND:
        return get([name], props).get(name, {})
    return dict((k, v) for k, (v, source) in got.items() if k in props and source == name)


def native_prop(name, prop):
    """(value, set locally?) of native property prop of dataset name."""
    argv = [ZFS, "get", "-H", "-p", "-o", "value,source", prop, name]
    got = _in_process(argv, "native_prop", name, prop)
    if got is _COMMAND:
        value, _, source = run(argv).rstrip("\n").partition("\t")
        got = value, source == "local"
    return got


def sizes(name):
    """(volsize, referenced) in bytes of a volume or snapshot (Volume.stat's
    fresh figures: a zfs process is 0.3 s of the call in the TCG VM)."""
    argv = [ZFS, "get", "-H", "-p", "-o", "value", "volsize,referenced", name]
    got = _in_process(argv, "sizes", name)
    if got is _COMMAND:
        got = run(argv).split()
    return int(got[0]), int(got[1])


def set_prop(name, prop, value):
    """zfs set prop=value name."""
    argv = [ZFS, "set", "%s=%s" % (prop, value), name]
    if _in_process(argv, "set_prop", name, prop, value) is _COMMAND:
        run(argv)


def set_props(name, props):
    """zfs set p1=v1 p2=v2 ... name: all of {prop: value} at once (one
    sync task in ZFS: none is set without the others)."""
    argv = [ZFS, "set"] + ["%s=%s" % (k, props[k]) for k in sorted(props)] + [name]
    if _in_process(argv, "set_props", name, props) is _COMMAND:
        run(argv)


def clone(snapshot, target, props):
    """zfs clone -o k=v ... snapshot target."""
    argv = [ZFS, "clone"] + prop_args(props) + [snapshot, target]
    if _in_process(argv, "clone", snapshot, target, props) is _COMMAND:
        run(argv)


def inherit_prop(name, prop):
    """zfs inherit prop name."""
    argv = [ZFS, "inherit", prop, name]
    if _in_process(argv, "inherit_prop", name, prop) is _COMMAND:
        run(argv)


def get_existing(targets, props):
    """get() of native props of those targets that exist ({} for none)."""
    return get(targets, props, missing_ok=True) if targets else {}


def _listing(argv, missing_ok):
    """The output of a `zfs get`/`zfs list` of named datasets; with
    missing_ok its complaints about names that do not exist are not an error
    (any other complaint is)."""
    if not missing_ok:
        return run(argv)
    rc, out, err = _run(argv)
    if rc != 0 and any(line and "dataset does not exist" not in line
                       for line in err.splitlines()):
        raise _error(argv, rc, err)
    return out


def list_names(roots, props=("name", "origin"), types="volume,snapshot", depth=None,
               missing_ok=False):
    """Rows of the simple-mode listing (name, guid, createtxg, origin are
    cheap) under roots (a name, or a list of them: missing_ok as get's)."""
    argv = [ZFS, "list", "-H", "-p", "-o", ",".join(props), "-t", types]
    argv += ["-d", str(depth)] if depth is not None else ["-r"]
    return rows(_listing(argv + ([roots] if isinstance(roots, str) else list(roots)),
                         missing_ok))


def exists(name):
    """Whether dataset, snapshot (DS@S) or bookmark (DS#B) `name` exists."""
    # `zfs list DS#B` refuses the bookmark delimiter unless the type is given
    kind = "bookmark" if "#" in name else "snapshot" if "@" in name else "filesystem,volume"
    if kind != "bookmark":
        got = _in_process([ZFS, "list", name], "exists", name)
        if got is not _COMMAND:
            return got
    try:
        run([ZFS, "list", "-H", "-o", "name", "-t", kind, name])
        return True
    except NotFound:
        return False


def pools():
    return [r[0] for r in rows(zpool("list", "-H", "-o", "name"))]


def pool_health(pool):
    return zpool("list", "-H", "-o", "health", pool).strip()


def pool_status(pool):
    return zpool("status", "-P", pool)


def pool_devices(pool):
    """Absolute paths of the leaf vdevs of an imported pool (from `status -P`)."""
    out = []
    for line in pool_status(pool).splitlines():
        words = line.split()
        if words and words[0].startswith("/"):
            out.append(words[0])
    return out


def importable(search):
    """[{pool, id, state}] that `zpool import -d ...` can see on the given paths."""
    argv = [ZPOOL, "import"]
    for s in search:
        argv += ["-d", s]
    try:
        text = run(argv)
    except ZfsError as e:
        if "no pools available" in str(e).lower():
            return []
        raise
    found, cur = [], None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("pool:"):
            cur = {"pool": line.split(":", 1)[1].strip()}
            found.append(cur)
        elif cur is not None and line.startswith("id:"):
            cur["id"] = line.split(":", 1)[1].strip()
        elif cur is not None and line.startswith("state:"):
            cur["state"] = line.split(":", 1)[1].strip()
    return found
