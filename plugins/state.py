"""Attachment state of one volume on this host, under a per-volume lock.

xapi-storage-script runs calls concurrently and repeats them after failures,
so every Datapath call is: take the volume's lock, read its state, do the
idempotent work, write the state back atomically, release.  The state lives
on tmpfs (/run/zfs-ng/datapath): attachments do not survive a reboot, and
neither do the devices, processes and connections they describe.

File layout, one pair per volume (the id is a hash: keys may be long):
    <dir>/<id>.lock   flock(2) target, never removed (removing is racy)
    <dir>/<id>.json   {"uri": ..., "volume": "<sr>/<key>", "attached": {domain: {...}},
                       "active": {domain: "rw"|"ro"}, "open": {...}, "shared": {...}}
"""

import contextlib
import errno
import fcntl
import json
import os

DEFAULT_RUN_DIR = "/run/zfs-ng"


def run_dir():
    """ZFSNG_RUN_DIR overrides /run/zfs-ng (host tests, a second 'host' in tests)."""
    return os.environ.get("ZFSNG_RUN_DIR", DEFAULT_RUN_DIR)


def state_dir():
    return os.path.join(run_dir(), "datapath")


def node_state_dir():
    """The storage node's own records (who is granted/active on its volumes).
    Separate from the attaching host's, even when both are one machine."""
    return os.path.join(os.environ.get("ZFSNG_NODE_RUN_DIR", DEFAULT_RUN_DIR), "node")


def _ident(volume_id):
    # imported here: hashlib loads OpenSSL, 0.1 s of every plugin call's
    # start-up in the test VM, and most calls never name a state file
    import hashlib
    return hashlib.sha256(volume_id.encode("utf-8")).hexdigest()[:32]


def _makedirs(path):
    try:
        os.makedirs(path, 0o700)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise


class VolumeState(object):
    """The state dict of one volume; valid only inside `locked()`."""

    def __init__(self, path, volume_id, data):
        self.path = path
        self.volume_id = volume_id
        self.data = data

    @property
    def attached(self):
        return self.data.setdefault("attached", {})

    @property
    def active(self):
        return self.data.setdefault("active", {})

    @property
    def shared(self):
        """Resources shared by all attachments (a snapshot's clone, an NBD server)."""
        return self.data.setdefault("shared", {})

    def is_empty(self):
        return not (self.data.get("attached") or self.data.get("active")
                    or self.data.get("open") or self.data.get("shared"))

    def save(self):
        """Atomically replace the state file (or remove it when nothing is left)."""
        if self.is_empty():
            try:
                os.unlink(self.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
            return
        tmp = "%s.%d.tmp" % (self.path, os.getpid())
        with open(tmp, "w") as f:
            json.dump(self.data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self.path)


def _load(path, volume_id):
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, IOError) as e:
        if e.errno != errno.ENOENT:
            raise
        data = {}
    except ValueError:
        # A torn file cannot happen (rename is atomic); a hand-edited one can.
        raise RuntimeError("corrupt datapath state %s" % path)
    data["volume"] = volume_id
    return data


@contextlib.contextmanager
def locked(volume_id, directory=None):
    """Exclusive access to one volume's state for the length of the block.
    The state is saved when the block ends, with or without an exception:
    whatever was recorded before a failure describes what really exists."""
    d = directory or state_dir()
    _makedirs(d)
    ident = _ident(volume_id)
    fd = os.open(os.path.join(d, ident + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        path = os.path.join(d, ident + ".json")
        st = VolumeState(path, volume_id, _load(path, volume_id))
        try:
            yield st
        finally:
            st.save()
    finally:
        os.close(fd)  # releases the flock


def list_states(directory=None):
    """Every volume with attachment state on this host (for the CLI): a list
    of state dicts, read without locks (a snapshot in time)."""
    d = directory or state_dir()
    out = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, name)) as f:
                out.append(json.load(f))
        except (OSError, IOError, ValueError):
            continue
    return out
