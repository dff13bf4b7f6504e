"""The target's fast paths over real loopback TCP: large reads sent with
sendfile from the backend (filespan.py) through a socket that fills up,
several commands in flight (uncached reads, FUA writes, flushes mixed), and a
volume removed under a pending read."""

import os
import time

from nvmeof_target import pdu
from nvmeof_target.control import Client
from nvmeof_target.identify import MAX_TRANSFER
from nvme_peer import NQN, collect, command, fill, io_queue, sparse


def test_pipelined_large_reads_through_a_full_socket(target, tmp_path):
    path = sparse(tmp_path)
    data = fill(path, 16 << 20)
    admin, io = io_queue(target, path)
    sock = io.t.sock
    n = 12
    sock.sendall(b"".join(command(0x02, i + 1, i * (MAX_TRANSFER // 512), MAX_TRANSFER)
                          for i in range(n)))
    time.sleep(0.5)                      # the target's socket is full by now
    got, done = {}, set()
    while len(done) < n:
        ptype, flags, header, payload = io.next_pdu()
        cid = pdu.DATA_HDR.unpack(header)[5] if ptype == pdu.C2H_DATA else None
        if ptype == pdu.C2H_DATA:
            assert pdu.DATA_HDR.unpack(header)[7:9] == (0, MAX_TRANSFER)
            got[cid] = payload
        else:
            assert ptype == pdu.RSP
            rcid, status = pdu.RSP_HDR.unpack(header)[9:11]
            assert status == 0 and rcid in got
            done.add(rcid)
    for i in range(n):
        assert got[i + 1] == data[i * MAX_TRANSFER:(i + 1) * MAX_TRANSFER]
    # small and odd-sized reads still go by pread, mixed with spans
    assert io.read(3, 1) == data[3 * 512:4 * 512]
    assert io.read(7, 65) == data[7 * 512:72 * 512]
    io.t.close()
    admin.t.close()


def test_volume_removed_under_pending_reads_drops_the_connection(target, tmp_path):
    path = sparse(tmp_path)
    fill(path, 16 << 20)
    admin, io = io_queue(target, path)
    sock = io.t.sock
    sock.sendall(b"".join(command(0x02, i + 1, i * 64, MAX_TRANSFER) for i in range(16)))
    time.sleep(0.3)
    Client(target.sock).remove(NQN)
    sock.settimeout(10)
    while sock.recv(1 << 20):            # data already queued, then EOF: never hangs
        pass
    assert Client(target.sock).stats()["live_subsystems"] == 0
    assert target.proc.poll() is None
    admin.t.close()


def test_pipelined_uncached_reads_fua_writes_and_flushes(target, tmp_path):
    path = sparse(tmp_path)
    data = bytearray(fill(path, 16 << 20))
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # reads now miss the cache
    os.close(fd)
    admin, io = io_queue(target, path)
    sock = io.t.sock
    cmds, cid = [], 0
    for i in range(40):
        cid += 1
        if i % 4 == 3:
            new = os.urandom(4096)
            data[i * 8192:i * 8192 + 4096] = new
            cmds.append(command(0x01, cid, i * 16, data=new, cdw12_extra=1 << 30))   # FUA
        elif i % 10 == 9:
            cmds.append(command(0x00, cid))                                           # Flush
        else:
            cmds.append(command(0x02, cid, i * 16, 4096))
    sock.sendall(b"".join(cmds))
    res = collect(io, set(range(1, cid + 1)))
    assert all(status == 0 for status, _ in res.values())
    for i in range(40):
        if i % 4 != 3 and i % 10 != 9:
            assert res[i + 1][1] == bytes(data[i * 8192:i * 8192 + 4096])
    for i in range(3, 40, 4):
        assert io.read(i * 16, 8) == bytes(data[i * 8192:i * 8192 + 4096])
    # a bad range is still a clean status, pooled or not
    sock.sendall(command(0x02, 99, (32 << 20) // 512, 4096))
    assert collect(io, {99})[99][0] & 0x7FF == 0x80       # LBA out of range
    io.t.close()
    admin.t.close()
