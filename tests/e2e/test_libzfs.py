"""plugins/libzfs.py against real ZFS: every reading and change it makes
in-process is the one the zfs command makes or sees, and its failures are
the command's typed errors (plugins/zfs.py types both by the same table).

Each check runs the same plugins.zfs call twice, through libzfs and through
the zfs command (ZFSNG_LIBZFS=0, module state reset), and compares them, or
changes a property through libzfs and reads it back with the zfs command."""

import os
import subprocess

import pytest

from conftest import run, wait_for_path
from plugins import libzfs, zfs

P = zfs.PREFIX


@pytest.fixture
def both(monkeypatch):
    """call(fn, *args) -> (through libzfs, through the command)."""
    def through(use_lib, fn, *args):
        monkeypatch.setenv("ZFSNG_LIBZFS", "1" if use_lib else "0")
        libzfs._state.clear()
        try:
            return fn(*args)
        except zfs.ZfsError as e:
            return e
        finally:
            libzfs._state.clear()

    def call(fn, *args):
        return through(True, fn, *args), through(False, fn, *args)
    yield call
    monkeypatch.delenv("ZFSNG_LIBZFS")
    libzfs._state.clear()


def test_libzfs_loads_here():
    # otherwise every comparison below compares the command with itself
    libzfs._state.clear()
    try:
        libzfs._load()      # Unusable: fails the test
    finally:
        libzfs._state.clear()


def test_user_props_read_as_the_command_reads_them(zpool, both):
    root, child = zpool + "/sr", zpool + "/sr/child"
    run("zfs", "create", "-o", "mountpoint=none", root)
    run("zfs", "set", P + "sr-uuid=" + zfs.encode("u-1"), P + "generation=7",
        P + "odd=" + zfs.encode("tab\there \u00e9"), root)
    run("zfs", "create", "-o", P + "own=1", child)
    props = [P + "sr-uuid", P + "generation", P + "odd", P + "own", P + "unset"]
    lib, cmd = both(zfs.local_user_props, root, props)
    assert lib == cmd == {P + "sr-uuid": '"u-1"', P + "generation": "7",
                          P + "odd": zfs.encode("tab\there \u00e9")}
    # the child inherits the root's: only its own is local
    lib, cmd = both(zfs.local_user_props, child, props)
    assert lib == cmd == {P + "own": "1"}


def test_volmode_set_and_inherited_through_libzfs_as_the_command_sees_it(zpool, both):
    run("zfs", "set", "volmode=none", zpool)
    ds = zpool + "/v"
    run("zfs", "create", "-s", "-V", "16M", ds)
    dev = zfs.device_path(ds)
    lib, cmd = both(zfs.native_prop, ds, "volmode")
    assert lib == cmd == ("none", False)

    libzfs._state.clear()
    zfs.set_prop(ds, "volmode", "dev")
    assert run("zfs", "get", "-H", "-o", "value,source", "volmode", ds).stdout == "dev\tlocal\n"
    wait_for_path(dev)
    lib, cmd = both(zfs.native_prop, ds, "volmode")
    assert lib == cmd == ("dev", True)

    zfs.inherit_prop(ds, "volmode")
    assert run("zfs", "get", "-H", "-o", "value,source", "volmode", ds).stdout == \
        "none\tinherited from %s\n" % zpool
    subprocess.run(["udevadm", "settle"])
    assert not os.path.exists(dev)


def test_a_user_property_set_through_libzfs_is_the_commands(zpool):
    """SR.mutate bumps the pool generation (a user property) this way."""
    ds = zpool + "/fs"
    run("zfs", "create", ds)
    libzfs._state.clear()
    zfs.set_prop(ds, P + "generation", "7")
    assert "lib" in libzfs._state, "libzfs did not load: the command ran"
    assert run("zfs", "get", "-H", "-o", "value,source", P + "generation", ds).stdout == \
        "7\tlocal\n"
    zfs.set_prop(ds, P + "generation", "8")
    assert zfs.local_user_props(ds, [P + "generation"]) == {P + "generation": "8"}


