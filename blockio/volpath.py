"""Only volumes are served: what `zfs-ng target add` and NBD exports (`zfs-ng
nbd serve --export`, nbd_server.config) accept as a volume's path, and what a
Connect opens.

A volume is a block device (a zvol: /dev/zvol/POOL/NAME links to /dev/zdN; a
zvol whose link udev has not made yet is taken by its minor: blockio/zvol.py), or
a regular image file under one of the directories the target was told about
(`zfs-ng target serve --file-dir DIR`, `zfs-ng nbd serve --file-dir DIR`, or
ZFSNG_TARGET_FILE_DIRS, os.pathsep separated, for both; none by default, so a
storage node serves block devices only).
Anything else is refused with a message: a path that does not exist, a
directory, a character device, a file outside those directories (/etc/passwd),
anything under /proc or /sys (/proc/self/environ is a "regular file")."""

import os
import stat

from . import zvol

FILE_DIRS_ENV = "ZFSNG_TARGET_FILE_DIRS"
NEVER = ("/proc", "/sys")

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
_ONLY = ("only block devices (zvols) and image files under a directory given to "
         "--file-dir (or ZFSNG_TARGET_FILE_DIRS) are served")


def file_dirs_from_env():
    return [d for d in os.environ.get(FILE_DIRS_ENV, "").split(os.pathsep) if d]


def normalize_dirs(dirs):
    """Absolute, symlink-free directory names (ValueError for a relative one)."""
    out = []
    for d in dirs:
        if not os.path.isabs(d):
            raise ValueError("image directory must be an absolute path: %r" % (d,))
        out.append(os.path.realpath(d))
    return tuple(out)


def _under(path, dirs):
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def check_file(real, dirs, shown):
    """real: the symlink-free name of a regular file."""
    if _under(real, NEVER) or not _under(real, dirs):
        where = ("the image directories %s" % ", ".join(dirs)) if dirs else \
            "any image directory (none is configured)"
        raise ValueError("refusing %s: a regular file outside %s; %s" % (shown, where, _ONLY))


def check_path(path, dirs):
    """Raise ValueError unless path names a volume that may be served."""
    try:
        st = os.stat(path)
    except OSError as e:
        # a /dev/zvol link udev has not made yet: the zvol's minor, by name
        dataset = zvol.dataset_of(path)
        node = zvol.find(dataset) if dataset else None
        try:
            st = os.stat(node or path)
        except OSError:
            raise ValueError("refusing %s: %s" % (path, e.strerror or e))
    if stat.S_ISBLK(st.st_mode):
        return
    if stat.S_ISREG(st.st_mode):
        return check_file(os.path.realpath(path), dirs, path)
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a volume")
    raise ValueError("refusing %s: %s; %s" % (path, kind, _ONLY))


def check_open(fd, path, dirs):
    """The same for what was opened (the path may have changed since `add`)."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return
    if not stat.S_ISREG(st.st_mode):
        raise ValueError("refusing %s: not a block device or regular file" % path)
    check_file(os.path.realpath("/proc/self/fd/%d" % fd), dirs, path)
