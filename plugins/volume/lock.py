"""One lock per SR around mutations: xapi runs plugin scripts concurrently.

An fcntl lock on /run/zfs-ng/<pool>.lock (ZFSNG_RUN_DIR); the kernel drops it
when the process dies, so a killed script never leaves the SR locked.
Re-entrant within a process.
"""

import contextlib
import fcntl
import os

RUN_DIR = os.environ.get("ZFSNG_RUN_DIR", "/run/zfs-ng")

_held = {}  # path -> [fd, depth]


@contextlib.contextmanager
def sr_lock(pool):
    path = os.path.join(RUN_DIR, "%s.lock" % pool)
    if path in _held:
        _held[path][1] += 1
        try:
            yield
        finally:
            _held[path][1] -= 1
        return
    if not os.path.isdir(RUN_DIR):
        try:
            os.makedirs(RUN_DIR, 0o755)
        except OSError:
            if not os.path.isdir(RUN_DIR):
                raise
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[path] = [fd, 1]
        try:
            yield
        finally:
            del _held[path]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
