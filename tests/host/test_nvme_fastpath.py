"""The target's fast paths over real loopback TCP: large reads sent with
sendfile from the backend (filespan.py) through a socket that fills up,
several commands in flight (uncached reads, FUA writes, flushes mixed), and a
volume removed under a pending read."""

import os
import time
import uuid

from nvmeof_target import pdu
from nvmeof_target.command import build_sqe
from nvmeof_target.control import Client
from nvmeof_target.identify import MAX_TRANSFER
from test_nvme_initiator import Host, SocketTransport
from test_nvme_server import NQN, controller, sparse, target  # noqa: F401  (fixture)


def _io_queue(t, path):
    Client(t.sock).add(NQN, path, str(uuid.uuid4()), allow_any_host=True)
    admin, cntlid = controller(t.port, NQN)
    io = Host(SocketTransport(("127.0.0.1", t.port)))
    io.icreq()
    io.connect(NQN, qid=1, cntlid=cntlid, sqsize=127, kato=0)
    return admin, io


def _fill(path, size):
    data = os.urandom(size)
    with open(path, "r+b") as f:
        f.write(data)
    return data


def _read_cmd(cid, slba, nbytes):
    sqe = build_sqe(opcode=0x02, cid=cid, nsid=1, cdw10=slba, cdw12=nbytes // 512 - 1,
                    sgl_len=nbytes, sgl_id=pdu.SGL_TRANSPORT)
    return pdu.capsule_cmd(sqe)


def test_pipelined_large_reads_through_a_full_socket(target, tmp_path):  # noqa: F811
    path = sparse(tmp_path)
    data = _fill(path, 16 << 20)
    admin, io = _io_queue(target, path)
    sock = io.t.sock
    n = 12
    sock.sendall(b"".join(_read_cmd(i + 1, i * (MAX_TRANSFER // 512), MAX_TRANSFER)
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


def test_volume_removed_under_pending_reads_drops_the_connection(target, tmp_path):  # noqa: F811
    path = sparse(tmp_path)
    _fill(path, 16 << 20)
    admin, io = _io_queue(target, path)
    sock = io.t.sock
    sock.sendall(b"".join(_read_cmd(i + 1, i * 64, MAX_TRANSFER) for i in range(16)))
    time.sleep(0.3)
    Client(target.sock).remove(NQN)
    sock.settimeout(10)
    while sock.recv(1 << 20):            # data already queued, then EOF: never hangs
        pass
    assert Client(target.sock).stats()["live_subsystems"] == 0
    assert target.proc.poll() is None
    admin.t.close()


def _cmd(opcode, cid, slba=0, nbytes=0, data=b"", cdw12_extra=0):
    inline = opcode == 0x01
    sqe = build_sqe(opcode=opcode, cid=cid, nsid=1, cdw10=slba,
                    cdw12=(max(nbytes, len(data)) // 512 - 1 if opcode in (1, 2) else 0)
                    | cdw12_extra, sgl_len=len(data) if inline else nbytes,
                    sgl_id=pdu.SGL_INLINE if inline else pdu.SGL_TRANSPORT)
    return pdu.capsule_cmd(sqe, data)


def _collect(io, cids):
    """Responses, in any order (NVMe orders none) -> {cid: (status, data)}."""
    got, res = {}, {}
    while len(res) < len(cids):
        ptype, flags, header, payload = io.next_pdu()
        if ptype == pdu.C2H_DATA:
            got[pdu.DATA_HDR.unpack(header)[5]] = payload
        else:
            assert ptype == pdu.RSP, ptype
            rcid, status = pdu.RSP_HDR.unpack(header)[9:11]
            assert rcid in cids and rcid not in res
            res[rcid] = (status >> 1, got.pop(rcid, b""))
    return res


def test_pipelined_uncached_reads_fua_writes_and_flushes(target, tmp_path):  # noqa: F811
    path = sparse(tmp_path)
    data = bytearray(_fill(path, 16 << 20))
    fd = os.open(path, os.O_RDONLY)
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)     # reads now miss the cache
    os.close(fd)
    admin, io = _io_queue(target, path)
    sock = io.t.sock
    cmds, cid = [], 0
    for i in range(40):
        cid += 1
        if i % 4 == 3:
            new = os.urandom(4096)
            data[i * 8192:i * 8192 + 4096] = new
            cmds.append(_cmd(0x01, cid, i * 16, data=new, cdw12_extra=1 << 30))   # FUA
        elif i % 10 == 9:
            cmds.append(_cmd(0x00, cid))                                           # Flush
        else:
            cmds.append(_cmd(0x02, cid, i * 16, 4096))
    sock.sendall(b"".join(cmds))
    res = _collect(io, set(range(1, cid + 1)))
    assert all(status == 0 for status, _ in res.values())
    for i in range(40):
        if i % 4 != 3 and i % 10 != 9:
            assert res[i + 1][1] == bytes(data[i * 8192:i * 8192 + 4096])
    for i in range(3, 40, 4):
        assert io.read(i * 16, 8) == bytes(data[i * 8192:i * 8192 + 4096])
    # a bad range is still a clean status, pooled or not
    sock.sendall(_cmd(0x02, 99, (32 << 20) // 512, 4096))
    assert _collect(io, {99})[99][0] & 0x7FF == 0x80       # LBA out of range
    io.t.close()
    admin.t.close()
