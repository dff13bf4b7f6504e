"""The target against an attacker on the same network (issue 12, rows 1-5 and 9):
`zfs-ng target serve` on loopback, raw sockets sending what a hostile host
would, RSS of the target read from /proc before and after.  Each test shows
the attack bounded AND a legitimate host served at the same time.  Attackers
connect from 127.0.0.2+ (the per-address limits tell them apart from the
legitimate host on 127.0.0.1).  The target runs with Python's cycle collector
off: memory that only a reference cycle would free shows up as a leak.

The bounds are generous: what they catch is the difference between "bounded
by the budget" (a few MiB a connection) and "grows with what is sent"
(hundreds of MiB before these fixes)."""

import os
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from conftest import rss, wait_for
from nvmeof_target import pdu
from nvmeof_target import status as st
from nvmeof_target.command import build_sqe
from nvmeof_target.control import Client
from nvmeof_target.nqn import DISCOVERY_NQN
from conftest import ROOT
from nvme_peer import (NQN, HOSTNQN, Host, NvmeStatus, QueueTransport, SocketTransport,
                       TargetProcess, controller, sparse)

MiB = 1 << 20
LOG_PAGE_1M = ((MiB // 4 - 1) & 0xFFFF) << 16 | 0x70     # cdw10: discovery log, NUMDL
LOG_PAGE_1M_U = (MiB // 4 - 1) >> 16                     # cdw11: NUMDU


class Attacker(SocketTransport):
    """A test-initiator transport from another loopback address, with a small
    receive window (what it does not read stays in the target)."""

    def __init__(self, port, src="127.0.0.2", rcvbuf=4096):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        self.sock = s

    def reset(self):
        """Gone at once (RST), as a crashed or hostile host leaves."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def discovery(port, src="127.0.0.2"):
    h = Host(Attacker(port, src))
    h.icreq()
    h.connect(DISCOVERY_NQN, kato=0)       # KATO 0: nvmet's (and our) 120 s for discovery
    h.enable()
    return h


def log_page_cmds(n, cid0=100):
    return b"".join(pdu.capsule_cmd(build_sqe(0x02, cid0 + i, 0, cdw10=LOG_PAGE_1M,
                                              cdw11=LOG_PAGE_1M_U, sgl_len=MiB))
                    for i in range(n))


def settle(c, key="buffered_bytes", timeout=8.0):
    """stats() once `key` has stopped moving (the target did what it will do)."""
    last, same, deadline = None, 0, time.time() + timeout
    while time.time() < deadline:
        s = c.stats()
        same = same + 1 if s[key] == last else 0
        if same >= 3:
            return s
        last = s[key]
        time.sleep(0.15)
    return s


def legit_io(port, nqn=NQN, size=256 << 10):
    """A legitimate host from 127.0.0.1: admin + I/O queue, a write through
    R2T and its read back; returns the admin Host (connected)."""
    admin, cntlid = controller(port, nqn)
    admin.set_features(0x07, 0)
    io = Host(SocketTransport(("127.0.0.1", port)))
    io.icreq()
    io.connect(nqn, qid=1, cntlid=cntlid, sqsize=127, kato=0)
    data = os.urandom(size)
    io.write(64, data)
    assert io.read(64, size // 512) == data
    io.t.close()
    return admin


def volume(t, tmp_path, **kw):
    kw.setdefault("allowed_hosts", [HOSTNQN])
    Client(t.sock).add(NQN, sparse(tmp_path), str(uuid.uuid4()), **kw)


def cpu_seconds(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- row 1: replies nobody reads ------------------------------------------------------------
def test_unread_replies_stop_at_the_connection_budget(nvme_target, tmp_path):
    """4 hosts on discovery each pipeline 400 1 MiB Get Log Pages and read
    nothing: each connection holds at most its budget (4 MiB) plus a command,
    the rest waits unparsed; a legitimate host reads and writes meanwhile;
    the attackers' replies all come out intact once they read."""
    t = nvme_target(gc=False)
    volume(t, tmp_path)
    c = Client(t.sock)
    legit_io(t.port).t.close()
    base = rss(t.proc.pid)
    attackers = [discovery(t.port, "127.0.0.%d" % (2 + i)) for i in range(4)]
    for a in attackers:
        a.t.sock.sendall(log_page_cmds(400))
    s = settle(c)
    grown = rss(t.proc.pid) - base
    assert 4 * MiB <= s["buffered_bytes"] <= 4 * (5 * MiB + (256 << 10)), s
    assert grown < 48 * MiB, grown                     # before: +400 MiB per connection
    legit_io(t.port).t.close()                         # served all along
    d = discovery(t.port, "127.0.0.1")
    assert NQN.encode() in d.get_log(0x70, 4096)
    d.t.close()
    # back-pressure loses nothing: an attacker that reads gets its replies in order
    a = attackers[0]
    for cid in range(100, 116):
        ptype, _, header, data = a.next_pdu()
        assert ptype == pdu.C2H_DATA and len(data) == MiB and data[:8] != bytes(8)
        ptype, _, header, _ = a.next_pdu()
        assert ptype == pdu.RSP and pdu.RSP_HDR.unpack(header)[9:11] == (cid, 0)
    for a in attackers:
        a.t.reset()
    s = wait_for(lambda: c.stats()["connections"] == 0 and c.stats())
    assert s and s["buffered_bytes"] == 0, c.stats()


# ---- row 2: R2T before the opcode was checked ---------------------------------------------
def test_no_r2t_before_the_command_is_checked(nvme_target, tmp_path):
    """Writes the queue would refuse get their status at once, no R2T: on
    discovery (no write there), a read-only or missing namespace, past the
    end.  An H2CData nobody asked for ends the connection before a byte of
    its data is allocated."""
    t = nvme_target(gc=False)
    volume(t, tmp_path, readonly=True, allow_any_host=True)
    rw = NQN + "-rw"
    Client(t.sock).add(rw, sparse(tmp_path, "rw.img"), str(uuid.uuid4()), allow_any_host=True)
    h = discovery(t.port)
    for opcode in (0x01, 0x09, 0x05, 0x81):              # write, DSM, odd ones
        status, _, _, _ = h.submit(dict(opcode=opcode, nsid=1), data=bytes(MiB))
        assert status & 0x7FF in (st.INVALID_OPCODE, st.INVALID_FIELD), hex(status)
    for nqn, checks in (
            (NQN, [(dict(opcode=0x01, nsid=1, cdw12=2047), st.NS_WRITE_PROTECTED),
                   (dict(opcode=0x09, nsid=1), st.NS_WRITE_PROTECTED),
                   (dict(opcode=0x01, nsid=2, cdw12=2047), st.INVALID_NS),
                   (dict(opcode=0x7F, nsid=0x01), st.CMD_SEQ_ERROR),
                   (dict(opcode=0x7F, nsid=0x05), st.SGL_INVALID_DATA)]),
            (rw, [(dict(opcode=0x01, nsid=1, cdw12=7), st.SGL_INVALID_DATA),
                  (dict(opcode=0x01, nsid=1, cdw10=65535, cdw12=2047), st.LBA_RANGE),
                  (dict(opcode=0x09, nsid=1), st.SGL_INVALID_DATA),
                  (dict(opcode=0x05, nsid=1), st.INVALID_OPCODE)])):
        admin, cntlid = controller(t.port, nqn, "nqn.2014-08.org.example:attacker")
        admin.set_features(0x07, 0)
        io = Host(Attacker(t.port))
        io.icreq()
        io.connect(nqn, "nqn.2014-08.org.example:attacker", qid=1, cntlid=cntlid, kato=0)
        for fields, want in checks:
            status, _, _, _ = io.submit(fields, data=bytes(MiB))
            assert status & 0x7FF == want, (nqn, fields, hex(status))
    # 1 MiB of data announced for a transfer never granted: TermReq, closed
    h.t.sock.sendall(pdu.DATA_HDR.pack(pdu.H2C_DATA, 0, 24, 24, 24 + MiB, 1, 0, 0, MiB) + b"xxxx")
    assert h.next_pdu()[0] == pdu.C2H_TERM
    with pytest.raises(EOFError):
        h.next_pdu()


def test_granted_write_data_is_bounded(nvme_target, tmp_path):
    """A host allowed on a volume queues 128 1 MiB writes and sends 4 bytes
    of each granted transfer: R2Ts past the connection's budget wait, so 4
    connections pin a few MiB each (before: +1 GiB for 107 KB sent); the
    legitimate host writes meanwhile; the waiting R2Ts come as the first
    writes complete."""
    t = nvme_target(gc=False)
    volume(t, tmp_path, allow_any_host=True)
    c = Client(t.sock)
    legit_io(t.port).t.close()
    base = rss(t.proc.pid)
    queues = []
    for i in range(4):
        admin, cntlid = controller(t.port, NQN, "nqn.2014-08.org.example:attacker%d" % i)
        admin.set_features(0x07, 0)
        io = Host(Attacker(t.port, "127.0.0.%d" % (2 + i), rcvbuf=1 << 20))
        io.icreq()
        io.connect(NQN, "nqn.2014-08.org.example:attacker%d" % i, qid=1, cntlid=cntlid,
                   sqsize=127, kato=0)
        io.t.sock.sendall(b"".join(pdu.capsule_cmd(build_sqe(
            0x01, 1 + k, 1, cdw10=k % 16 * 2048, cdw12=2047, sgl_len=MiB)) for k in range(128)))
        queues.append((admin, io))
    granted = []
    for admin, io in queues:
        ptype, _, header, _ = io.next_pdu()
        assert ptype == pdu.R2T
        r2ts = [header]
        io.t.sock.settimeout(0.5)
        try:
            while True:
                ptype, _, header, _ = io.next_pdu()
                assert ptype == pdu.R2T
                r2ts.append(header)
        except socket.timeout:
            pass
        io.t.sock.settimeout(10)
        assert len(r2ts) <= 5, len(r2ts)                  # 4 MiB of budget (+ the first)
        for hdr in r2ts:
            cid, ttag = pdu.DATA_HDR.unpack(hdr)[5:7]
            io.t.send(pdu.DATA_HDR.pack(pdu.H2C_DATA, 0, 24, 24, 28, cid, ttag, 0, 4) + b"abcd")
        granted.append(r2ts)
    s = settle(c)
    assert s["buffered_bytes"] <= 4 * 5 * MiB, s
    assert rss(t.proc.pid) - base < 48 * MiB
    legit_io(t.port).t.close()                        # served meanwhile
    # the rest of a granted transfer completes it, and the next R2T comes
    admin, io = queues[0]
    cid, ttag = pdu.DATA_HDR.unpack(granted[0][0])[5:7]
    io.t.send(pdu.h2c_data(cid, ttag, bytes(MiB - 4), 4))
    seen = set()
    while not (pdu.RSP in seen and pdu.R2T in seen):
        seen.add(io.next_pdu()[0])
    for admin, io in queues:
        io.t.reset()
        Attacker.reset(admin.t)
    s = wait_for(lambda: c.stats()["connections"] == 0 and c.stats())
    assert s["buffered_bytes"] == 0, s


# ---- row 3: idle connections ------------------------------------------------------------
def test_idle_connections_have_a_deadline_and_a_cap(nvme_target, tmp_path):
    """500 connections from 10 addresses that never complete Connect (half
    send half an ICReq): at most --max-pending wait at once, 16 per address,
    each costs no receive buffer, all are closed within the connect deadline
    (before: +128 MiB, all open after 62 s); a legitimate host connects and
    works meanwhile."""
    t = nvme_target("--connect-timeout", "2", "--max-pending", "64",
                    "--max-pending-per-host", "16", gc=False)
    volume(t, tmp_path)
    c = Client(t.sock)
    legit_io(t.port).t.close()
    base = rss(t.proc.pid)
    idle = []
    for i in range(500):
        s = socket.socket()
        s.bind(("127.0.0.%d" % (2 + i % 10), 0))
        s.connect(("127.0.0.1", t.port))
        if i % 2:
            s.sendall(pdu.icreq()[:60])
        idle.append(s)
    s = settle(c, "pending_connections", timeout=4)
    assert s["pending_connections"] <= 64 and s["evicted_connections"] >= 400, s
    admin = legit_io(t.port)                          # gets in and works
    assert rss(t.proc.pid) - base < 24 * MiB
    s = wait_for(lambda: c.stats()["pending_connections"] == 0 and c.stats(), timeout=6)
    assert s and s["connect_timeouts"] >= 1 and s["connections"] == 1, c.stats()
    closed = 0
    for s in idle:
        s.settimeout(5)
        try:
            closed += s.recv(4096) == b""
        except ConnectionResetError:
            closed += 1
        s.close()
    assert closed == 500
    admin.identify(1)                                 # established: not on the deadline
    admin.t.close()


def test_connection_cap(nvme_target, tmp_path):
    t = nvme_target("--max-connections", "8")
    volume(t, tmp_path)
    held = [socket.create_connection(("127.0.0.1", t.port)) for _ in range(8)]
    extra = socket.create_connection(("127.0.0.1", t.port), timeout=5)
    assert extra.recv(10) == b""                      # accepted and closed at once
    assert Client(t.sock).stats()["refused_connections"] >= 1
    held.pop().close()
    held.pop().close()
    wait_for(lambda: Client(t.sock).stats()["connections"] <= 6)
    legit_io(t.port).t.close()                        # slots again
    for s in held:
        s.close()


# ---- row 4: freed without the cycle collector -------------------------------------------
def test_closed_connections_are_freed_without_the_cycle_collector(nvme_target, tmp_path):
    """Three rounds of 8 connections that each pin replies (16 unread 1 MiB
    log pages), a controller and an I/O queue, then vanish: with gc off,
    memory returns after each round (before: +~100 MiB a round, kept)."""
    t = nvme_target(gc=False)
    volume(t, tmp_path, allow_any_host=True)
    c = Client(t.sock)
    legit_io(t.port).t.close()
    after = []
    for _ in range(3):
        conns = []
        for i in range(8):
            h = discovery(t.port, "127.0.0.%d" % (2 + i))
            h.t.sock.sendall(log_page_cmds(16))
            conns.append(h)
        admin, cntlid = controller(t.port, NQN)
        admin.set_features(0x07, 0)
        io = Host(SocketTransport(("127.0.0.1", t.port)))
        io.icreq()
        io.connect(NQN, qid=1, cntlid=cntlid, kato=0)
        io.write(0, os.urandom(MiB))
        settle(c)
        for h in conns + [admin, io]:
            Attacker.reset(h.t)
        s = wait_for(lambda: c.stats()["connections"] == 0 and c.stats())
        assert s and s["buffered_bytes"] == 0 and s["controllers"] == 0, c.stats()
        assert s["live_subsystems"] == 0
        after.append(rss(t.proc.pid))
    assert after[2] - after[0] < 24 * MiB, [x // MiB for x in after]
    legit_io(t.port).t.close()


# ---- row 5: out of file descriptors -----------------------------------------------------
def test_accept_backs_off_when_out_of_descriptors(nvme_target, tmp_path):
    """The target's descriptor limit is reached (RLIMIT_NOFILE 64, 100
    connections): accepting pauses instead of spinning (before: a core busy
    and 246k log lines in 5 s), a connected host keeps working, and new
    connections are accepted again once descriptors are free."""
    t = TargetProcess(tmp_path, ["--connect-timeout", "3"],
                      launcher=["prlimit", "--nofile=48:48", sys.executable, "-m", "sr_tools"])
    t.start()
    try:
        volume(t, tmp_path)
        admin, cntlid = controller(t.port, NQN)
        admin.set_features(0x07, 0)
        io = Host(SocketTransport(("127.0.0.1", t.port)))
        io.icreq()
        io.connect(NQN, qid=1, cntlid=cntlid, kato=0)
        flood = []
        for i in range(100):
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", t.port))
            flood.append(s)
        time.sleep(0.5)
        lines0, cpu0 = t.output().count("\n"), cpu_seconds(t.proc.pid)
        data = os.urandom(64 << 10)
        for k in range(20):                           # served while the target is full
            io.write(k * 128, data)
            assert io.read(k * 128, 128) == data
            admin.ok(dict(opcode=0x18))                # keep alive
            time.sleep(0.1)
        cpu, lines = cpu_seconds(t.proc.pid) - cpu0, t.output().count("\n") - lines0
        assert cpu < 1.0, cpu                         # 2 s: not a core spinning
        assert lines < 40, t.output()[-3000:]
        assert "Too many open files" in t.output()
        for s in flood:
            s.close()
        legit = wait_for(lambda: _try_connect(t.port), timeout=10, step=0.2)
        assert legit, t.output()[-3000:]
        legit.t.close()
        io.t.close()
        admin.t.close()
    finally:
        t.proc.kill()
        t.proc.wait()


def _try_connect(port):
    try:
        h, _ = controller(port, NQN)
        return h
    except (OSError, EOFError):
        return None


# ---- row 9: only volumes ------------------------------------------------------------------
def test_target_add_serves_only_volumes(nvme_target, tmp_path):
    """`zfs-ng target add` refuses what is not a volume, with a message: a
    system file, a directory, /proc, a path that does not exist, an image
    file outside --file-dir; it accepts block devices and files under
    --file-dir.  The registry and its directory are private."""
    images = tmp_path / "images"
    images.mkdir()
    state_dir = tmp_path / "state"
    env = dict(os.environ, PYTHONPATH=ROOT)
    t = TargetProcess(tmp_path, ["--file-dir", str(images)])   # not the tests' directories
    t.state = str(state_dir / "target.db")
    t.start()
    try:
        assert os.stat(t.state).st_mode & 0o777 == 0o600
        assert os.stat(str(state_dir)).st_mode & 0o777 == 0o700
        outside = sparse(tmp_path, "outside.img")
        inside = sparse(images, "inside.img")

        def add(path, n):
            return subprocess.run(
                [sys.executable, "-m", "sr_tools", "target", "add", "--socket", t.sock,
                 "nqn.2014-08.org.zfs-ng:sr1:v%d" % n, path, "--uuid", str(uuid.uuid4()),
                 "--allow-any-host"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, universal_newlines=True)

        for n, (path, why) in enumerate([
                ("/etc/passwd", "regular file outside"), ("/etc", "a directory"),
                ("/proc/self/environ", "regular file outside"), ("/dev/null", "character device"),
                (str(tmp_path / "nope.img"), "No such file"), (outside, "regular file outside"),
                (str(images / ".." / "outside.img"), "regular file outside")]):
            r = add(path, n)
            assert r.returncode == 1 and "refusing %s: " % path in r.stderr and why in r.stderr \
                and "Traceback" not in r.stderr, (path, r.stderr)
        assert Client(t.sock).list() == []
        r = add(inside, 10)
        assert r.returncode == 0, r.stderr
        blk = next((d for d in ("/dev/loop0", "/dev/vda", "/dev/sda") if _is_block(d)), None)
        if blk:
            assert add(blk, 11).returncode == 0
        h, _ = controller(t.port, "nqn.2014-08.org.zfs-ng:sr1:v10")
        h.t.close()
    finally:
        t.stop()


def _is_block(path):
    import stat
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def test_connect_refuses_a_path_that_is_no_longer_a_volume(tmp_path):
    """A registry row that does not name a volume (written before these
    checks, or a path replaced since): Connect refuses it."""
    from nvmeof_target.registry import Registry
    from nvmeof_target.target import Target
    from nvmeof_target.queue import Queue
    reg = Registry(":memory:")
    reg.add(NQN, "/etc/passwd", str(uuid.uuid4()), allow_any_host=True)
    target = Target(reg, file_dirs=[str(tmp_path)])
    h = Host(QueueTransport(Queue(target)))
    h.icreq()
    with pytest.raises(NvmeStatus) as e:
        h.connect(NQN)
    assert e.value.status & 0x7FF == st.CONNECT_INVALID_PARAM and not target.live
