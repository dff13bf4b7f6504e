"""blockio/zvol.py without ZFS: which paths name a dataset, which nodes are
candidates (newest first, since), and that nothing which is not the named
zvol is ever opened for the caller (regular files and /dev/null answer
BLKZNAME with an error, so they are never taken).  The BLKZNAME answer of a
real zvol, and the servers opening a volume before udev's link, are tested in
the VM (tests/e2e/test_zvol_minor.py)."""

import errno
import os
import time

import pytest
from hypothesis import given, strategies as hs

from blockio import zvol
from blockio.backend import Backend
from blockio import volpath


@pytest.mark.parametrize("path,dataset", [
    ("/dev/zvol/tank/zfs-ng/abc", "tank/zfs-ng/abc"),
    ("/dev/zvol/tank/v", "tank/v"),
    ("/dev/zvol/tank", None),               # a pool, not a volume
    ("/dev/zvol/", None),
    ("/dev/zvol/tank//v", None),
    ("/dev/zvol/tank/../etc/passwd", None),
    ("/dev/zvol/tank/./v", None),
    ("/dev/zd0", None),
    ("/etc/passwd", None),
    ("/dev/zvolx/tank/v", None),
    ("/dev/zvol/tank/" + "v" * 300, None),  # longer than ZFS_MAX_DATASET_NAME_LEN
])
def test_dataset_of(path, dataset):
    assert zvol.dataset_of(path) == dataset


@given(hs.text(max_size=300))
def test_dataset_of_is_the_path_below_the_zvol_dir_or_none(text):
    d = zvol.dataset_of(text)
    if d is not None:
        assert text == zvol.ZVOL_DIR + d
        parts = d.split("/")
        assert len(parts) >= 2 and all(p not in ("", ".", "..") for p in parts)
        assert len(d) < zvol.NAME_LEN


def test_blkzname_is_the_ioctl_number_of_zfs_h():
    # _IOR(0x12, 125, char[ZFS_MAX_DATASET_NAME_LEN]): dir read (2) << 30,
    # size 256 << 16, type 0x12 << 8, nr 125 (zvol_id.c asks the same)
    assert zvol.BLKZNAME == 0x8100127D


def _node(d, name, age):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write("x")
    t = time.time() - age
    os.utime(p, (t, t))      # ctime follows (it is now): the order is by ctime
    return p


def test_candidates_are_zd_minors_newest_first(tmp_path):
    d = str(tmp_path)
    for name in ("zd0", "zd16", "zd16p1", "sda", "zdx", "zd32"):
        _node(d, name, 0)
        time.sleep(0.01)
    got = [os.path.basename(p) for p in zvol._candidates(d)]
    assert got == ["zd32", "zd16", "zd0"]
    since = os.stat(os.path.join(d, "zd16")).st_ctime
    assert [os.path.basename(p) for p in zvol._candidates(d, since)] == ["zd32", "zd16"]
    assert zvol._candidates(d, time.time() + 60) == []
    assert zvol._candidates(os.path.join(d, "missing")) == []


def test_candidates_look_at_the_newest_scan_only(tmp_path, monkeypatch):
    monkeypatch.setattr(zvol, "SCAN", 2)
    for i in range(5):
        _node(str(tmp_path), "zd%d" % (16 * i), 0)
        time.sleep(0.01)
    assert [os.path.basename(p) for p in zvol._candidates(str(tmp_path))] == ["zd64", "zd48"]


def test_nothing_but_the_named_zvol_is_taken(tmp_path):
    """Nodes that are not zvols (regular files here) fail BLKZNAME: find()
    gives None and open_path() the ENOENT of the missing link, no fd."""
    d = str(tmp_path)
    _node(d, "zd0", 0)
    os.symlink("/dev/null", os.path.join(d, "zd16"))
    assert zvol.find("tank/v", dev=d) is None
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError) as e:
        zvol.open_path("/dev/zvol/tank/not-here-%d" % os.getpid(), os.O_RDONLY, dev=d)
    assert e.value.errno == errno.ENOENT
    assert set(os.listdir("/proc/self/fd")) == before        # nothing left open


def test_open_path_of_other_paths_is_os_open(tmp_path):
    p = str(tmp_path / "f")
    with open(p, "w") as f:
        f.write("data")
    fd = zvol.open_path(p, os.O_RDONLY)
    try:
        assert os.read(fd, 4) == b"data"
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        zvol.open_path(str(tmp_path / "missing"), os.O_RDONLY)


def test_backend_and_volpath_refuse_a_missing_zvol_path():
    path = "/dev/zvol/tank/zfs-ng/not-here-%d" % os.getpid()
    with pytest.raises(FileNotFoundError):
        Backend(path)
    with pytest.raises(ValueError) as e:
        volpath.check_path(path, ())
    assert "refusing %s" % path in str(e.value)
