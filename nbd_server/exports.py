"""Exports and the Backends behind them.

An Export is a name, a path (a zvol, a snapshot's device, a regular file), a
read-only flag and its meta contexts.  The ExportTable opens one Backend per
export when the first connection needs it and closes it with the last, so
every connection to an export shares one fd and one page cache (what makes
CAN_MULTI_CONN true) and an idle export holds no fd.
"""

import collections
import threading

from blockio.backend import Backend
from nbd_server.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, MAX_STRING
from nbd_server.extents import default_allocation


def check_name(name):
    """An export or context name as the protocol allows it (UTF-8, no NUL,
    at most 4096 bytes); raises ValueError."""
    if not isinstance(name, str) or "\0" in name or len(name.encode("utf-8")) > MAX_STRING:
        raise ValueError("invalid NBD name %r" % (name,))
    return name


class Export:
    def __init__(self, name, path, readonly=False, description="", allocation=default_allocation,
                 bitmaps=None, contexts=None):
        """allocation: the base:allocation provider (None: no base:allocation);
        bitmaps: {bitmap name: provider} served as qemu:dirty-bitmap:NAME;
        contexts: any further {context name: provider}."""
        self.name = check_name(name)
        self.path = path
        self.readonly = bool(readonly)
        self.description = description or ""
        self.contexts = collections.OrderedDict()
        if allocation is not None:
            self.contexts[BASE_ALLOCATION] = allocation
        for bname, provider in sorted((bitmaps or {}).items()):
            self.contexts[check_name(DIRTY_BITMAP_PREFIX + bname)] = provider
        for cname, provider in (contexts or {}).items():
            if ":" not in cname:
                raise ValueError("context name %r has no namespace" % cname)
            self.contexts[check_name(cname)] = provider

    def __repr__(self):
        return "Export(%r, %r%s)" % (self.name, self.path, ", ro" if self.readonly else "")


class ExportTable:
    def __init__(self, exports, opener=Backend):
        self.exports = collections.OrderedDict()
        for e in exports:
            if e.name in self.exports:
                raise ValueError("export %r defined twice" % e.name)
            self.exports[e.name] = e
        self._opener = opener
        self._lock = threading.Lock()
        self._open = {}     # name -> [Backend, users]

    def get(self, name):
        return self.exports.get(name)

    def names(self):
        return list(self.exports)

    def acquire(self, name):
        """The shared Backend of export `name`, opened if nobody holds it.
        Raises KeyError (unknown export) or OSError (cannot open)."""
        export = self.exports[name]
        with self._lock:
            entry = self._open.get(name)
            if entry is None:
                entry = self._open[name] = [self._opener(export.path, readonly=export.readonly), 0]
            entry[1] += 1
            return entry[0]

    def release(self, name):
        with self._lock:
            entry = self._open.get(name)
            if entry is None:       # close_all() ran first (server shutdown)
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[name]
                entry[0].close()

    def open_count(self, name):
        with self._lock:
            entry = self._open.get(name)
            return entry[1] if entry else 0

    def close_all(self):
        with self._lock:
            for backend, _ in self._open.values():
                backend.close()
            self._open.clear()
