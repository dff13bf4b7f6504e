"""The NBD server against hostile clients on the network (issue 12, rows 6
and 7): the server as the datapaths run it (nbd_server.run.start), attackers
on raw TCP sockets from 127.0.0.2+ (the per-client limits tell them apart
from the legitimate client on 127.0.0.1), the server's RSS read from /proc.
Each test shows the attack bounded AND a legitimate client served meanwhile."""

import os
import socket
import struct
import time

import pytest

from conftest import rss, wait_for
from nbd_server import constants as C
from conftest import free_port
from nbd_peer import recv_exact, xo_connect

MiB = 1 << 20
REQ = struct.Struct(">IHHQQI")


def image(tmp_path, name, size, data=None):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        if data:
            f.write(data)
        f.truncate(size)
    return p


def connect(port, src="127.0.0.2"):
    s = socket.socket()
    s.settimeout(10)
    s.bind((src, 0))
    s.connect(("127.0.0.1", port))
    return s


def export_name(s, name):
    """Fixed newstyle, EXPORT_NAME (the XO dialect): -> (size, flags)."""
    magic, opt, _ = struct.unpack(">QQH", recv_exact(s, 18))
    assert (magic, opt) == (C.NBDMAGIC, C.IHAVEOPT)
    s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
    raw = name.encode()
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_EXPORT_NAME, len(raw)) + raw)
    return struct.unpack(">QH", recv_exact(s, 10))


def request(s, type_, cookie, offset, length, data=b""):
    s.sendall(REQ.pack(C.REQUEST_MAGIC, 0, type_, cookie, offset, length) + data)


def reply(s, n=0):
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == C.SIMPLE_REPLY_MAGIC
    return err, cookie, (recv_exact(s, n) if n and not err else b"")


