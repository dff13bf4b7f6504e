"""zfsng-raw in the VM: SR and volumes made by the volume plugin, every call
through the plugin executables as xapi-storage-script makes it.  The VM has
no tap-ctl: the documented blkback fallback is what runs here."""

import concurrent.futures
import os
import subprocess

import pytest

from dp_helpers import (PluginError, call, impl, make_snapshot, make_volume, pattern, pread,
                        pwrite, uri_of, vol_call, volmode_local, zfs_exists)

RAW = "zfsng-raw"
MiB = 1 << 20


def test_attach_activate_write_detach(sr):
    vol = make_volume(sr)
    key, uri = vol["key"], uri_of(vol, RAW)
    assert vol["uri"][0] == uri                       # the default datapath comes first
    ds = "%s/zfs-ng/%s" % (sr, key)
    assert call(RAW, "Datapath.open", uri=uri, persistent=True) is None
    res = call(RAW, "Datapath.attach", uri=uri, domain="3")
    dev = impl(res, "BlockDevice")["path"]
    assert dev == "/dev/zvol/" + ds
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert volmode_local(ds) == "dev"                 # a minor only while attached
    assert call(RAW, "Datapath.attach", uri=uri, domain="3") == res     # idempotent
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    pwrite(dev, 3 * MiB, pattern(1, MiB))
    assert pread(dev, 3 * MiB, MiB) == pattern(1, MiB)
    # no read-only user while it is active read-write elsewhere
    call(RAW, "Datapath.attach", uri=uri, domain="u0_backup")
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.activate_readonly", uri=uri, domain="u0_backup")
    assert e.value.name == "Volume_in_use"
    call(RAW, "Datapath.detach", uri=uri, domain="u0_backup")
    assert volmode_local(ds) == "dev"                 # domain 3 still has it
    call(RAW, "Datapath.deactivate", uri=uri, domain="3")
    call(RAW, "Datapath.detach", uri=uri, domain="3")
    call(RAW, "Datapath.detach", uri=uri, domain="3")
    call(RAW, "Datapath.close", uri=uri)
    assert volmode_local(ds) is None                  # back to idle: no minor


def _listed_usage(sr, key):
    return [v for v in vol_call("SR.ls", sr=sr) if v["key"] == key][0]["physical_utilisation"]


def test_sr_ls_reports_current_usage(sr):
    """xapi takes VDI usage from SR.ls (sr-scan), so SR.ls reports what the
    volume references now, not what the index held at create time: written
    while attached and after detach, without a Volume.stat in between."""
    vol = make_volume(sr)
    key, uri = vol["key"], uri_of(vol, RAW)
    ds = "%s/zfs-ng/%s" % (sr, key)
    before = _listed_usage(sr, key)
    assert before < MiB
    call(RAW, "Datapath.open", uri=uri, persistent=True)
    dev = impl(call(RAW, "Datapath.attach", uri=uri, domain="3"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    for i in range(8):                      # 8 MiB of incompressible data
        pwrite(dev, i * MiB, os.urandom(MiB))
    subprocess.run(["zpool", "sync", sr], check=True)
    while_attached = _listed_usage(sr, key)
    assert while_attached >= 8 * MiB, while_attached
    for i in range(8, 12):
        pwrite(dev, i * MiB, os.urandom(MiB))
    call(RAW, "Datapath.deactivate", uri=uri, domain="3")
    call(RAW, "Datapath.detach", uri=uri, domain="3")
    call(RAW, "Datapath.close", uri=uri)
    assert volmode_local(ds) is None
    after = _listed_usage(sr, key)
    assert after >= 12 * MiB, after
    assert after == vol_call("Volume.stat", sr=sr, key=key)["physical_utilisation"]
    assert _listed_usage(sr, key) == after   # read once more: nothing changed


def test_errors_are_clean(sr):
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.attach", uri="%s://%s/0f8fad5b-d9cb-469f-a165-70867728950e"
             % (RAW, sr), domain="3")
    assert e.value.name == "Volume_does_not_exist"
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.attach", uri="%s://nosuchpool/0f8fad5b-d9cb-469f-a165-70867728950e"
             % RAW, domain="3")
    assert e.value.name in ("Sr_not_attached", "SR_does_not_exist")
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.attach", uri="zfsng-raw://%s/$(reboot)" % sr, domain="3")
    assert e.value.name == "Invalid_parameters"
    # detach of something never attached, or of garbage, succeeds
    assert call(RAW, "Datapath.detach", uri="zfsng-raw://%s/nothing" % sr, domain="3") is None
    assert call(RAW, "Datapath.detach", uri="bogus", domain="3") is None


