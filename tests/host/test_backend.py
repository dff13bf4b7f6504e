"""blockio.backend on sparse files (the zvol path is covered in the VM)."""

import os

import pytest

from blockio.backend import Backend

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "vol.img"
    with open(p, "wb") as f:
        f.truncate(4 * MiB)
    return str(p)


def allocated(path):
    return os.stat(path).st_blocks * 512


def test_write_read_roundtrip(image):
    data = os.urandom(64 * 1024)
    with Backend(image) as b:
        assert b.size == 4 * MiB
        b.write(MiB + 512, data, fua=True)
        assert bytes(b.read(MiB + 512, len(data))) == data
        buf = bytearray(4096)
        b.readinto(0, buf)
        assert buf == bytes(4096)


def test_discard_and_write_zeroes_read_back_zero_and_free_space(image):
    with Backend(image) as b:
        b.write(0, b"\xff" * MiB)
        b.flush()
        before = allocated(image)
        b.discard(0, 256 * 1024)
        b.write_zeroes(256 * 1024, 256 * 1024)
        b.write_zeroes(512 * 1024, 4096, unmap=False)
        assert bytes(b.read(0, 512 * 1024 + 4096)) == bytes(512 * 1024 + 4096)
        assert bytes(b.read(512 * 1024 + 4096, 4096)) == b"\xff" * 4096
        assert allocated(image) <= before - 512 * 1024


def test_out_of_range_and_readonly_are_refused(image):
    with Backend(image, readonly=True) as b:
        with pytest.raises(OSError):
            b.read(4 * MiB - 512, 1024)
        with pytest.raises(OSError):
            b.write(0, b"x" * 512)
        with pytest.raises(OSError):
            b.discard(0, 4096)
    with Backend(image) as b:
        with pytest.raises(OSError):
            b.write(4 * MiB, b"x")


def test_size_follows_growth(image):
    with Backend(image) as b:
        os.truncate(image, 8 * MiB)
        assert b.size == 8 * MiB


def test_rejects_non_block_non_file(tmp_path):
    with pytest.raises(OSError):
        Backend(str(tmp_path))
