"""libzfs in-process, for the few calls on the hot path of a device's
activation: does a dataset exist, one dataset's user properties or one
native property, a volume's or snapshot's sizes (Volume.stat), set or
inherit one property, a clone (a snapshot's read-only device; zfs.clone's
other callers, Volume.clone, revert, a session's clone, take it too).

plugins/zfs.py is this module's only user: it calls here first and runs the
zfs command when this module is not usable (no libzfs on the machine, or
ZFSNG_LIBZFS=0).  A `zfs` process pays its start each time (libzfs loaded
and set up again): in the slow test guest 0.4-0.7 s a command under load,
against 10-30 ms for the same reading from a process that has libzfs
loaded (and 0.2-0.3 s to load it once).  Only opaque pointers, ints and C
strings cross ctypes here, and every function used (libzfs_init, zfs_open,
zfs_dataset_exists, zfs_get_user_props, zfs_name_to_prop,
zfs_prop_get/set/set_list/inherit, zfs_clone, libzfs_error_action/description,
nvlist_*) has
had the same signature from OpenZFS 2.0 (libzfs.so.4; XCP-ng 8.3 has 2.1)
to 2.3 (libzfs.so.6).  A libzfs handle is not thread-safe: one lock serialises
every call.

Failures raise LibZfsError(action, description): the same words the zfs
command prints ("cannot open 'P/X': dataset does not exist"), so zfs.py
types them by the same table as the command's messages.
"""

import ctypes
import os
import threading

SONAMES = ("libzfs.so.6", "libzfs.so.5", "libzfs.so.4")
NVPAIR = "libnvpair.so.3"
ZFS_TYPE_FILESYSTEM = 1
ZFS_TYPE_SNAPSHOT = 2
ZFS_TYPE_VOLUME = 4


class LibZfsError(Exception):
    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class Unusable(Exception):
    """libzfs can't be used here: run the zfs command instead."""


_lock = threading.Lock()
_state = {}     # "lib", "nv", "handle" once loaded; "unusable": why not


def _candidates():
    """The libzfs names to try: the known sonames, then ldconfig's (asked
    only if none of those loads: find_library runs ldconfig, a process)."""
    for name in SONAMES:
        yield name
    import ctypes.util   # here: it imports shutil, tempfile, bz2, lzma (0.09 s in TCG)
    found = ctypes.util.find_library("zfs")
    if found:
        yield found


def _load():
    if "unusable" in _state:
        raise Unusable(_state["unusable"])
    if "handle" in _state:
        return _state
    if os.environ.get("ZFSNG_LIBZFS", "1") == "0":
        _state["unusable"] = "ZFSNG_LIBZFS=0"
        raise Unusable(_state["unusable"])
    lib = None
    tried = []
    for name in _candidates():
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            tried.append(name)
    try:
        if lib is None:
            raise OSError("none of %s" % ", ".join(tried))
        nv = ctypes.CDLL(NVPAIR)
    except OSError as e:
        _state["unusable"] = "libzfs not loaded: %s" % e
        raise Unusable(_state["unusable"])
    P, S, I = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for fn, res, args in (("libzfs_init", P, []),
                          ("libzfs_error_action", S, [P]),
                          ("libzfs_error_description", S, [P]),
                          ("zfs_open", P, [P, S, I]),
                          ("zfs_close", None, [P]),
                          ("zfs_get_user_props", P, [P]),
                          ("zfs_prop_set", I, [P, S, S]),
                          ("zfs_prop_set_list", I, [P, P]),
                          ("zfs_prop_inherit", I, [P, S, I]),
                          ("zfs_clone", I, [P, S, P]),
                          ("zfs_name_to_prop", I, [S]),
                          ("zfs_dataset_exists", I, [P, S, I]),
                          ("zfs_prop_get", I, [P, I, S, ctypes.c_size_t, ctypes.POINTER(I),
                                               S, ctypes.c_size_t, I])):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    nv.nvlist_lookup_nvlist.restype = I
    nv.nvlist_lookup_nvlist.argtypes = [P, S, ctypes.POINTER(P)]
    nv.nvlist_lookup_string.restype = I
    nv.nvlist_lookup_string.argtypes = [P, S, ctypes.POINTER(S)]
    nv.nvlist_next_nvpair.restype = P
    nv.nvlist_next_nvpair.argtypes = [P, P]
    nv.nvpair_name.restype = S
    nv.nvpair_name.argtypes = [P]
    nv.nvlist_alloc.restype = I
    nv.nvlist_alloc.argtypes = [ctypes.POINTER(P), ctypes.c_uint, I]
    nv.nvlist_add_string.restype = I
    nv.nvlist_add_string.argtypes = [P, S, S]
    nv.nvlist_free.restype = None
    nv.nvlist_free.argtypes = [P]
    handle = lib.libzfs_init()
    if not handle:
        _state["unusable"] = "libzfs_init failed (no /dev/zfs?)"
        raise Unusable(_state["unusable"])
    _state.update(lib=lib, nv=nv, handle=handle)
    return _state


def _error(st):
    lib, h = st["lib"], st["handle"]
    action = (lib.libzfs_error_action(h) or b"").decode("utf-8", "replace")
    desc = (lib.libzfs_error_description(h) or b"").decode("utf-8", "replace")
    return LibZfsError("%s: %s" % (action, desc) if action else desc)


class _Open(object):
    """zfs_open .. zfs_close of one filesystem or volume (or, where types say
    so, a snapshot)."""

    def __init__(self, st, name, types=ZFS_TYPE_FILESYSTEM | ZFS_TYPE_VOLUME):
        self.st = st
        self.zhp = st["lib"].zfs_open(st["handle"], name.encode("utf-8"), types)
        if not self.zhp:
            raise _error(st)

    def __enter__(self):
        return self.zhp

    def __exit__(self, *exc):
        self.st["lib"].zfs_close(self.zhp)


