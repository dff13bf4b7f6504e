"""Reads and writes by Linux native AIO (nvmeof_target/aio.py) on the host's
real kernel: O_DIRECT I/O in flight side by side, I/O waiting for a free slot,
what the kernel refuses retried synchronously then handed back, and the target over TCP serving pipelined small
reads this way (right after buffered writes of the same blocks, and with the
connection dropped while reads are in flight)."""

import errno
import os
import random
import selectors
import socket
import time

import pytest

from blockio.backend import Backend
from nvmeof_target import aio
from nvmeof_target.control import Client
from nvme_peer import NQN, collect, command, fill, io_queue, sparse


def _run(sel, reader, want, timeout=10):
    deadline = time.time() + timeout
    while len(reader.got) < want:
        assert time.time() < deadline, "AIO completions never came"
        for key, mask in sel.select(1):
            key.data.on_event(mask)


class Reader(object):
    def __init__(self, nslots=aio.NSLOTS):
        self.sel = selectors.DefaultSelector()
        self.got = {}
        self.aio = aio.AioReads(self.sel, self.done, nslots)

    def done(self, token, data):
        self.got[token] = data


@pytest.fixture
def volume(tmp_path):
    path = sparse(tmp_path, size=4 << 20)
    data = fill(path, 4 << 20)
    be = Backend(path)
    if be.direct_fd() < 0:
        be.close()
        pytest.skip("O_DIRECT refused by the filesystem of %s" % tmp_path)
    yield be, data
    be.close()