def test_snapshot_many_concurrent_readonly_attaches(sr):
    vol = make_volume(sr)
    uri = uri_of(vol, RAW)
    dev = impl(call(RAW, "Datapath.attach", uri=uri, domain="3"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=uri, domain="3")
    pwrite(dev, 0, pattern(2, MiB))
    snap = make_snapshot(sr, vol["key"])               # of a live, attached volume
    pwrite(dev, 0, pattern(3, MiB))                    # the snapshot must not see this
    suri = uri_of(snap, RAW)
    domains = ["u0_nbd%d" % i for i in range(4)]

    def attach_activate(d):
        res = call(RAW, "Datapath.attach", uri=suri, domain=d)
        call(RAW, "Datapath.activate_readonly", uri=suri, domain=d)
        return impl(res, "BlockDevice")["path"]

    with concurrent.futures.ThreadPoolExecutor(len(domains)) as ex:
        devs = list(ex.map(attach_activate, domains))
    assert len(set(devs)) == 1, devs                   # one shared read-only device
    sdev = devs[0]
    assert sdev == "/dev/zvol/%s/zfs-ng/ro-%s" % (sr, snap["key"])
    assert pread(sdev, 0, MiB) == pattern(2, MiB)
    with pytest.raises(OSError):
        pwrite(sdev, 0, b"x" * 4096)
    call(RAW, "Datapath.attach", uri=suri, domain="9")
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.activate", uri=suri, domain="9")
    assert e.value.name == "Volume_read_only"
    with concurrent.futures.ThreadPoolExecutor(len(domains)) as ex:
        list(ex.map(lambda d: call(RAW, "Datapath.detach", uri=suri, domain=d),
                    domains + ["9"]))
    assert not zfs_exists("%s/zfs-ng/ro-%s" % (sr, snap["key"]))
    call(RAW, "Datapath.detach", uri=uri, domain="3")


def test_non_persistent_reset_by_zfs(sr):
    vol = make_volume(sr)
    uri = uri_of(vol, RAW)
    dev = impl(call(RAW, "Datapath.attach", uri=uri, domain="2"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=uri, domain="2")
    pwrite(dev, MiB, pattern(4, MiB))
    call(RAW, "Datapath.detach", uri=uri, domain="2")

    call(RAW, "Datapath.open", uri=uri, persistent=False)
    npdev = impl(call(RAW, "Datapath.attach", uri=uri, domain="5"), "BlockDevice")["path"]
    assert npdev == "/dev/zvol/%s/zfs-ng/np-%s" % (sr, vol["key"])   # the guest writes a clone
    call(RAW, "Datapath.activate", uri=uri, domain="5")
    assert pread(npdev, MiB, MiB) == pattern(4, MiB)
    pwrite(npdev, MiB, pattern(5, MiB))
    assert pread(npdev, MiB, MiB) == pattern(5, MiB)
    with pytest.raises(PluginError) as e:
        call(RAW, "Datapath.close", uri=uri)                 # still attached
    assert e.value.name == "Volume_in_use"
    call(RAW, "Datapath.detach", uri=uri, domain="5")
    call(RAW, "Datapath.close", uri=uri)
    out = subprocess_names(sr)
    assert "np-" not in out, out
    dev = impl(call(RAW, "Datapath.attach", uri=uri, domain="6"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate_readonly", uri=uri, domain="6")
    assert pread(dev, MiB, MiB) == pattern(4, MiB)           # as it was at open
    call(RAW, "Datapath.detach", uri=uri, domain="6")


def subprocess_names(pool):
    import subprocess
    return subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", "all", "-r", pool],
                          stdout=subprocess.PIPE, universal_newlines=True).stdout
