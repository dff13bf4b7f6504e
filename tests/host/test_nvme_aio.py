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
from nvmeof_target import pdu
from nvmeof_target.command import build_sqe
from nvme_peer import (NQN, Host, SocketTransport, collect, command, controller, fill, io_queue,
                       sparse)


def _run(sel, reader, want, timeout=10):
    """The server loop's part: completions, then reclaim() (server.py
    _flush_dirty) once what they gave is taken."""
    deadline = time.time() + timeout
    while len(reader.got) < want:
        assert time.time() < deadline, "AIO completions never came"
        for key, mask in sel.select(1):
            key.data.on_event(mask)
        reader.aio.reclaim([])


class Reader(object):
    def __init__(self, nslots=aio.NSLOTS):
        self.sel = selectors.DefaultSelector()
        self.got = {}
        self.aio = aio.AioReads(self.sel, self.done, nslots)

    def done(self, token, data):
        # a read's bytes are the slot's, lent until reclaim(): keep a copy
        self.got[token] = bytes(data) if isinstance(data, memoryview) else data


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


def test_read_slots_are_lent_until_reclaim_and_what_is_not_sent_is_copied(volume):
    """done() gets a view of the slot (no copy); the slot is not reused before
    reclaim(outs); a view still in an output list then is replaced by a copy
    of its bytes, so the slot's next read cannot change what a host gets."""
    be, data = volume
    views = {}
    sel = selectors.DefaultSelector()
    a = aio.AioReads(sel, lambda token, d: views.__setitem__(token, d), nslots=2)
    assert a.submit(be.direct_fd(), 0, 4096, "a") and a.submit(be.direct_fd(), 4096, 4096, "b")
    assert a.submit(be.direct_fd(), 8192, 4096, "c")        # no slot: waits
    a.flush()
    deadline = time.time() + 10
    while len(views) < 2:
        assert time.time() < deadline
        for key, mask in sel.select(1):
            key.data.on_event(mask)
    assert type(views["a"]) is memoryview and views["a"].obj is a.mm
    assert sorted(a.lent) == [0, 1] and not a.free and len(a.waiting) == 1   # c still waits
    unsent = [b"header", memoryview(views["a"])[100:], b"resp"]   # a partly sent
    a.reclaim([unsent])
    assert type(unsent[1]) is bytes and unsent[1] == data[100:4096]
    assert unsent[0] == b"header" and unsent[2] == b"resp"
    assert not a.lent and not a.waiting                     # c started in a freed slot
    while "c" not in views:
        assert time.time() < deadline
        for key, mask in sel.select(1):
            key.data.on_event(mask)
    assert views["c"] == data[8192:12288]
    assert unsent[1] == data[100:4096]                      # the copy kept a's bytes
    a.reclaim([])
    assert len(a.free) == 2
    a.close()


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


def test_big_writes_are_received_into_their_slot_and_read_back(target, tmp_path):
    """A 128 KiB write's H2CData lands in an AIO slot and goes to the volume
    from there (no copy); 128 KiB reads go to the host from their slots."""
    path = sparse(tmp_path)
    fill(path, 32 << 20)
    admin, io = io_queue(target, path)
    c = Client(target.sock)
    before = c.stats()["aio_received_writes"]
    blocks = {}
    for k in range(12):                      # apart: each block is what was written
        slba = 512 + k * 2048 + (k % 3) * 8
        blocks[slba] = os.urandom(128 << 10)
        io.write(slba, blocks[slba])
    with open(path, "rb") as f:
        disk = f.read()
    for slba, want in blocks.items():
        assert disk[slba * 512:slba * 512 + len(want)] == want
        assert io.read(slba, 256) == want
    assert c.stats()["aio_received_writes"] - before == 12
    io.t.close()
    admin.t.close()