def closed(s, timeout=10.0):
    """True once the server closed s (EOF or reset), reading what it sent."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def legit_rw(port, name="rw", offset=0):
    """A legitimate client from 127.0.0.1: a write and its read back."""
    s, _, _ = xo_connect(("127.0.0.1", port), name)
    data = os.urandom(MiB)
    request(s, C.CMD_WRITE, 1, offset, MiB, data)
    assert reply(s)[0] == 0
    request(s, C.CMD_READ, 2, offset, MiB)
    assert reply(s, MiB)[2] == data
    return s


# ---- row 6: a WRITE's payload from its header alone ----------------------------------------
def test_refused_writes_allocate_nothing_and_are_drained(nbd_server, tmp_path):
    """20 connections send a 28-byte WRITE header of 32 MiB that is refused
    (read-only export, or past the end) and no payload: nothing is allocated
    (before: +32 MiB a connection, kept forever).  A refused payload that
    does come is read and dropped in bounded chunks, the connection goes on;
    a legitimate client writes meanwhile."""
    port = free_port()
    pid = nbd_server([{"name": "ro", "path": image(tmp_path, "ro.img", 32 * MiB), "readonly": True},
                      {"name": "rw", "path": image(tmp_path, "rw.img", 4 * MiB)}],
                     tcp="127.0.0.1:%d" % port)
    legit_rw(port).close()
    base = rss(pid)
    attackers = []
    for i in range(20):
        s = connect(port, "127.0.0.%d" % (2 + i % 4))
        name = ("ro", "rw")[i % 2]
        export_name(s, name)
        request(s, C.CMD_WRITE, i, 0 if name == "ro" else 2 * MiB, 32 * MiB)
        attackers.append(s)
    time.sleep(1.0)
    assert rss(pid) - base < 24 * MiB, (rss(pid) - base) // MiB      # before: +640 MiB
    s = legit_rw(port, offset=MiB)                                   # served meanwhile
    # one attacker sends the refused payload: dropped as it comes, then refused
    a = attackers[0]
    chunk = os.urandom(MiB)
    for _ in range(32):
        a.sendall(chunk)
    assert reply(a)[:2] == (C.EPERM, 0)
    request(a, C.CMD_READ, 7, 0, 4096)                               # still in sync
    assert reply(a, 4096) == (0, 7, bytes(4096))
    assert rss(pid) - base < 24 * MiB
    with open(str(tmp_path / "ro.img"), "rb") as f:
        assert f.read(MiB) == bytes(MiB)
    for x in attackers + [s]:
        x.close()


def test_write_payloads_share_a_budget_and_a_deadline(nbd_server, tmp_path):
    """12 connections from one address send a valid 32 MiB WRITE header and
    100 bytes of payload, then nothing: an address may hold a quarter of
    --max-buffer (64 MiB here), and always one payload, so one is allocated
    and the others wait without allocating; all are dropped after
    --request-timeout (2 s) and the memory comes back (before: 32 MiB each,
    forever).  A legitimate client's write goes through meanwhile.  The
    server runs without the cycle collector."""
    port = free_port()
    pid = nbd_server([{"name": "rw", "path": image(tmp_path, "rw.img", 64 * MiB)}],
                     tcp="127.0.0.1:%d" % port, max_buffer=64 * MiB, request_timeout=2,
                     gc=False)
    legit_rw(port).close()
    base = rss(pid)
    attackers = []
    for i in range(12):
        s = connect(port)
        export_name(s, "rw")
        request(s, C.CMD_WRITE, i, 20 * MiB, 32 * MiB, b"x" * 100)
        attackers.append(s)
    time.sleep(0.5)
    assert rss(pid) - base < 48 * MiB, (rss(pid) - base) // MiB     # before: +384 MiB
    legit_rw(port, offset=8 * MiB).close()                           # served meanwhile
    t0 = time.time()
    assert all(closed(s) for s in attackers)                         # past their deadline
    assert time.time() - t0 < 6
    assert wait_for(lambda: rss(pid) - base < 8 * MiB), (rss(pid) - base) // MiB
    with open(str(tmp_path / "rw.img"), "rb") as f:
        f.seek(20 * MiB)
        assert f.read(100) == bytes(100)                             # never written


# ---- row 7: slots ----------------------------------------------------------------------------
def test_slow_handshakes_do_not_lock_out_clients(nbd_server, tmp_path):
    """16 clients fill --max-connections and trickle their handshake a byte
    at a time (each read within the old per-read timeout): a legitimate
    client still gets in at once (the oldest handshake gives way), and every
    slow one is closed when the handshake deadline (2 s) passes (before:
    refused, the slots held as long as the bytes trickle)."""
    port = free_port()
    nbd_server([{"name": "d", "path": image(tmp_path, "d.img", MiB, b"legit")}],
               tcp="127.0.0.1:%d" % port, max_connections=16, handshake_timeout=2)
    slow = []
    for i in range(16):
        s = connect(port, "127.0.0.%d" % (2 + i))
        recv_exact(s, 18)
        slow.append(s)
    trickle = struct.pack(">I", 3) + struct.pack(">QI", C.IHAVEOPT, C.OPT_GO)
    t0 = time.time()
    s, size, _ = xo_connect(("127.0.0.1", port), "d")                # not refused
    request(s, C.CMD_READ, 1, 0, 5)
    assert reply(s, 5)[2] == b"legit"
    for k in range(6):                                               # 3 s of trickling
        for x in slow:
            try:
                x.send(trickle[k:k + 1])
            except OSError:
                pass
        time.sleep(0.5)
    assert all(closed(x, 2) for x in slow)
    assert time.time() - t0 < 8
    request(s, C.CMD_READ, 2, 0, 5)                                  # after GO: no deadline
    assert reply(s, 5)[2] == b"legit"
    s.close()


def test_idle_clients_after_go_are_capped_and_time_out(nbd_server, tmp_path):
    """One address opens 16 connections and sits idle after GO: it gets
    --max-per-client (8) slots, the rest are refused, so a legitimate client
    connects; the idle ones are closed after --idle-timeout (2 s) while an
    active client and an idle unix socket client stay (before: the 16 idle
    ones held every slot forever)."""
    port, sock = free_port(), str(tmp_path / "s.sock")
    nbd_server([{"name": "d", "path": image(tmp_path, "d.img", MiB, b"legit")}],
               tcp="127.0.0.1:%d" % port, unix_path=sock, max_connections=16,
               max_per_client=8, idle_timeout=2)
    held, refused = [], 0
    for _ in range(16):
        s = connect(port)
        try:
            export_name(s, "d")
            held.append(s)
        except EOFError:
            refused += 1
            s.close()
    assert len(held) == 8 and refused == 8
    local, _, _ = xo_connect(sock, "d", socket.AF_UNIX)
    s, _, _ = xo_connect(("127.0.0.1", port), "d")
    for k in range(8):                                               # 4 s, a request every 0.5
        request(s, C.CMD_READ, k, 0, 5)
        assert reply(s, 5)[2] == b"legit"
        time.sleep(0.5)
    assert all(closed(x, 1) for x in held)
    for c in (s, local):                                             # active / local: kept
        request(c, C.CMD_READ, 99, 0, 5)
        assert reply(c, 5)[2] == b"legit"
        c.close()
    more = [connect(port) for _ in range(8)]                         # the slots are free again
    for x in more:
        export_name(x, "d")
        x.close()


def test_only_volumes_are_exported(tmp_path):
    """issue 12 row 9 for NBD: --export takes block devices and image files
    under --file-dir (or ZFSNG_TARGET_FILE_DIRS) only."""
    from nbd_server.config import build_exports
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 65536)
    assert [e.path for e in build_exports(["d=%s" % img], file_dirs=[str(tmp_path)])] == [str(img)]
    for path, why in (("/etc/passwd", "outside"), (str(tmp_path), "a directory"),
                      ("/proc/self/environ", "outside"), ("/dev/null", "character device"),
                      (str(tmp_path / "nope"), "does not exist")):
        with pytest.raises(ValueError, match=why):
            build_exports(["x=%s" % path], file_dirs=[str(tmp_path)])
    with pytest.raises(ValueError, match="none is configured"):
        build_exports(["d=%s" % img], file_dirs=[])
