"""Exports and the Backends behind them.

An Export is a name, a path (a zvol, a snapshot's device, a regular file), a
read-only flag and its meta contexts.  The ExportTable opens one Backend per
export when the first connection needs it and closes it with the last, so
every connection to an export shares one fd and one page cache (what makes
CAN_MULTI_CONN true) and an idle export holds no fd.  DynamicExports is the
same looked up per client identity and option (a storage node's grants).
"""

import collections
import logging
import threading

from blockio.backend import Backend
from nbd_server.constants import BASE_ALLOCATION, DIRTY_BITMAP_PREFIX, MAX_STRING
from nbd_server.extents import default_allocation

log = logging.getLogger("nbd_server")


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


class _SharedBackends:
    """One Backend per key, shared by its users: opened with the first
    acquire, closed with the last release (or close_all at shutdown)."""

    def __init__(self, opener):
        self._opener = opener
        self._lock = threading.Lock()
        self._open = {}     # key -> [Backend, users]

    def acquire(self, key, path, readonly):
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                entry = self._open[key] = [self._opener(path, readonly=readonly), 0]
            entry[1] += 1
            return entry[0]

    def release(self, key):
        with self._lock:
            entry = self._open.get(key)
            if entry is None:       # close_all() ran first (server shutdown)
                return
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[key]
                entry[0].close()

    def count(self, key):
        with self._lock:
            entry = self._open.get(key)
            return entry[1] if entry else 0

    def close_all(self):
        with self._lock:
            for backend, _ in self._open.values():
                backend.close()
            self._open.clear()


class ExportTable:
    def __init__(self, exports, opener=Backend):
        self.exports = collections.OrderedDict()
        for e in exports:
            if e.name in self.exports:
                raise ValueError("export %r defined twice" % e.name)
            self.exports[e.name] = e
        self._backends = _SharedBackends(opener)     # by export name

    def get(self, name):
        return self.exports.get(name)

    def names(self):
        return list(self.exports)

    def acquire(self, name):
        """The shared Backend of export `name`, opened if nobody holds it.
        Raises KeyError (unknown export) or OSError (cannot open)."""
        export = self.exports[name]
        return self._backends.acquire(name, export.path, export.readonly)

    def release(self, name):
        self._backends.release(name)

    def open_count(self, name):
        return self._backends.count(name)

    def close_all(self):
        self._backends.close_all()


class DynamicExports:
    """An export table looked up per client, per option, instead of fixed at
    start: what a storage node with 100,000 volumes serves on one listener
    (`zfs-ng nbd serve-node`, plugins/datapath/node_nbd.py).

    lookup(identity, name) -> {"path", "readonly", "description"} or None, and
    names(identity) -> [name] (NBD_OPT_LIST) are called by every connection's
    view when the client asks (INFO, GO, EXPORT_NAME, LIST, META_CONTEXT):
    nothing is cached between options, so a grant or a revoke counts from the
    next option on; and a connection in transmission whose grant is revoked
    (or changed) is cut before its next request, within a second (the
    server asks still_granted()).  The identity is the CN of the client's certificate
    (verified by the TLS context against its CA); a connection without one
    (before STARTTLS, or on a unix socket) sees no export at all.

    As ExportTable, one Backend per (path, read-only) is shared by the
    connections that use it, opened with the first and closed with the last.
    """

    def __init__(self, lookup, names=None, opener=Backend):
        self._lookup = lookup
        self._names = names or (lambda identity: [])
        self._backends = _SharedBackends(opener)     # by (path, readonly)

    def view(self, peercert):
        """The table of one connection, from its peer certificate
        (ssl.SSLSocket.getpeercert(): a dict, or None without one)."""
        identity = None
        for rdn in (peercert or {}).get("subject", ()):
            for attr, value in rdn:
                if attr == "commonName":
                    identity = value
        return _View(self, identity)

    def export(self, identity, name):
        """The Export `identity` may open as `name`, or None."""
        if identity is None:
            return None
        try:
            check_name(name)
            rec = self._lookup(identity, name)
            if not rec:
                return None
            return Export(name, rec["path"], readonly=bool(rec.get("readonly", True)),
                          description=rec.get("description") or "")
        except Exception as e:          # a broken record is no export, not a dead server
            log.warning("export lookup %r for %r failed: %s", name, identity, e)
            return None

    def names(self, identity):
        if identity is None:
            return []
        try:
            return list(self._names(identity))
        except Exception as e:
            log.warning("export list for %r failed: %s", identity, e)
            return []

    def acquire_export(self, export):
        key = (export.path, export.readonly)
        return key, self._backends.acquire(key, export.path, export.readonly)

    def release_key(self, key):
        self._backends.release(key)

    def open_count(self, path, readonly):
        return self._backends.count((path, bool(readonly)))

    def close_all(self):
        self._backends.close_all()


class _View:
    """What one connection of a DynamicExports sees: ExportTable's interface
    (get, names, acquire, release) for one identity.  acquire() opens the
    Export that get() returned last for that name (the one described to the
    client), never a newer record."""

    def __init__(self, source, identity):
        self.source = source
        self.identity = identity
        self._seen = {}      # name -> Export last returned by get()
        self._held = {}      # name -> [backend keys acquired]

    def get(self, name):
        export = self.source.export(self.identity, name)
        if export is None:
            self._seen.pop(name, None)
            return None
        seen = self._seen.get(name)
        if seen is not None and (seen.path, seen.readonly, seen.description) == \
                (export.path, export.readonly, export.description):
            return seen     # the same object: a meta context selection stays valid
        self._seen[name] = export
        return export

    def names(self):
        return [n for n in self.source.names(self.identity) if self.get(n) is not None]

    def still_granted(self, name):
        """Does the source still give this identity the export its open
        connection holds (same device, same mode)?  No: the server cuts it."""
        seen = self._seen.get(name)
        now = self.source.export(self.identity, name)
        return seen is not None and now is not None and \
            (now.path, now.readonly) == (seen.path, seen.readonly)

    def acquire(self, name):
        export = self._seen.get(name) or self.get(name)
        if export is None:
            raise KeyError(name)
        key, backend = self.source.acquire_export(export)
        self._held.setdefault(name, []).append(key)
        return backend

    def release(self, name):
        keys = self._held.get(name)
        if not keys:
            return
        self.source.release_key(keys.pop())
        if not keys:
            del self._held[name]