def _string(nv, nvl, key):
    out = ctypes.c_char_p()
    if nv.nvlist_lookup_string(nvl, key, ctypes.byref(out)) != 0:
        return None
    return out.value.decode("utf-8", "replace")


def exists(name):
    """Whether filesystem, volume or snapshot NAME exists."""
    with _lock:
        st = _load()
        return bool(st["lib"].zfs_dataset_exists(
            st["handle"], name.encode("utf-8"),
            ZFS_TYPE_FILESYSTEM | ZFS_TYPE_VOLUME | ZFS_TYPE_SNAPSHOT))


def user_props(name):
    """{property: (value, source)} of dataset NAME's user properties, set
    there or inherited; source is the dataset that sets it (NAME: local)."""
    with _lock:
        st = _load()
        nv = st["nv"]
        with _Open(st, name) as zhp:
            props = st["lib"].zfs_get_user_props(zhp)   # owned by the handle
            out = {}
            pair = nv.nvlist_next_nvpair(props, None)
            while pair:
                key = nv.nvpair_name(pair)
                sub = ctypes.c_void_p()
                if nv.nvlist_lookup_nvlist(props, key, ctypes.byref(sub)) == 0:
                    value = _string(nv, sub, b"value")
                    if value is not None:
                        out[key.decode("utf-8", "replace")] = (value, _string(nv, sub, b"source"))
                pair = nv.nvlist_next_nvpair(props, pair)
            return out


ZPROP_SRC_LOCAL = 0x8
ZPROP_INVAL = -1


def _prop_get(lib, zhp, p):
    """(value, source) of native property number p of an open dataset, as
    `zfs get -p` prints the value (literal); None where zfs_prop_get fails."""
    buf = ctypes.create_string_buffer(1024)
    src = ctypes.c_int(0)
    stat = ctypes.create_string_buffer(1024)
    if lib.zfs_prop_get(zhp, p, buf, len(buf), ctypes.byref(src), stat, len(stat), 1) != 0:
        return None
    return buf.value.decode("utf-8", "replace"), src.value


def native_prop(name, prop):
    """(value, set locally?) of a native property of dataset NAME, as
    `zfs get -p` prints it."""
    with _lock:
        st = _load()
        lib = st["lib"]
        p = lib.zfs_name_to_prop(prop.encode("ascii"))
        if p == ZPROP_INVAL:
            raise LibZfsError("bad property list: invalid property '%s'" % prop)
        with _Open(st, name) as zhp:
            got = _prop_get(lib, zhp, p)
            if got is None:
                raise _error(st)
            return got[0], got[1] == ZPROP_SRC_LOCAL


def sizes(name):
    """[volsize, referenced] of volume or snapshot NAME, in bytes."""
    with _lock:
        st = _load()
        lib = st["lib"]
        with _Open(st, name, ZFS_TYPE_VOLUME | ZFS_TYPE_SNAPSHOT) as zhp:
            out = []
            for prop in ("volsize", "referenced"):
                got = _prop_get(lib, zhp, lib.zfs_name_to_prop(prop.encode("ascii")))
                if got is None:
                    raise LibZfsError("cannot get %s of '%s'" % (prop, name))
                out.append(int(got[0]))
            return out


def set_prop(name, prop, value):
    with _lock:
        st = _load()
        with _Open(st, name) as zhp:
            if st["lib"].zfs_prop_set(zhp, prop.encode("utf-8"), value.encode("utf-8")) != 0:
                raise _error(st)


NV_UNIQUE_NAME = 1


def _nvlist(st, props, what):
    """A new nvlist of {name: string value} (the caller frees it)."""
    nv = st["nv"]
    nvl = ctypes.c_void_p()
    if nv.nvlist_alloc(ctypes.byref(nvl), NV_UNIQUE_NAME, 0) != 0:
        raise LibZfsError("%s: out of memory" % what)
    for k in sorted(props):
        if nv.nvlist_add_string(nvl, k.encode("utf-8"), props[k].encode("utf-8")) != 0:
            nv.nvlist_free(nvl)
            raise LibZfsError("%s: out of memory" % what)
    return nvl


def set_props(name, props):
    """Set every {prop: value} in one ioctl (zfs_prop_set_list: one sync
    task, so all or none of them, and one transaction group's wait)."""
    with _lock:
        st = _load()
        nvl = _nvlist(st, props, "cannot set properties of '%s'" % name)
        try:
            with _Open(st, name) as zhp:
                if st["lib"].zfs_prop_set_list(zhp, nvl) != 0:
                    raise _error(st)
        finally:
            st["nv"].nvlist_free(nvl)


def clone(snapshot, target, props):
    """zfs clone -o k=v... snapshot target (zfs_clone, as the command does)."""
    with _lock:
        st = _load()
        nvl = _nvlist(st, props, "cannot create '%s'" % target)
        try:
            with _Open(st, snapshot, ZFS_TYPE_SNAPSHOT) as zhp:
                if st["lib"].zfs_clone(zhp, target.encode("utf-8"), nvl) != 0:
                    raise _error(st)
        finally:
            st["nv"].nvlist_free(nvl)


def inherit_prop(name, prop):
    with _lock:
        st = _load()
        with _Open(st, name) as zhp:
            if st["lib"].zfs_prop_inherit(zhp, prop.encode("utf-8"), 0) != 0:
                raise _error(st)
