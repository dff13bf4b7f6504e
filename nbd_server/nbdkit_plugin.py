"""nbdkit python plugin (API v2, nbdkit >= 1.22 with Python 3) serving one
volume through the same blockio.Backend and base:allocation providers as
nbd_server, for hosts that prefer nbdkit as the NBD front end:

    nbdkit python /path/to/nbd_server/nbdkit_plugin.py path=/dev/zvol/tank/vol1 \\
        [readonly=true] [allocation=/run/zfs-ng/vol1.alloc.json]

nbdkit serves only base:allocation: qemu:dirty-bitmap:NAME needs nbd_server.
XCP-ng 8.3's nbdkit 1.8 has only the Python 2 plugin (API v1): not supported.
"""

import errno
import os
import sys

import nbdkit

# nbdkit runs this file by path: make the project importable.
try:
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
except NameError:       # no __file__: rely on PYTHONPATH
    pass

from blockio.backend import Backend  # noqa: E402
from nbd_server import constants as C  # noqa: E402
from nbd_server.extents import default_allocation  # noqa: E402

API_VERSION = 2

_cfg = {"path": None, "readonly": False, "allocation": default_allocation}


def _bool(value):
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("not a boolean: %r" % value)


def config(key, value):
    if key == "path":
        _cfg["path"] = value
    elif key == "readonly":
        _cfg["readonly"] = _bool(value)
    elif key == "allocation":
        from nbd_server.config import load_allocation
        _cfg["allocation"] = load_allocation(value)
    else:
        raise ValueError("unknown parameter %r (path, readonly, allocation)" % key)


def config_complete():
    if not _cfg["path"]:
        raise ValueError("path=... is required")
    Backend(_cfg["path"], readonly=True).close()     # fail at startup, not per client


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def _errors(fn):
    """OSError -> the client sees its errno (nbdkit's default would be EIO)."""
    def wrapped(*args):
        try:
            return fn(*args)
        except OSError as e:
            nbdkit.set_error(e.errno or errno.EIO)
            raise
    wrapped.__name__ = fn.__name__
    return wrapped


@_errors
def open(readonly):
    # One Backend per connection; all share the volume's page cache, which is
    # what makes multi-conn safe.
    return Backend(_cfg["path"], readonly=readonly or _cfg["readonly"])


def close(h):
    h.close()


def get_size(h):
    return h.size


def block_size(h):
    return 1, max(512, h.physical_block_size), C.MAX_REQUEST


def can_write(h):
    return not h.readonly


def can_flush(h):
    return True


def can_trim(h):
    return not h.readonly


def can_zero(h):
    return not h.readonly


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_multi_conn(h):
    return True


def can_extents(h):
    return True


@_errors
def pread(h, buf, offset, flags):
    h.readinto(offset, buf)


@_errors
def pwrite(h, buf, offset, flags):
    h.write(offset, buf, fua=bool(flags & nbdkit.FLAG_FUA))


@_errors
def flush(h, flags):
    h.flush()


@_errors
def trim(h, count, offset, flags):
    h.discard(offset, count)
    if flags & nbdkit.FLAG_FUA:
        h.flush()


@_errors
def zero(h, count, offset, flags):
    h.write_zeroes(offset, count, unmap=bool(flags & nbdkit.FLAG_MAY_TRIM))
    if flags & nbdkit.FLAG_FUA:
        h.flush()


@_errors
def extents(h, count, offset, flags):
    # NBD's HOLE/ZERO bits are nbdkit's EXTENT_HOLE/EXTENT_ZERO.
    out = []
    pos = offset
    for n, f in _cfg["allocation"](h, offset, count):
        out.append((pos, n, f & (nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO)))
        pos += n
        if flags & nbdkit.FLAG_REQ_ONE:
            break
    return out
