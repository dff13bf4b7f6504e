"""nvme+tcp in the VM: our NVMe/TCP target on the storage node, the kernel
initiator on the attaching "hosts".  The node and the hosts are one VM: each
host has its own host NQN (and host id) and its own attachment state
(ZFSNG_RUN_DIR), the node keeps its own (/run/zfs-ng/node)."""

import os

import pytest

from conftest import make_file_vdevs, run
from dp_helpers import (PluginError, call, destroy_pool, impl, make_snapshot, make_sr,
                        make_volume, pattern, pread, pwrite, serving_target, uri_of)
from plugins.datapath import nvme_host

NVME = "nvme+tcp"
RAW = "zfsng-raw"
NBD = "zfsng-nbd"
PORT = 4421
SOCK = "/run/zfs-ng/dp-target.sock"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
HOST_A = "nqn.2014-08.org.zfs-ng:test-host-a"
HOST_B = "nqn.2014-08.org.zfs-ng:test-host-b"
TARGET_ENV = {"ZFSNG_TARGET_SOCKET": SOCK}


def host(name, nqn):
    return dict(TARGET_ENV, ZFSNG_RUN_DIR="/run/zfsng-%s" % name, ZFSNG_HOSTNQN=nqn)


A = host("host-a", HOST_A)
B = host("host-b", HOST_B)


@pytest.fixture(scope="module")
def node():
    """An SR whose volumes publish nvme+tcp URIs first, and the target serving them."""
    vdev = make_file_vdevs(1, 1 << 30)[0]
    pool = make_sr(vdev, **{"nvme-node": "127.0.0.1:%d" % PORT, "datapath": "nvme"})
    state = "/var/lib/zfsng-test/dp-target.db"
    with serving_target("127.0.0.1:%d" % PORT, state, SOCK):
        os.environ["ZFSNG_TARGET_SOCKET"] = SOCK   # for the node ops run in this process
        yield pool
    destroy_pool(pool)
    os.unlink(vdev)


def fio(dev, *args):
    return run("fio", "--ioengine=libaio", "--direct=1", "--verify_state_save=0",
               "--randseed=7", "--filename=" + dev, *args)


