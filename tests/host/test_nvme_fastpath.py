"""The target's fast paths over real loopback TCP: large reads sent with
sendfile from the backend (filespan.py) through a socket that fills up,
several commands in flight, and a volume removed under a pending read."""

import os
import socket
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
