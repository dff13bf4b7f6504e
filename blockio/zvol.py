"""A zvol's block device before udev has linked it: /dev/zvol/DATASET is
udev's symlink to the zvol's minor /dev/zdN, made a while after ZFS adds the
minor (udev runs zvol_id on the new node to learn its name: about 130 ms in
the TCG guest, five times the minor's own 23 ms).  Servers that open a volume
themselves (the NVMe/TCP target, the NBD server) need not wait for it: the
minor is found by name the way zvol_id finds it, the BLKZNAME ioctl (OpenZFS
include/sys/fs/zfs.h: _IOR(0x12, 125, char[ZFS_MAX_DATASET_NAME_LEN]),
answered by the zvol's own name), and a node is used only if the descriptor
actually opened answers with the dataset asked for.  Nothing is ever linked
or created here: a minor that goes away and comes back as another volume can
never be mistaken for this one, as the check is made on the open descriptor.

Contract:
- dataset_of(path): the dataset a /dev/zvol/... path names, else None.
- zname(fd): the dataset name of an open zvol minor (OSError otherwise).
- find(dataset, since=None): the /dev/zdN of the dataset now, or None (a
  read-only open and BLKZNAME per candidate: the zd nodes, newest first, at
  most SCAN; with since, only nodes made at or after that time.time()).
- open_path(path, flags): os.open(path, flags), or where the path is a
  /dev/zvol link not made yet, the dataset's minor opened with flags and
  checked by name; FileNotFoundError as os.open gives when neither exists.
Dataset names are never passed to a program; they are only compared."""

import errno
import fcntl
import os
import re

ZVOL_DIR = "/dev/zvol/"
DEV = "/dev"
NAME_LEN = 256                          # ZFS_MAX_DATASET_NAME_LEN
BLKZNAME = (2 << 30) | (NAME_LEN << 16) | (0x12 << 8) | 125     # _IOR(0x12, 125, char[256])
SCAN = 64                               # the newest zd nodes looked at
_MINOR = re.compile(r"zd[0-9]+\Z")      # zdN, not its partitions zdNpM


def dataset_of(path):
    """POOL/... for /dev/zvol/POOL/..., else None (no '.', '..' or empty part)."""
    if not path.startswith(ZVOL_DIR):
        return None
    name = path[len(ZVOL_DIR):]
    parts = name.split("/")
    if len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or len(name) >= NAME_LEN:
        return None
    return name


def zname(fd):
    """The name the zvol behind fd gives (BLKZNAME)."""
    buf = fcntl.ioctl(fd, BLKZNAME, bytes(NAME_LEN))
    return buf.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _candidates(dev, since=None):
    """The zd minors under dev, newest first (a node appears with its minor:
    devtmpfs gives it the time it was made), made at or after since."""
    found = []
    try:
        entries = os.listdir(dev)
    except OSError:
        return []
    for n in entries:
        if _MINOR.match(n):
            try:
                made = os.stat(os.path.join(dev, n)).st_ctime
            except OSError:
                continue                # gone meanwhile
            if since is None or made >= since:
                found.append((made, n))
    found.sort(reverse=True)
    return [os.path.join(dev, n) for _, n in found[:SCAN]]


def _open_named(node, dataset, flags):
    """node opened with flags if it is dataset's zvol, else None."""
    try:
        fd = os.open(node, flags | os.O_CLOEXEC)
    except OSError:
        return None                     # gone, busy, not ours to open
    try:
        if zname(fd) == dataset:
            return fd
    except OSError:
        pass                            # not a zvol
    os.close(fd)
    return None


def find(dataset, dev=DEV, since=None):
    """The minor node of dataset if there is one now (made at or after since,
    a time.time()), else None."""
    for node in _candidates(dev, since):
        fd = _open_named(node, dataset, os.O_RDONLY)
        if fd is not None:
            os.close(fd)
            return node
    return None


def open_path(path, flags, dev=DEV):
    """os.open(path, flags), and for a /dev/zvol link udev has not made yet,
    the dataset's minor (checked by name on the descriptor returned)."""
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        dataset = dataset_of(path)
        if dataset is None:
            raise
    # the candidates are looked at read-only (find: a read-write open of
    # another volume would make udev probe it again when closed); the one
    # that names our dataset is opened with flags and checked again on that
    # descriptor
    node = find(dataset, dev)
    fd = _open_named(node, dataset, flags) if node is not None else None
    if fd is not None:
        return fd
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
