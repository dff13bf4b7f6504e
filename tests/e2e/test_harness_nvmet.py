"""Proves the test VM with real peers: a file-backed zpool, a sparse zvol,
exported by the kernel's own nvmet-tcp, discovered and connected by nvme-cli
over loopback, and checked end to end by fio --verify.  Also shows that the
check can fail: a block corrupted behind fio's back makes verification fail."""

import json
import subprocess

import pytest

from conftest import run, wait_for_path
from kernel_nvmet import KernelTarget, connect, disconnect, find_namespace

FIO_COMMON = ["--name=smoke", "--ioengine=libaio", "--direct=1", "--bs=4k", "--size=8m",
              "--iodepth=8", "--rw=randwrite", "--verify=crc32c", "--randseed=1234",
              "--verify_state_save=0"]


@pytest.fixture
def exported_zvol(zpool):
    run("zfs", "create", "-s", "-V", "256M", "-o", "volblocksize=16K", zpool + "/smoke")
    zvol = wait_for_path("/dev/zvol/%s/smoke" % zpool)
    with KernelTarget(zvol, port=4420) as target:
        yield zpool, zvol, target


def test_zvol_is_sparse_and_lz4(exported_zvol):
    zpool, _, _ = exported_zvol
    out = run("zfs", "get", "-H", "-p", "-o", "property,value",
              "refreservation,compression,volsize", zpool + "/smoke").stdout
    props = dict(line.split("\t") for line in out.splitlines())
    assert props == {"refreservation": "0", "compression": "lz4", "volsize": str(256 << 20)}


def test_kernel_nvmet_discover_connect_fio_verify(exported_zvol):
    zpool, zvol, target = exported_zvol
    disc = run("nvme", "discover", "-t", "tcp", "-a", "127.0.0.1", "-s", "4420",
               "-o", "json").stdout
    assert target.nqn in [r["subnqn"] for r in json.loads(disc)["records"]]
    connect(target.nqn, 4420)
    try:
        dev = find_namespace(target.ns_uuid)
        run("fio", "--filename=" + dev, *FIO_COMMON, "--do_verify=1")
        # Now write again without verifying, corrupt one 4K block of what fio
        # wrote, and check that verification catches it.
        run("fio", "--filename=" + dev, *FIO_COMMON, "--do_verify=0")
        run("fio", "--filename=" + dev, *FIO_COMMON, "--verify_only=1")
        with open(zvol, "r+b", buffering=0) as f:
            f.seek(0)
            blocks = [f.read(4096) for _ in range(8 << 8)]
            victim = next(i for i, b in enumerate(blocks) if b.strip(b"\0"))
            f.seek(victim * 4096 + 100)
            f.write(b"corrupted!")
            f.flush()
        subprocess.run(["sync"])
        subprocess.run(["blockdev", "--flushbufs", dev])
        bad = subprocess.run(["fio", "--filename=" + dev] + FIO_COMMON + ["--verify_only=1"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True)
        assert bad.returncode != 0, "fio verify did not notice a corrupted block"
        assert "verify" in bad.stdout.lower()
    finally:
        disconnect(target.nqn)
