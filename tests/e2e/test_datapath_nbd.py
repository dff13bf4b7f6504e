"""zfsng-nbd in the VM: the project's NBD server per attached volume, each
attachment a kernel NBD device for blkback (XCP-ng 8.3 has no qdisk backend:
xenopsd hands the backend the BlockDevice path, xenops_server_xen.ml
params_of_backend), data crossing paths (zvol <-> NBD), snapshots read-only."""

import os
import subprocess

import nbd
import pytest

from dp_helpers import (PluginError, call, impl, make_snapshot, make_volume, pattern, pread,
                        pwrite, uri_of, zfs_exists)

NBD = "zfsng-nbd"
RAW = "zfsng-raw"
MiB = 1 << 20


@pytest.fixture
def sr_configuration():
    """The `sr` of these tests (tests/e2e/conftest.py) publishes NBD first."""
    return {"datapath": "nbd"}


def nbd_handle(link):
    # nbd:unix:<sock>:exportname=<name>  (qemu's legacy syntax, what xapi returns)
    assert link.startswith("nbd:unix:")
    sock, _, name = link[len("nbd:unix:"):].rpartition(":exportname=")
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


def test_nbd_attach_cross_path_and_detach(sr):
    vol = make_volume(sr)
    uri, raw = uri_of(vol, NBD), uri_of(vol, RAW)
    assert vol["uri"][0] == uri                        # the SR's datapath=nbd comes first
    dev = impl(call(RAW, "Datapath.attach", uri=raw, domain="u0_raw"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=raw, domain="u0_raw")
    pwrite(dev, 0, pattern(10, MiB))                   # written on the zvol...
    call(RAW, "Datapath.deactivate", uri=raw, domain="u0_raw")
    res = call(NBD, "Datapath.attach", uri=uri, domain="4")
    link = impl(res, "Nbd")["uri"]
    kdev = impl(res, "BlockDevice")["path"]
    assert kdev.startswith("/dev/nbd")
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": kdev, "extra": {}}
    assert call(NBD, "Datapath.attach", uri=uri, domain="4") == res
    call(NBD, "Datapath.activate", uri=uri, domain="4")
    assert pread(kdev, 0, MiB) == pattern(10, MiB)    # the kernel client reads the zvol
    pwrite(kdev, 7 * MiB, pattern(17, MiB))
    assert pread(dev, 7 * MiB, MiB) == pattern(17, MiB)
    h = nbd_handle(link)
    assert h.get_size() == 64 * MiB
    assert h.pread(MiB, 0) == pattern(10, MiB)        # ...read over NBD
    h.pwrite(pattern(11, MiB), 5 * MiB)                # written over NBD...
    h.flush()
    h.shutdown()
    assert pread(dev, 5 * MiB, MiB) == pattern(11, MiB)  # ...read on the zvol
    sock = link[len("nbd:unix:"):].rpartition(":exportname=")[0]
    call(NBD, "Datapath.detach", uri=uri, domain="4")
    assert not os.path.exists(sock)    # server stopped with the last NBD detach (raw remains)
    assert subprocess.run(["nbd-client", "-check", kdev]).returncode == 1   # disconnected
    call(RAW, "Datapath.detach", uri=raw, domain="u0_raw")


def test_nbd_snapshot_read_only_for_several_domains(sr):
    vol = make_volume(sr)
    raw = uri_of(vol, RAW)
    dev = impl(call(RAW, "Datapath.attach", uri=raw, domain="3"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=raw, domain="3")
    pwrite(dev, 0, pattern(12, MiB))
    snap = make_snapshot(sr, vol["key"])
    pwrite(dev, 0, pattern(13, MiB))
    uri = uri_of(snap, NBD)
    links, kdevs = set(), set()
    for d in ("u0_a", "u0_b"):
        res = call(NBD, "Datapath.attach", uri=uri, domain=d)
        links.add(impl(res, "Nbd")["uri"])
        kdevs.add(impl(res, "BlockDevice")["path"])
        call(NBD, "Datapath.activate_readonly", uri=uri, domain=d)
    assert len(links) == 1                             # one server for the volume
    assert len(kdevs) == 2                             # a kernel device per attachment
    for kdev in kdevs:
        assert pread(kdev, 0, MiB) == pattern(12, MiB)
        with pytest.raises(OSError):
            pwrite(kdev, 0, b"x" * 4096)               # read-only device
    h = nbd_handle(links.pop())
    assert h.is_read_only()
    assert h.pread(MiB, 0) == pattern(12, MiB)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    with pytest.raises(PluginError) as e:
        call(NBD, "Datapath.activate", uri=uri, domain="u0_a")
    assert e.value.name == "Activation_mode_conflict"
    for d in ("u0_a", "u0_b"):
        call(NBD, "Datapath.detach", uri=uri, domain=d)
    assert not zfs_exists("%s/zfs-ng/ro-%s" % (sr, snap["key"]))
    call(RAW, "Datapath.detach", uri=raw, domain="3")


def nbdinfo_map(link):
    """`nbdinfo --map` over the datapath's socket: [(offset, length, type)]."""
    sock, _, name = link[len("nbd:unix:"):].rpartition(":exportname=")
    out = subprocess.run(["nbdinfo", "--map", "nbd+unix:///%s?socket=%s" % (name, sock)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return [tuple(int(x) for x in l.split()[:3]) for l in out.splitlines() if l.strip()]


def test_nbd_snapshot_export_has_the_zfs_allocation_map(sr):
    vol = make_volume(sr)
    raw = uri_of(vol, RAW)
    dev = impl(call(RAW, "Datapath.attach", uri=raw, domain="3"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=raw, domain="3")
    pwrite(dev, 0, pattern(14, MiB))
    pwrite(dev, 8 * MiB, pattern(15, 2 * MiB))
    snap = make_snapshot(sr, vol["key"])
    pwrite(dev, 20 * MiB, pattern(16, MiB))        # after the snapshot: not in its map
    suri = uri_of(snap, NBD)
    link = impl(call(NBD, "Datapath.attach", uri=suri, domain="u0_backup"), "Nbd")["uri"]
    call(NBD, "Datapath.activate_readonly", uri=suri, domain="u0_backup")
    HOLE = 3                                       # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert nbdinfo_map(link) == [(0, MiB, 0), (MiB, 7 * MiB, HOLE), (8 * MiB, 2 * MiB, 0),
                                 (10 * MiB, 54 * MiB, HOLE)]
    h = nbd_handle(link)
    assert h.pread(MiB, 8 * MiB) == pattern(15, MiB)
    assert h.pread(MiB, 20 * MiB) == b"\0" * MiB   # the holes really read as zeros
    h.shutdown()
    # the live volume's export changes under the client: no map, all data
    ldev = impl(call(NBD, "Datapath.attach", uri=uri_of(vol, NBD), domain="u0_live"),
                "Nbd")["uri"]
    assert nbdinfo_map(ldev) == [(0, 64 * MiB, 0)]
    call(NBD, "Datapath.detach", uri=uri_of(vol, NBD), domain="u0_live")
    sock = link[len("nbd:unix:"):].rpartition(":exportname=")[0]
    amap = sock[:-len(".sock")] + ".alloc.json"
    assert os.path.exists(amap)
    call(NBD, "Datapath.detach", uri=suri, domain="u0_backup")
    assert not os.path.exists(amap) and not os.path.exists(sock)
    call(RAW, "Datapath.detach", uri=raw, domain="3")