def test_sizes_of_a_volume_and_its_snapshot_as_the_command_reads_them(zpool, both):
    """Volume.stat's fresh figures (zfs.sizes): the same through libzfs and
    `zfs get`, for a written volume, its snapshot, and a missing name."""
    ds = zpool + "/v"
    run("zfs", "create", "-s", "-V", "16M", ds)
    with open(wait_for_path(zfs.device_path(ds)), "r+b") as f:
        f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    run("zfs", "snapshot", ds + "@s")
    run("dd", "if=/dev/urandom", "of=" + zfs.device_path(ds), "bs=1M", "count=2",
        "oflag=direct,sync")
    run("zpool", "sync", zpool)
    for name in (ds, ds + "@s"):
        lib, cmd = both(zfs.sizes, name)
        assert lib == cmd, (name, lib, cmd)
        assert lib[0] == 16 << 20 and lib[1] > (1 << 20), (name, lib)
    assert both(zfs.sizes, ds)[0][1] > both(zfs.sizes, ds + "@s")[0][1]
    lib, cmd = both(zfs.sizes, ds + "@nope")
    assert type(lib) is type(cmd) is zfs.NotFound, (lib, cmd)


def test_exists_as_the_command_answers(zpool, both):
    ds = zpool + "/v"
    run("zfs", "create", "-s", "-V", "16M", ds)
    run("zfs", "snapshot", ds + "@s")
    for name, want in ((ds, True), (ds + "@s", True), (zpool, True), (ds + "@nope", False),
                       (zpool + "/nope", False), ("nopool%s/x" % zpool, False)):
        lib, cmd = both(zfs.exists, name)
        assert lib is cmd is want, (name, lib, cmd)


def test_failures_are_the_commands_typed_errors(zpool, both):
    missing = zpool + "/nope"
    for fn, args in ((zfs.local_user_props, (missing, [P + "x"])),
                     (zfs.native_prop, (missing, "volmode")),
                     (zfs.set_prop, (missing, "volmode", "dev")),
                     (zfs.inherit_prop, (missing, "volmode"))):
        lib, cmd = both(fn, *args)
        assert type(lib) is type(cmd) is zfs.NotFound, (fn.__name__, lib, cmd)
        assert "does not exist" in lib.message
    ds = zpool + "/v"
    run("zfs", "create", "-s", "-V", "16M", ds)
    lib, cmd = both(zfs.set_prop, ds, "volmode", "sideways")
    assert isinstance(lib, zfs.ZfsError) and isinstance(cmd, zfs.ZfsError), (lib, cmd)
    assert "volmode" in lib.message, lib.message
    assert run("zfs", "get", "-H", "-o", "value", "volmode", ds).stdout != "sideways\n"


def test_a_clone_made_through_libzfs_is_the_commands(zpool, both, monkeypatch):
    """zfs.clone (a snapshot's read-only device, Volume.clone, revert, a
    non-persistent session): a clone made each way has the same origin and
    properties (native and user, as the command reads them), its device
    appears either way, and the failures are the command's typed errors."""
    ds = zpool + "/v"
    run("zfs", "create", "-s", "-V", "16M", ds)
    run("zfs", "snapshot", ds + "@s")
    props = {"readonly": "on", "volmode": "dev", P + "name": zfs.encode("c \u00e9 'q'")}
    made = []
    for use_lib, target in ((True, zpool + "/lib"), (False, zpool + "/cmd")):
        monkeypatch.setenv("ZFSNG_LIBZFS", "1" if use_lib else "0")
        libzfs._state.clear()
        try:
            zfs.clone(ds + "@s", target, props)
        finally:
            libzfs._state.clear()
        made.append(target)
    lib, cmd = both(zfs.clone, ds + "@s", zpool + "/lib", props)
    assert type(lib) is type(cmd) is zfs.Exists, (lib, cmd)
    lib, cmd = both(zfs.clone, ds + "@nope", zpool + "/x", props)
    assert type(lib) is type(cmd) is zfs.NotFound, (lib, cmd)
    seen = []
    for target in made:
        out = run("zfs", "get", "-H", "-o", "property,value,source",
                  "origin,readonly,volmode," + P + "name", target).stdout
        seen.append(sorted(line.split("\t") for line in out.splitlines()))
        wait_for_path(zfs.device_path(target))
    assert seen[0] == seen[1], seen
    assert ["readonly", "on", "local"] in seen[0] and ["volmode", "dev", "local"] in seen[0]
    assert ["origin", ds + "@s", "-"] in seen[0]
    assert [P + "name", zfs.encode("c \u00e9 'q'"), "local"] in seen[0]
