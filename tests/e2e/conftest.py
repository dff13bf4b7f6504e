"""End-to-end tests: they run inside the test VM, against real ZFS and the
real kernel NVMe/TCP and NBD peers.  Run them with

    python3 tests/vm/vm.py pytest tests/e2e

Outside the VM they refuse to run rather than pretend.
"""

import os
import subprocess
import uuid

import pytest

if os.environ.get("ZFSNG_IN_VM") != "1":
    pytest.exit("tests/e2e runs inside the test VM: python3 tests/vm/vm.py pytest tests/e2e",
                returncode=4)

TEST_DIR = "/var/lib/zfsng-test"

# Each test's wall time (setup + call + teardown), written as it ends to the
# run folder the host reads (tests/vm/guest-run.sh exports the path).  A run
# stopped by vm.py's --timeout never reaches pytest's --durations table; from
# this file vm.py prints the slowest tests anyway (tests/vm/vm.py: slowest).
DURATIONS = os.environ.get("ZFSNG_DURATIONS")
_spent = {}


def pytest_runtest_logreport(report):
    _spent[report.nodeid] = _spent.get(report.nodeid, 0.0) + report.duration
    if report.when == "teardown" and DURATIONS:
        with open(DURATIONS, "a") as f:
            f.write("%.1f\t%s\n" % (_spent.pop(report.nodeid), report.nodeid))


@pytest.fixture(scope="session", autouse=True)
def image_dirs(tmp_path_factory):
    """Image files the NBD servers and targets of these tests export live under
    pytest's and tempfile's temporary directories and TEST_DIR: name them
    (blockio/volpath.py: otherwise only block devices are served)."""
    import tempfile
    from blockio.volpath import FILE_DIRS_ENV
    old = os.environ.get(FILE_DIRS_ENV)
    os.environ[FILE_DIRS_ENV] = os.pathsep.join(
        (str(tmp_path_factory.getbasetemp()), tempfile.gettempdir(), TEST_DIR))
    yield
    if old is None:
        os.environ.pop(FILE_DIRS_ENV, None)
    else:
        os.environ[FILE_DIRS_ENV] = old
# Blank virtio disks attached by tests/vm/vm.py (2 GiB each, sparse).
VIRTIO_DISKS = ["/dev/disk/by-id/virtio-zfsng-d%d" % i for i in range(4)]


def run(*argv, **kw):
    """Run argv, fail the test with its output if it fails."""
    kw.setdefault("check", True)
    try:
        return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, **kw)
    except subprocess.CalledProcessError as e:
        pytest.fail("%s failed (%d):\n%s%s" % (" ".join(argv), e.returncode, e.stdout, e.stderr))


def make_file_vdevs(n, size=256 << 20):
    os.makedirs(TEST_DIR, exist_ok=True)
    paths = []
    for _ in range(n):
        p = os.path.join(TEST_DIR, "vdev-%s" % uuid.uuid4().hex[:8])
        with open(p, "wb") as f:
            f.truncate(size)
        paths.append(p)
    return paths


@pytest.fixture
def file_vdevs():
    """Factory for sparse file vdevs (removed after the test)."""
    made = []

    def make(n=1, size=256 << 20):
        paths = make_file_vdevs(n, size)
        made.extend(paths)
        return paths

    yield make
    for p in made:
        if os.path.exists(p):
            os.unlink(p)


@pytest.fixture
def sr_vdev(file_vdevs):
    """The vdev of the `sr` fixture's pool: a 1 GiB sparse file."""
    return file_vdevs(1, 1 << 30)[0]


@pytest.fixture
def sr_configuration():
    """More SR.create configuration for `sr`: a module overrides this fixture
    (e.g. test_datapath_nbd.py: {"datapath": "nbd"})."""
    return {}


@pytest.fixture
def sr(sr_vdev, sr_configuration):
    """A zfs-ng SR on sr_vdev, made and attached through the volume plugin's
    executables: its SR string (the pool name); the pool destroyed after."""
    from dp_helpers import destroy_pool, make_sr
    pool = make_sr(sr_vdev, **sr_configuration)
    yield pool
    destroy_pool(pool)


@pytest.fixture
def zpool(file_vdevs):
    """A fresh file-backed pool (ashift=12, lz4), destroyed after the test."""
    name = "t%s" % uuid.uuid4().hex[:8]
    vdev = file_vdevs(1, 1 << 30)
    run("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", name, *vdev)
    yield name
    subprocess.run(["zpool", "destroy", "-f", name], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def wait_for_path(path, timeout=30.0):
    """Wait for a device node (zvol links appear asynchronously via udev)."""
    import time
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > deadline:
            pytest.fail("%s did not appear within %.0f s" % (path, timeout))
        subprocess.run(["udevadm", "settle", "--timeout=5"])
        time.sleep(0.2)
    return path


def make_vol(pool, name, size, bs="16K"):
    """A sparse test zvol POOL/NAME with visible snapshot devices: (dataset, device)."""
    ds = "%s/%s" % (pool, name)
    run("zfs", "create", "-s", "-V", str(size), "-o", "volblocksize=" + bs,
        "-o", "snapdev=visible", ds)
    return ds, wait_for_path("/dev/zvol/" + ds)


class Dev(object):
    """A zvol opened for writing: pwrite, discard (blkdiscard after an fsync so
    the writes before it are ordered), sync, close (synced)."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR)

    def write(self, off, data):
        assert os.pwrite(self.fd, data, off) == len(data)

    def discard(self, off, length):
        os.fsync(self.fd)
        run("blkdiscard", "-o", str(off), "-l", str(length), self.path)

    def sync(self):
        os.fsync(self.fd)

    def close(self):
        os.fsync(self.fd)
        os.close(self.fd)
