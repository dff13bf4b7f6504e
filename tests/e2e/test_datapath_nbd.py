"""zfsng-nbd in the VM: the project's NBD server per attached volume, data
crossing paths (zvol <-> NBD), snapshots read-only over NBD."""

import os

import nbd
import pytest

from conftest import run, wait_for_path
from dp_helpers import (PluginError, call, impl, make_snapshot, make_sr, make_volume, pattern,
                        pread, pwrite, zfs_exists)

NBD = "zfsng-nbd"
MiB = 1 << 20


@pytest.fixture
def sr(zpool):
    return make_sr(run, zpool)


def nbd_handle(link):
    # nbd:unix:<sock>:exportname=<name>  (qemu's legacy syntax, what xapi returns)
    assert link.startswith("nbd:unix:")
    sock, _, name = link[len("nbd:unix:"):].rpartition(":exportname=")
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    return h


def test_nbd_attach_cross_path_and_detach(sr):
    key = make_volume(run, sr)
    vol = wait_for_path("/dev/zvol/%s/zfs-ng/%s" % (sr, key))
    pwrite(vol, 0, pattern(10, MiB))                 # written on the zvol...
    uri = "%s://%s/%s" % (NBD, sr, key)
    res = call(NBD, "Datapath.attach", uri=uri, domain="4")
    link = impl(res, "Nbd")["uri"]
    assert impl(res, "XenDisk") == {"backend_type": "qdisk", "params": link, "extra": {}}
    assert call(NBD, "Datapath.attach", uri=uri, domain="4") == res
    call(NBD, "Datapath.activate", uri=uri, domain="4")
    h = nbd_handle(link)
    assert h.get_size() == 64 * MiB
    assert h.pread(MiB, 0) == pattern(10, MiB)      # ...read over NBD
    h.pwrite(pattern(11, MiB), 5 * MiB)              # written over NBD...
    h.flush()
    h.shutdown()
    assert pread(vol, 5 * MiB, MiB) == pattern(11, MiB)  # ...read on the zvol
    sock = link[len("nbd:unix:"):].rpartition(":exportname=")[0]
    call(NBD, "Datapath.deactivate", uri=uri, domain="4")
    call(NBD, "Datapath.detach", uri=uri, domain="4")
    call(NBD, "Datapath.detach", uri=uri, domain="4")
    assert not os.path.exists(sock)                  # server stopped with the last detach


def test_nbd_snapshot_read_only_for_several_domains(sr):
    key = make_volume(run, sr)
    vol = wait_for_path("/dev/zvol/%s/zfs-ng/%s" % (sr, key))
    pwrite(vol, 0, pattern(12, MiB))
    skey = make_snapshot(run, sr, key)
    pwrite(vol, 0, pattern(13, MiB))
    uri = "%s://%s/%s" % (NBD, sr, skey)
    links = set()
    for d in ("u0-a", "u0-b", "u0-c"):
        links.add(impl(call(NBD, "Datapath.attach", uri=uri, domain=d), "Nbd")["uri"])
        call(NBD, "Datapath.activate_readonly", uri=uri, domain=d)
    assert len(links) == 1                            # one server for the volume
    h = nbd_handle(links.pop())
    assert h.is_read_only()
    assert h.pread(MiB, 0) == pattern(12, MiB)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    with pytest.raises(PluginError) as e:
        call(NBD, "Datapath.activate", uri=uri, domain="u0-a")
    assert e.value.name == "Activation_mode_conflict"
    for d in ("u0-a", "u0-b", "u0-c"):
        call(NBD, "Datapath.detach", uri=uri, domain=d)
    assert not zfs_exists("%s/zfs-ng/ro-%s" % (sr, skey))