@pytest.mark.parametrize("reap", ["ring", "io_getevents"])
def test_reads_in_flight_return_the_file_bytes(volume, reap):
    be, data = volume
    r = Reader()
    r.aio._setup()
    if reap == "ring":
        assert r.aio.ring is not None or os.uname().machine != "x86_64"
    else:
        r.aio.ring = None
    rnd = random.Random(3)
    spans = [(rnd.randrange(0, (4 << 20) // 4096) * 4096, 4096) for _ in range(100)]
    spans += [(512 * 7, 512), (0, aio.SLOT), ((4 << 20) - aio.SLOT, aio.SLOT)]
    for i, (off, n) in enumerate(spans):
        assert r.aio.submit(be.direct_fd(), off, n, i)
    assert r.aio.ok
    r.aio.flush()
    _run(r.sel, r, len(spans))
    for i, (off, n) in enumerate(spans):
        assert r.got[i] == data[off:off + n]
    st = r.aio.stats()
    assert st["aio"] and st["aio_reads"] == len(spans) and st["aio_redone"] == 0
    assert st["aio_submits"] == 1 and 1 <= st["aio_wakeups"] <= len(spans)
    assert len(r.aio.free) == aio.NSLOTS           # every slot back
    r.aio.close()


def test_what_the_kernel_refuses_is_retried_synchronously_then_handed_back(volume, tmp_path):
    be, data = volume
    r = Reader(nslots=4)
    assert r.aio.submit(be.direct_fd(), 100, 512, "unaligned")         # O_DIRECT: EINVAL
    assert r.aio.submit(be.direct_fd(), 4096, 4096, "good")
    fd = os.open(str(tmp_path / "gone"), os.O_CREAT | os.O_RDWR)
    os.close(fd)
    assert r.aio.submit(fd, 0, 512, "closed fd")                       # EBADF
    assert r.aio.submit(be.direct_fd(), 0, 512, "fourth")
    assert r.aio.submit(be.direct_fd(), 512, 512, "no slot left")      # waits for one
    assert len(r.aio.waiting) == 1
    assert not r.aio.submit(be.direct_fd(), 0, aio.BIG + 512, "too big")
    r.aio.flush()
    _run(r.sel, r, 4)
    r.aio.flush()                      # the waiting one started when a slot freed
    _run(r.sel, r, 5)
    assert r.got["unaligned"] is None and r.got["closed fd"] is None
    assert r.got["good"] == data[4096:8192] and r.got["fourth"] == data[:512]
    assert r.got["no slot left"] == data[512:1024]
    st = r.aio.stats()
    assert st["aio_redone"] == 2 and st["aio_waited"] == 1
    r.aio.close()
    assert not r.aio.submit(be.direct_fd(), 0, 512, "after close")


class Writer(Reader):
    def __init__(self, nslots=aio.NSLOTS, nbig=aio.NBIG):
        self.sel = selectors.DefaultSelector()
        self.got = {}
        self.aio = aio.Aio(self.sel, self.done, nslots, write_done=self.done, nbig=nbig)


@pytest.mark.parametrize("dsync", [False, True])
def test_writes_in_flight_land_small_and_big(volume, dsync):
    be, data = volume
    data = bytearray(data)
    w = Writer(nslots=4, nbig=2)
    rnd = random.Random(9)
    sizes = [aio.BIG, aio.BIG] + [rnd.choice((512, 4096, aio.SLOT, 65536)) for _ in range(38)]
    rnd.shuffle(sizes)
    spans, off = [], 0
    for n in sizes:                   # disjoint: writes in flight have no order
        spans.append((off, n))
        off += (n + 4095) // 4096 * 4096
    for i, (off, n) in enumerate(spans):          # more than the slots: the rest wait
        buf = os.urandom(n)
        data[off:off + n] = buf
        assert w.aio.submit_write(be, off, buf, i, dsync=dsync)
    w.aio.flush()
    while len(w.got) < len(spans):
        _run(w.sel, w, len(w.got) + 1)
        w.aio.flush()
    assert all(v == 0 for v in w.got.values())
    st = w.aio.stats()
    assert st["aio_writes"] + st["aio_redone"] == len(spans) and st["aio_waited"] > 0
    with open(be.path, "rb") as f:
        assert f.read() == bytes(data)
    w.aio.close()


def test_fsync_completes_like_a_write(volume, tmp_path):
    be, data = volume
    w = Writer(nslots=2)
    assert w.aio.submit_write(be, 0, b"z" * 4096, "w")
    w.aio.flush()
    _run(w.sel, w, 1)
    assert w.aio.submit_fsync(be, "flush")
    fd = os.open(str(tmp_path / "gone2"), os.O_CREAT | os.O_RDWR)
    os.close(fd)
    assert w.aio.submit_fsync(fd, "bad fd")              # EBADF, then again synchronously
    w.aio.flush()
    _run(w.sel, w, 3)
    assert w.got == {"w": 0, "flush": 0, "bad fd": errno.EBADF}
    w.aio.close()


def test_a_write_the_kernel_refuses_reports_its_errno(volume):
    be, data = volume
    w = Writer(nslots=2)
    assert w.aio.submit_write(be, 100, b"x" * 512, "unaligned")   # EINVAL twice
    assert w.aio.submit_write(be, 4096, b"y" * 4096, "good")
    w.aio.flush()
    _run(w.sel, w, 2)
    assert w.got == {"unaligned": errno.EINVAL, "good": 0}
    assert be.read(4096, 4096) == b"y" * 4096
    w.aio.close()


def test_target_serves_small_reads_by_aio_after_buffered_writes(target, tmp_path):
    path = sparse(tmp_path)
    data = bytearray(fill(path, 16 << 20))
    admin, io = io_queue(target, path)
    sock = io.t.sock
    rnd = random.Random(5)
    cmds, cid, reads = [], 0, {}
    for i in range(24):                         # buffered writes, not yet on disk
        new = os.urandom(4096)
        data[i * 65536:i * 65536 + 4096] = new
        cid += 1
        cmds.append(command(0x01, cid, i * 128, data=new))
    sock.sendall(b"".join(cmds))
    assert all(s == 0 for s, _ in collect(io, set(range(1, cid + 1))).values())
    cmds = []
    for i in range(96):                         # those blocks and others, in flight together
        slba = i * 128 if i < 24 else rnd.randrange(0, (16 << 20) // 512 - 16)
        nbytes = 512 * rnd.choice((1, 8, 8, 8, 31))
        cid += 1
        reads[cid] = (slba * 512, nbytes)
        cmds.append(command(0x02, cid, slba, nbytes))
    sock.sendall(b"".join(cmds))
    res = collect(io, set(reads))
    for c, (off, n) in reads.items():
        assert res[c] == (0, bytes(data[off:off + n])), c
    stats = Client(target.sock).stats()
    assert stats["aio"] and stats["aio_reads"] >= len(reads)
    io.t.close()
    admin.t.close()


def test_connection_dropped_with_reads_in_flight(target, tmp_path):
    path = sparse(tmp_path)
    data = fill(path, 16 << 20)
    admin, io = io_queue(target, path)
    io.t.sock.sendall(b"".join(command(0x02, c, c * 64, 4096) for c in range(1, 101)))
    io.t.sock.shutdown(socket.SHUT_RDWR)
    io.t.close()
    admin.t.close()
    time.sleep(0.3)
    assert target.proc.poll() is None
    assert Client(target.sock).stats()["controllers"] == 0
    Client(target.sock).remove(NQN)
    admin, io = io_queue(target, path)               # a fresh volume, new backend
    assert io.read(64, 8) == data[64 * 512:72 * 512]
    io.t.close()
    admin.t.close()


def test_direct_fd_is_the_open_volume_even_if_its_path_moved(tmp_path):
    path = sparse(tmp_path, size=1 << 20)
    data = fill(path, 1 << 20)
    be = Backend(path)
    try:
        os.rename(path, path + ".old")               # another volume takes the name
        with open(path, "wb") as f:
            f.write(b"\0" * (1 << 20))
        fd = be.direct_fd()
        if fd < 0:
            pytest.skip("O_DIRECT refused by the filesystem of %s" % tmp_path)
        assert os.fstat(fd).st_ino == os.fstat(be.fd).st_ino != os.stat(path).st_ino
        r = Reader()
        assert r.aio.submit(fd, 8192, 4096, "x")
        r.aio.flush()
        _run(r.sel, r, 1)
        assert r.got["x"] == data[8192:12288]
        r.aio.close()
    finally:
        be.close()
    assert be.direct_fd() == -1


def test_setup_failure_leaves_reads_synchronous_and_nothing_open():
    class Refusing(selectors.DefaultSelector):
        def register(self, *a, **k):
            raise ValueError("refused")

    def eventfds():
        # only eventfds: threads of earlier tests may still open other files
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                if "eventfd" in os.readlink("/proc/self/fd/" + fd):
                    out.add(fd)
            except OSError:
                pass
        return out

    sel = Refusing()
    before = eventfds()
    a = aio.AioReads(sel, lambda token, data: None)
    assert a.submit(0, 0, 4096, None) is False and a.ok is False
    assert eventfds() == before    # eventfd closed, context destroyed
    a.close()
    sel.close()
