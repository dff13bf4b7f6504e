"""nbd_server against the Linux kernel NBD client on a real zvol: the path a
dom0 attach takes (nbd-client handshake, kernel transmission, simple replies)."""

import os
import subprocess
import time

import pytest

from conftest import run, wait_for_path
from nbd_server import run as nbd_run

MiB = 1 << 20


def nbd_size(dev):
    with open("/sys/block/%s/size" % os.path.basename(dev)) as f:
        return int(f.read()) * 512


def read_at(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def disconnect(dev, check=True):
    # Let udev's probe of the new device finish first: a probe cut by the
    # disconnect logs I/O errors that are not the server's.
    subprocess.run(["udevadm", "settle", "--timeout=10"])
    run("nbd-client", "-d", dev, check=check)


@pytest.fixture
def nbd_server(tmp_path):
    started = []

    def start(exports, sock):
        pid = nbd_run.start(exports, unix_path=sock, log_path=str(tmp_path / "nbd.log"))
        started.append((pid, sock))
        return pid

    yield start
    for pid, sock in started:
        nbd_run.stop(pid)
        assert not os.path.exists(sock), "server left its socket behind"
    with open(str(tmp_path / "nbd.log")) as f:
        log = f.read()
    assert "Traceback" not in log, log


@pytest.fixture
def attach():
    devs = []

    def connect(sock, name, dev, *extra):
        run("nbd-client", "-unix", sock, dev, "-N", name, *extra)
        devs.append(dev)
        return dev

    yield connect
    for dev in devs:
        disconnect(dev, check=False)


def test_kernel_client_writes_flushes_discards_on_a_zvol(zpool, nbd_server, attach):
    vol = "%s/vol" % zpool
    run("zfs", "create", "-V", "64M", "-o", "volblocksize=16k", "-o", "snapdev=visible", vol)
    zdev = wait_for_path("/dev/zvol/" + vol)
    sock = "/run/zfsng-nbd-e2e.sock"
    nbd_server([{"name": "vol", "path": zdev}], sock)
    dev = attach(sock, "vol", "/dev/nbd0")
    assert nbd_size(dev) == 64 * MiB

    data = os.urandom(MiB)
    fd = os.open(dev, os.O_RDWR)
    try:
        os.pwrite(fd, data, 8 * MiB)
        os.fsync(fd)                    # the kernel sends NBD_CMD_FLUSH
    finally:
        os.close(fd)
    assert read_at(zdev, 8 * MiB, MiB) == data

    # After the flush the data is in ZFS itself: a snapshot holds it.
    run("zfs", "snapshot", vol + "@s1")
    sdev = wait_for_path("/dev/zvol/%s@s1" % vol)
    sock2 = "/run/zfsng-nbd-e2e-snap.sock"
    nbd_server([{"name": "snap", "path": sdev, "readonly": True}], sock2)
    sn = attach(sock2, "snap", "/dev/nbd1", "-readonly")
    assert read_at(sn, 8 * MiB, MiB) == data

    # Discard through the kernel client (NBD_CMD_TRIM) frees it on the zvol.
    run("blkdiscard", "-o", str(8 * MiB), "-l", str(MiB), dev)
    assert read_at(zdev, 8 * MiB, MiB) == bytes(MiB)
    assert read_at(sn, 8 * MiB, MiB) == data        # the snapshot keeps it


def test_volume_outlives_clients_and_server_restarts(zpool, nbd_server, attach):
    vol = "%s/vol2" % zpool
    run("zfs", "create", "-V", "16M", vol)
    zdev = wait_for_path("/dev/zvol/" + vol)
    sock = "/run/zfsng-nbd-e2e2.sock"
    pid = nbd_server([{"name": "v", "path": zdev}], sock)
    dev = attach(sock, "v", "/dev/nbd2")
    run("dd", "if=/dev/zero", "of=" + dev, "bs=64k", "count=16", "oflag=direct")
    pattern = b"zfs-ng!!" * 8192
    fd = os.open(dev, os.O_RDWR)
    os.pwrite(fd, pattern, MiB)
    os.fsync(fd)
    os.close(fd)
    disconnect(dev)
    nbd_run.stop(pid)
    # The volume holds no fd once the server is gone: it can be renamed/destroyed.
    time.sleep(0.2)
    run("zfs", "rename", vol, vol + "x")
    assert read_at(wait_for_path("/dev/zvol/%sx" % vol), MiB, len(pattern)) == pattern


def test_kernel_multi_conn_with_workers_fio_verify(zpool, attach, tmp_path):
    # Two kernel connections (CAN_MULTI_CONN), four workers each, QD16 random
    # writes verified by fio: out-of-order replies and shared-backend flushes.
    vol = "%s/vol3" % zpool
    run("zfs", "create", "-V", "32M", "-o", "volblocksize=16k", vol)
    zdev = wait_for_path("/dev/zvol/" + vol)
    sock = "/run/zfsng-nbd-e2e3.sock"
    nbd_run_pid = nbd_run.start([{"name": "v", "path": zdev}], unix_path=sock, workers=4,
                                log_path=str(tmp_path / "nbd-w.log"))
    try:
        dev = attach(sock, "v", "/dev/nbd3", "-C", "2")
        run("fio", "--name=verify", "--filename=" + dev, "--rw=randwrite", "--bs=4k",
            "--size=8M", "--ioengine=libaio", "--direct=1", "--iodepth=16", "--verify=crc32c",
            "--verify_state_save=0", "--do_verify=1", cwd="/tmp")
        disconnect(dev)
    finally:
        nbd_run.stop(nbd_run_pid)
    with open(str(tmp_path / "nbd-w.log")) as f:
        assert "Traceback" not in f.read()
