"""zfsng-raw in the VM: real zvols, the plugin executables called as
xapi-storage-script calls them.  No tap-ctl in the VM: the blkback fallback."""

import concurrent.futures
import os

import pytest

from conftest import run, wait_for_path
from dp_helpers import (PluginError, call, impl, make_snapshot, make_sr, make_volume, pattern,
                        pread, pwrite, zfs_exists)

RAW = "zfsng-raw"
MiB = 1 << 20


@pytest.fixture
def sr(zpool):
    return make_sr(run, zpool)


def test_attach_activate_write_detach(sr):
    key = make_volume(run, sr)
    uri = "%s://%s/%s" % (RAW, sr, key)
    assert call(RAW, "Datapath.open", uri=uri, persistent=True) is None
    res = call(RAW, "Datapath.attach", uri=uri, domain="3")
    dev = impl(res, "BlockDevice")["path"]
    assert dev == "/dev/zvol/%s/zfs-ng/%s" % (sr, key)
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert call(RAW, "Datapath.attach", uri=uri, domain="3") == res     # idempotent
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    data = pattern(1, MiB)
    pwrite(dev, 3 * MiB, data)
    # another domain cannot activate while it is active read-write
    call(RAW, "Datapath.attach", uri=uri, domain="u0-backup")
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.activate_readonly", uri=uri, domain="u0-backup")
    assert e.value.name == "Volume_in_use"
    call(RAW, "Datapath.detach", uri=uri, domain="u0-backup")
    call(RAW, "Datapath.deactivate", uri=uri, domain="3")
    call(RAW, "Datapath.deactivate", uri=uri, domain="3")
    call(RAW, "Datapath.detach", uri=uri, domain="3")
    call(RAW, "Datapath.detach", uri=uri, domain="3")
    call(RAW, "Datapath.close", uri=uri)
    # the data is in the zvol itself
    assert pread("/dev/zvol/%s/zfs-ng/%s" % (sr, key), 3 * MiB, MiB) == data


def test_unknown_volume_is_a_clean_error(sr):
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.attach", uri="%s://%s/%s" % (RAW, sr, "0f8fad5b-d9cb-469f-a165-"
                                                         "70867728950e"), domain="3")
    assert e.value.name == "Volume_does_not_exist"
    # detach of something never attached still succeeds
    assert call(RAW, "Datapath.detach", uri="%s://%s/nothing" % (RAW, sr), domain="3") is None


def test_snapshot_many_concurrent_readonly_attaches(sr):
    key = make_volume(run, sr)
    vol = "/dev/zvol/%s/zfs-ng/%s" % (sr, key)
    wait_for_path(vol)
    before = pattern(2, MiB)
    pwrite(vol, 0, before)
    skey = make_snapshot(run, sr, key)
    pwrite(vol, 0, pattern(3, MiB))   # the snapshot must not see this
    uri = "%s://%s/%s" % (RAW, sr, skey)
    domains = ["u0-nbd%d" % i for i in range(6)]

    def attach_activate(d):
        res = call(RAW, "Datapath.attach", uri=uri, domain=d)
        call(RAW, "Datapath.activate_readonly", uri=uri, domain=d)
        return impl(res, "BlockDevice")["path"]

    with concurrent.futures.ThreadPoolExecutor(len(domains)) as ex:
        devs = list(ex.map(attach_activate, domains))
    assert len(set(devs)) == 1, devs           # one shared read-only clone
    dev = devs[0]
    assert dev == "/dev/zvol/%s/zfs-ng/ro-%s" % (sr, skey)
    assert pread(dev, 0, MiB) == before
    with pytest.raises(OSError):
        pwrite(dev, 0, b"x" * 4096)
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.activate", uri=uri, domain="9")
    assert e.value.name == "Not_attached"
    call(RAW, "Datapath.attach", uri=uri, domain="9")
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.activate", uri=uri, domain="9")
    assert e.value.name == "Volume_read_only"
    with concurrent.futures.ThreadPoolExecutor(len(domains)) as ex:
        list(ex.map(lambda d: call(RAW, "Datapath.detach", uri=uri, domain=d), domains + ["9"]))
    assert not zfs_exists("%s/zfs-ng/ro-%s" % (sr, skey))


def test_non_persistent_reset_by_zfs(sr):
    key = make_volume(run, sr)
    vol = "/dev/zvol/%s/zfs-ng/%s" % (sr, key)
    wait_for_path(vol)
    orig = pattern(4, MiB)
    pwrite(vol, MiB, orig)
    uri = "%s://%s/%s" % (RAW, sr, key)
    call(RAW, "Datapath.open", uri=uri, persistent=False)
    call(RAW, "Datapath.open", uri=uri, persistent=False)    # repeatable
    res = call(RAW, "Datapath.attach", uri=uri, domain="5")
    dev = impl(res, "BlockDevice")["path"]
    assert dev != vol                                        # the guest writes to a clone
    call(RAW, "Datapath.activate", uri=uri, domain="5")
    assert pread(dev, MiB, MiB) == orig
    pwrite(dev, MiB, pattern(5, MiB))
    assert pread(dev, MiB, MiB) == pattern(5, MiB)
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.close", uri=uri)                 # still attached
    assert e.value.name == "Volume_in_use"
    call(RAW, "Datapath.deactivate", uri=uri, domain="5")
    call(RAW, "Datapath.detach", uri=uri, domain="5")
    call(RAW, "Datapath.close", uri=uri)
    call(RAW, "Datapath.close", uri=uri)
    assert pread(vol, MiB, MiB) == orig
    out = run("zfs", "list", "-H", "-o", "name", "-t", "all", "-r", "%s/zfs-ng" % sr).stdout
    assert "np-" not in out, out