def test_remote_attach_fio_verify_cross_paths_and_revoke(node):
    vol = make_volume(node)
    uri = uri_of(vol, NVME)
    assert vol["uri"][0] == uri
    assert uri == "nvme+tcp://127.0.0.1:%d/nqn.2014-08.org.zfs-ng:%s:%s" % (
        PORT, uri.split(":")[-2], vol["key"])
    subnqn = uri.split("/", 3)[3]
    # data written locally on the node (raw datapath)...
    raw = uri_of(vol, RAW)
    rdev = impl(call(RAW, "Datapath.attach", uri=raw, domain="u0_local"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=raw, domain="u0_local")
    pwrite(rdev, 0, pattern(20, MiB))
    call(RAW, "Datapath.detach", uri=raw, domain="u0_local")

    res = call(NVME, "Datapath.attach", uri=uri, domain="7", env=A)
    dev = impl(res, "BlockDevice")["path"]
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert dev.startswith("/dev/nvme")
    # found by identity: the namespace uuid is the volume's key
    assert nvme_host.normalize_id(open("/sys/class/block/%s/uuid" % os.path.basename(dev))
                                  .read()) == vol["key"].replace("-", "")
    assert call(NVME, "Datapath.attach", uri=uri, domain="7", env=A) == res
    call(NVME, "Datapath.activate", uri=uri, domain="7", env=A)
    assert pread(dev, 0, MiB) == pattern(20, MiB)   # ...read remotely over NVMe/TCP
    fio(dev, "--name=verify", "--rw=randwrite", "--bs=16k", "--offset=8M", "--size=16M",
        "--iodepth=8", "--verify=crc32c", "--do_verify=1")
    pwrite(dev, 40 * MiB, pattern(21, MiB))           # written remotely...
    # a host that was never granted is refused by the target
    with pytest.raises(nvme_host.NvmeError):
        nvme_host.connect("127.0.0.1", PORT, subnqn, "nqn.2014-08.org.zfs-ng:never-granted")
    call(NVME, "Datapath.deactivate", uri=uri, domain="7", env=A)
    call(NVME, "Datapath.detach", uri=uri, domain="7", env=A)
    call(NVME, "Datapath.detach", uri=uri, domain="7", env=A)
    assert not os.path.exists(dev) or nvme_host.find_namespace(vol["key"]) is None
    assert nvme_host.controllers(subnqn, HOST_A) == []
    # ...read on the node over NBD
    import nbd
    link = impl(call(NBD, "Datapath.attach", uri=uri_of(vol, NBD), domain="u0_n"), "Nbd")["uri"]
    sock, _, name = link[len("nbd:unix:"):].rpartition(":exportname=")
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    assert h.pread(MiB, 40 * MiB) == pattern(21, MiB)
    h.shutdown()
    call(NBD, "Datapath.detach", uri=uri_of(vol, NBD), domain="u0_n")
    # host A was revoked with its detach: connecting by hand is refused now
    with pytest.raises(nvme_host.NvmeError):
        nvme_host.connect("127.0.0.1", PORT, subnqn, HOST_A)


def test_activated_on_another_host(node):
    vol = make_volume(node)
    uri = uri_of(vol, NVME)
    call(NVME, "Datapath.attach", uri=uri, domain="3", env=A)
    call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    dev_b = impl(call(NVME, "Datapath.attach", uri=uri, domain="4", env=B), "BlockDevice")["path"]
    for m in ("Datapath.activate", "Datapath.activate_readonly"):
        with pytest.raises(PluginError) as e:
            call(NVME, m, uri=uri, domain="4", env=B)
        assert e.value.name == "Activated_on_another_host"
        assert e.value.params[1] == HOST_A
    call(NVME, "Datapath.deactivate", uri=uri, domain="3", env=A)
    call(NVME, "Datapath.activate", uri=uri, domain="4", env=B)    # migrated
    pwrite(dev_b, 0, pattern(22, 64 * 1024))
    with pytest.raises(PluginError) as e:
        call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    assert e.value.name == "Activated_on_another_host"
    call(NVME, "Datapath.detach", uri=uri, domain="3", env=A)
    call(NVME, "Datapath.detach", uri=uri, domain="4", env=B)


def read_all(dev):
    """Every byte of a block device, read to its end."""
    with open(dev, "rb", buffering=0) as f:
        chunks = iter(lambda: f.read(MiB), b"")
        return b"".join(chunks)


def test_snapshot_read_only_on_two_hosts(node):
    """Two hosts read a snapshot read-only, the whole of it through their
    devices: a never-written volume's snapshot is all zeros; a written
    volume's is the data at the snapshot (not zeros, not what was written
    after it)."""
    size = 8 * MiB
    blank = make_volume(node, size=size)
    vol = make_volume(node, size=size)
    raw = uri_of(vol, RAW)
    rdev = impl(call(RAW, "Datapath.attach", uri=raw, domain="u0_local"), "BlockDevice")["path"]
    call(RAW, "Datapath.activate", uri=raw, domain="u0_local")
    data = pattern(23, size)
    pwrite(rdev, 0, data)
    written = make_snapshot(node, vol["key"])
    pwrite(rdev, 0, pattern(24, MiB))                  # after the snapshot: not in it
    call(RAW, "Datapath.detach", uri=raw, domain="u0_local")
    for snap, want in ((make_snapshot(node, blank["key"]), bytes(size)), (written, data)):
        suri = uri_of(snap, NVME)
        da = impl(call(NVME, "Datapath.attach", uri=suri, domain="u0_a", env=A),
                  "BlockDevice")["path"]
        db = impl(call(NVME, "Datapath.attach", uri=suri, domain="u0_b", env=B),
                  "BlockDevice")["path"]
        call(NVME, "Datapath.activate_readonly", uri=suri, domain="u0_a", env=A)
        call(NVME, "Datapath.activate_readonly", uri=suri, domain="u0_b", env=B)
        got_a, got_b = read_all(da), read_all(db)
        assert len(got_a) == len(got_b) == size, (len(got_a), len(got_b))
        assert got_a == want, snap
        assert got_b == want, snap
        with pytest.raises(PluginError) as e:
            call(NVME, "Datapath.activate", uri=suri, domain="u0_a", env=A)
        assert e.value.name in ("Activation_mode_conflict", "Volume_read_only")
        call(NVME, "Datapath.detach", uri=suri, domain="u0_a", env=A)
        call(NVME, "Datapath.detach", uri=suri, domain="u0_b", env=B)
        out = run("zfs", "list", "-H", "-o", "name", "-t", "volume", "-r", node).stdout
        assert "ro-" + snap["key"] not in out
