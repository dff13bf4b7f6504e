"""Our NVMe/TCP target under data load from the real Linux initiator: fio
--verify at 4K random and 128K sequential with several jobs, with and without
header/data digests, xfs on several volumes at once, and a target restart
under fio load with the host reconnecting by itself and no data lost.
(Split from test_nvmeof.py to keep each VM file short under TCG.)"""

import hashlib
import json
import os
import subprocess
import time

from conftest import run
from nvmeof_target.control import Client
from user_target import FIO, SOCK, Vol, cli, fio, pool_fixture, target_fixture

pool, target = pool_fixture("nvt"), target_fixture()


def test_fio_verify_random_and_sequential_with_digests(pool, target):
    v = Vol(pool, "fio", size="256M")
    dev = v.connect()
    try:
        fio(dev, "--name=rand4k", "--rw=randwrite", "--bs=4k", "--size=4m", "--iodepth=16",
            "--numjobs=2", "--offset_increment=32m", "--verify=crc32c", "--do_verify=1")
        fio(dev, "--name=seq128k", "--rw=write", "--bs=128k", "--size=8m", "--iodepth=4",
            "--numjobs=2", "--offset_increment=64m", "--offset=128m", "--verify=crc32c",
            "--do_verify=1")
        fio(dev, "--name=read", "--rw=randread", "--bs=4k", "--size=16m", "--iodepth=32",
            "--runtime=2", "--time_based")
    finally:
        v.disconnect()
    # the 4K reads went by O_DIRECT AIO on the zvol (aio.py), none redone synchronously
    st = Client(SOCK).stats()
    assert st["aio"] and st["aio_reads"] >= 2048 and st["aio_redone"] == 0, st
    # same volume again with header and data digests
    dev = v.connect("--hdr-digest", "--data-digest")
    try:
        fio(dev, "--name=rand4k", "--rw=randwrite", "--bs=4k", "--size=2m", "--iodepth=8",
            "--verify=crc32c", "--do_verify=1")
        fio(dev, "--name=seq128k", "--rw=write", "--bs=128k", "--size=4m", "--iodepth=4",
            "--offset=64m", "--verify=crc32c", "--do_verify=1")
    finally:
        v.disconnect()


def test_several_volumes_xfs_and_checksums(pool, target):
    vols = [Vol(pool, "multi%d" % i, size="320M") for i in range(3)]   # xfs needs 300 MB
    devs = [v.connect() for v in vols]
    mounts = []
    try:
        assert len(set(devs)) == 3
        sums = {}
        for i, dev in enumerate(devs):
            run("mkfs.xfs", "-q", "-f", dev)
            mnt = "/mnt/nvt%d" % i
            os.makedirs(mnt, exist_ok=True)
            run("mount", dev, mnt)
            mounts.append(mnt)
            data = os.urandom(1 << 20) + bytes([i])
            with open(os.path.join(mnt, "f"), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            sums[mnt] = hashlib.sha256(data).hexdigest()
        for mnt in mounts:
            run("umount", mnt)
        run("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        for i, dev in enumerate(devs):
            run("mount", dev, mounts[i])
            with open(os.path.join(mounts[i], "f"), "rb") as f:
                assert hashlib.sha256(f.read()).hexdigest() == sums[mounts[i]]
            run("umount", mounts[i])
        mounts = []
        stats = json.loads(cli("stats", "--json").stdout)
        assert stats["live_subsystems"] >= 3
    finally:
        for mnt in mounts:
            subprocess.run(["umount", mnt])
        for v in vols:
            v.disconnect()


def test_restart_under_fio_load_host_reconnects(pool, target):
    v = Vol(pool, "restart", size="128M")
    dev = v.connect("--reconnect-delay=1", "--ctrl-loss-tmo=120")
    try:
        # rate-limited so fio is surely still writing when the target goes away
        job = ["--name=restart", "--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=8",
               "--rate=512k", "--verify=crc32c", "--do_verify=0"]
        load = subprocess.Popen(FIO + ["--filename=" + dev] + job, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, universal_newlines=True)
        time.sleep(3)
        assert load.poll() is None, "fio finished before the restart: make it longer"
        assert target.stop() == 0
        time.sleep(2)
        target.start()
        out, _ = load.communicate(timeout=180)
        assert load.returncode == 0, out
        fio(dev, *([a for a in job[:-1] if not a.startswith("--rate")] + ["--verify_only=1"]))
    finally:
        v.disconnect()
