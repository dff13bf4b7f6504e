"""plugins/libzfs.py where it cannot be used (this host has no ZFS): it says
so with Unusable, once, and plugins.zfs then runs the zfs command.  What it
reads and changes on real ZFS: tests/e2e/test_libzfs.py."""

import pytest

from plugins import libzfs


@pytest.fixture(autouse=True)
def fresh_state():
    libzfs._state.clear()
    yield
    libzfs._state.clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("ZFSNG_LIBZFS", "0")
    with pytest.raises(libzfs.Unusable, match="ZFSNG_LIBZFS=0"):
        libzfs.user_props("p/zfs-ng")


def test_a_machine_without_libzfs_is_told_once(monkeypatch):
    monkeypatch.setenv("ZFSNG_LIBZFS", "1")
    monkeypatch.setattr(libzfs, "_candidates", lambda: ("libzfs-not-here.so.99",))
    for fn, args in ((libzfs.user_props, ("p/zfs-ng",)),
                     (libzfs.native_prop, ("p/zfs-ng/v", "volmode")),
                     (libzfs.set_prop, ("p/zfs-ng/v", "volmode", "dev")),
                     (libzfs.inherit_prop, ("p/zfs-ng/v", "volmode"))):
        with pytest.raises(libzfs.Unusable, match="libzfs not loaded"):
            fn(*args)
    # the verdict is kept: a library that appears later is not loaded mid-process
    monkeypatch.setattr(libzfs, "_candidates", lambda: ("libc.so.6",))
    with pytest.raises(libzfs.Unusable, match="libzfs-not-here"):
        libzfs.user_props("p/zfs-ng")
