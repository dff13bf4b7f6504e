"""Our servers open a zvol before udev has linked it (blockio/zvol.py), on
real ZFS and the guest's udev: activate_device(link=False) returns once the
zvol's minor is there, and the target and the NBD server (blockio.Backend,
volpath.check_path) find that minor by its name (BLKZNAME).  udev being late
is made certain by removing its links: each volume's Backend must then read
its own data, never another active volume's, and a deactivated volume must
not open at all."""

import os
import time

import pytest

from volume_calls import call

MiB = 1 << 20


def _gone(fn, timeout=30):
    deadline = time.time() + timeout
    while fn() is not None:
        if time.time() > deadline:
            pytest.fail("still there after %d s" % timeout)
        time.sleep(0.05)


def test_servers_open_a_zvol_before_udev_links_it(sr):
    from blockio import volpath, zvol
    from blockio.backend import Backend
    from plugins.volume import volume
    pool = sr
    vols = []
    for i in range(3):
        v = call("Volume.create", sr=pool, name="m%d" % i, description="", size=MiB,
                 sharable=False)
        mark = ("volume %d of three\n" % i).encode()
        dev = volume.activate_device(pool, v["key"])["device"]      # waits for the link
        fd = os.open(dev, os.O_WRONLY)
        try:
            os.pwrite(fd, mark, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        volume.deactivate_device(pool, v["key"])
        vols.append((v["key"], "%s/zfs-ng/%s" % (pool, v["key"]), dev, mark))
    for key, ds, dev, _ in vols:
        _gone(lambda: zvol.find(ds))

    for key, ds, dev, _ in vols:
        started = time.time()
        loc = volume.activate_device(pool, key, link=False)
        assert loc["device"] == dev
        node = zvol.find(ds, since=started - 1)
        assert node is not None, "activate_device(link=False) returned before the minor"
    # udev late for all three: no link; each opens its own minor
    for key, ds, dev, _ in vols:
        deadline = time.time() + 30
        while not os.path.lexists(dev) and time.time() < deadline:
            time.sleep(0.05)        # udev's link, to take it away
        os.unlink(dev)
    try:
        for key, ds, dev, mark in vols:
            assert not os.path.exists(dev)
            volpath.check_path(dev, ())         # the target's `add` accepts it
            with Backend(dev) as b:
                assert b.is_block
                assert zvol.zname(b.fd) == ds
                assert bytes(b.read(0, len(mark))) == mark
                b.write(4096, mark, fua=True)   # read-write, the right volume
            with Backend(dev, readonly=True) as b:
                assert bytes(b.read(4096, len(mark))) == mark
    finally:
        for key, ds, dev, _ in vols:
            volume.deactivate_device(pool, key)
    for key, ds, dev, _ in vols:
        _gone(lambda: zvol.find(ds))
        assert not os.path.exists(dev)
        with pytest.raises(FileNotFoundError):
            Backend(dev)
        with pytest.raises(ValueError):
            volpath.check_path(dev, ())


def test_a_snapshot_device_opens_before_udev_links_it(sr):
    """A snapshot's device is a read-only clone (ro-KEY) made on demand."""
    from blockio import zvol
    from blockio.backend import Backend
    from plugins.volume import names, volume
    pool = sr
    v = call("Volume.create", sr=pool, name="s", description="", size=MiB, sharable=False)
    dev = volume.activate_device(pool, v["key"])["device"]
    fd = os.open(dev, os.O_WRONLY)
    try:
        os.pwrite(fd, b"before the snapshot", 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    s = call("Volume.snapshot", sr=pool, key=v["key"])
    volume.deactivate_device(pool, v["key"])
    loc = volume.activate_device(pool, s["key"], link=False)
    ro = names.readonly_dataset(pool, s["key"])
    assert loc["device"] == "/dev/zvol/" + ro
    deadline = time.time() + 30
    while not os.path.lexists(loc["device"]) and time.time() < deadline:
        time.sleep(0.05)
    os.unlink(loc["device"])
    try:
        with Backend(loc["device"], readonly=True) as b:
            assert zvol.zname(b.fd) == ro
            assert bytes(b.read(0, 19)) == b"before the snapshot"
    finally:
        volume.deactivate_device(pool, s["key"])