def test_reads_a_host_does_not_take_are_copied_before_their_slot_is_reused(target, tmp_path):
    """96 pipelined 128 KiB reads (12 MiB: more than the socket takes while
    the host reads nothing) through the 32 big slots: what waits in the
    output is copied out of its slot before the slot's next read, so every
    reply is the bytes asked for."""
    path = sparse(tmp_path)
    data = fill(path, 32 << 20)
    admin, io = io_queue(target, path)
    rnd = random.Random(12)
    reads = {}
    for cid in range(1, 97):
        slba = rnd.randrange(0, (32 << 20) // 512 - 256)
        reads[cid] = slba
    io.t.sock.sendall(b"".join(command(0x02, cid, slba, 128 << 10)
                               for cid, slba in reads.items()))
    time.sleep(1.0)                       # the host reads nothing meanwhile
    res = collect(io, set(reads))
    for cid, slba in reads.items():
        assert res[cid] == (0, data[slba * 512:slba * 512 + (128 << 10)]), cid
    st = Client(target.sock).stats()
    assert st["aio_copied_reads"] > 0 and st["aio_reads"] >= 96
    io.t.close()
    admin.t.close()


def test_a_write_cut_off_in_its_data_gives_its_slot_back(target, tmp_path):
    """40 hosts (more than the 32 big slots) each start a 128 KiB write and
    go away halfway through its data: the slots they were lent come back, so
    a later host's big writes still go straight from theirs."""
    path = sparse(tmp_path)
    fill(path, 32 << 20)
    admin, io = io_queue(target, path)
    io.t.close()
    admin.t.close()
    for i in range(40):
        admin, cntlid = controller(target.port, NQN)
        h = Host(SocketTransport(("127.0.0.1", target.port)))
        h.icreq()
        h.connect(NQN, qid=1, cntlid=cntlid, sqsize=31, kato=0)
        sqe = build_sqe(opcode=0x01, cid=7, nsid=1, cdw10=i * 256, cdw12=255,
                        sgl_len=128 << 10, sgl_id=pdu.SGL_TRANSPORT)
        h.t.send(pdu.capsule_cmd(sqe, b""))
        ptype, _, header, _ = h.next_pdu()
        assert ptype == pdu.R2T
        ttag = pdu.DATA_HDR.unpack(header)[6]
        h.t.send(pdu.h2c_data(7, ttag, os.urandom(128 << 10))[:24 + (64 << 10)])
        time.sleep(0.02)
        h.t.close()
        admin.t.close()
    time.sleep(0.3)
    c = Client(target.sock)
    before = c.stats()["aio_received_writes"]
    admin, cntlid = controller(target.port, NQN)
    io = Host(SocketTransport(("127.0.0.1", target.port)))
    io.icreq()
    io.connect(NQN, qid=1, cntlid=cntlid, sqsize=31, kato=0)
    new = os.urandom(128 << 10)
    for k in range(34):                    # more than 32: slots must come back each time
        io.write(4096 + k * 256, new)
    assert io.read(4096 + 33 * 256, 256) == new
    assert c.stats()["aio_received_writes"] - before == 34
    io.t.close()
    admin.t.close()


def test_reads_go_synchronous_only_for_a_host_at_qd1(target, tmp_path):
    """queue.Queue.lone_read: a host sending one read at a time gets them
    read synchronously once LONE came alone; the first batch of pipelined
    reads turns that off again (all of that batch by AIO), and the data is
    right either way."""
    from nvmeof_target.queue import LONE
    path = sparse(tmp_path)
    data = fill(path, 32 << 20)
    admin, io = io_queue(target, path)
    c = Client(target.sock)
    rnd = random.Random(13)
    before = c.stats()
    n = LONE + 40
    for _ in range(n):
        slba = rnd.randrange(0, (32 << 20) // 512 - 8)
        assert io.read(slba, 8) == data[slba * 512:slba * 512 + 4096]
    mid = c.stats()
    assert mid["aio_sync_reads"] - before["aio_sync_reads"] == n - LONE
    reads = {cid: rnd.randrange(0, (32 << 20) // 512 - 8) for cid in range(1000, 1064)}
    io.t.sock.sendall(b"".join(command(0x02, cid, slba, 4096) for cid, slba in reads.items()))
    res = collect(io, set(reads))
    for cid, slba in reads.items():
        assert res[cid] == (0, data[slba * 512:slba * 512 + 4096])
    after = c.stats()
    assert after["aio_sync_reads"] == mid["aio_sync_reads"]
    assert after["aio_reads"] - mid["aio_reads"] == 64
    io.t.close()
    admin.t.close()


def test_no_synchronous_read_while_other_connections_have_work(target, tmp_path):
    """Two hosts at QD1 each earn synchronous reads; reads that arrive on
    both at once (the target stopped meanwhile: one batch of events) go by
    AIO, since a synchronous read would hold the other connection, and each
    queue then needs LONE more lone reads before reading synchronously."""
    import signal
    from nvmeof_target.queue import LONE
    path = sparse(tmp_path)
    data = fill(path, 16 << 20)
    admin, io = io_queue(target, path)
    a2, cntlid = controller(target.port, NQN)
    io2 = Host(SocketTransport(("127.0.0.1", target.port)))
    io2.icreq()
    io2.connect(NQN, qid=1, cntlid=cntlid, sqsize=31, kato=0)
    c = Client(target.sock)
    rnd = random.Random(15)

    def one(h):
        slba = rnd.randrange(0, (16 << 20) // 512 - 8)
        assert h.read(slba, 8) == data[slba * 512:slba * 512 + 4096]

    for _ in range(LONE + 5):
        one(io)
        one(io2)
    before = c.stats()["aio_sync_reads"]
    assert before >= 2 * 5
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        for h, cid in ((io, 900), (io2, 901)):
            h.t.sock.sendall(command(0x02, cid, 64, 4096))
        time.sleep(0.2)
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    for h, cid in ((io, 900), (io2, 901)):
        assert collect(h, {cid}) == {cid: (0, data[64 * 512:64 * 512 + 4096])}
    for _ in range(LONE):
        one(io)
    assert c.stats()["aio_sync_reads"] == before
    for h in (io, io2, admin, a2):
        h.t.close()


def test_one_io_submit_for_the_reads_of_every_connection_in_a_batch(target, tmp_path):
    """Reads that arrive on 6 connections while the target is stopped come
    back from one select() batch: their I/O goes to the kernel in one
    io_submit (server.py flushes once per batch, not per connection)."""
    import signal
    path = sparse(tmp_path)
    data = fill(path, 16 << 20)
    admin, io = io_queue(target, path)
    pairs = [(admin, io)]
    for _ in range(5):
        a, cntlid = controller(target.port, NQN)
        h = Host(SocketTransport(("127.0.0.1", target.port)))
        h.icreq()
        h.connect(NQN, qid=1, cntlid=cntlid, sqsize=31, kato=0)
        pairs.append((a, h))
    c = Client(target.sock)
    before = c.stats()["aio_submits"]
    rnd = random.Random(14)
    reads = [{cid: rnd.randrange(0, (16 << 20) // 512 - 8) for cid in range(1, 5)}
             for _ in pairs]
    os.kill(target.proc.pid, signal.SIGSTOP)
    try:
        for (_, h), rs in zip(pairs, reads):
            h.t.sock.sendall(b"".join(command(0x02, cid, slba, 4096) for cid, slba in rs.items()))
        time.sleep(0.2)
    finally:
        os.kill(target.proc.pid, signal.SIGCONT)
    for (_, h), rs in zip(pairs, reads):
        res = collect(h, set(rs))
        for cid, slba in rs.items():
            assert res[cid] == (0, data[slba * 512:slba * 512 + 4096])
    assert c.stats()["aio_submits"] - before == 1
    for a, h in pairs:
        h.t.close()
        a.t.close()


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
