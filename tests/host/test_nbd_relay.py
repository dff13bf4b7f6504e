"""The nbd+tls relay (plugins/datapath/nbd_relay.py, nbd_server/relay.py)
against our real NBD server over TCP and TLS with client certificates
(tests/e2e/pki/nbdtls), restarted under it.  The relay's client here is a
simple-reply client written out below (the kernel's NBD client speaks only
simple replies; the real kernel through nbd-client is in the VM:
tests/e2e/test_datapath_nbdtls.py) and libnbd (nbdcopy), which falls back to
simple replies when the relay refuses structured ones.

What a node restart must not do: fail a request, or lose an acknowledged
write, even one the node lost because it crashed before a FLUSH (simulated:
the server is stopped and the range it acknowledged is put back as it was
before the write, as a lost page cache would).  A node that refuses the export
after a restart (the grant was revoked) ends the relay at once."""

import hashlib
import os
import shutil
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from nbd_server import constants as C
from nbd_server import run as nbd_run
from nbd_server.client import Connection
from nbd_server.relay import Relay
from nbd_server.transmission import REQUEST, SIMPLE_REPLY, ProtocolError
from plugins.datapath import nbd_relay
from conftest import free_port, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKI = os.path.join(ROOT, "tests", "e2e", "pki", "nbdtls")
MiB = 1 << 20


class Node(object):
    """Our NBD server on 127.0.0.1 with the node's certificate, h1 allowed."""

    def __init__(self, tmp, exports):
        self.tmp, self.exports, self.port, self.pid = tmp, exports, free_port(), None

    def start(self, exports=None):
        n = os.path.join(PKI, "node")
        self.pid = nbd_run.start(exports or self.exports, tcp="127.0.0.1:%d" % self.port,
                                 log_path=os.path.join(self.tmp, "nbd.log"),
                                 tls_cert=os.path.join(n, "cert.pem"),
                                 tls_key=os.path.join(n, "key.pem"),
                                 tls_ca=os.path.join(n, "ca.pem"),
                                 tls_allow=["CN=h1,O=zfs-ng test"])

    def stop(self):
        if self.pid:
            nbd_run.stop(self.pid)
            self.pid = None


@pytest.fixture
def node(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    n = Node(str(tmp_path), [{"name": "d", "path": img}])
    n.img = img
    n.start()
    yield n
    n.stop()


def start_relay(node, tmp_path, **kw):
    h1 = os.path.join(PKI, "h1")
    sock = str(tmp_path / "relay.sock")
    got = nbd_relay.start(sock, "127.0.0.1", node.port, "d", os.path.join(h1, "client-cert.pem"),
                          os.path.join(h1, "client-key.pem"), os.path.join(h1, "ca-cert.pem"),
                          tls_hostname="node", **kw)
    got["sock"] = sock
    return got


class Simple(object):
    """A simple-reply NBD client on the relay's socket (as the kernel's)."""

    def __init__(self, sock_path):
        self.c = Connection(sock_path, unix=sock_path, timeout=120)
        self.size, self.flags = self.c.go("d")
        self.cookie = 0

    def send(self, cmd, offset=0, data=b"", length=None, flags=0):
        self.cookie += 1
        n = len(data) if length is None else length
        self.c.sock.sendall(REQUEST.pack(C.REQUEST_MAGIC, flags, cmd, self.cookie, offset, n)
                            + data)
        return self.cookie

    def reply(self, length=0):
        """-> (cookie, error, data)"""
        magic, error, cookie = SIMPLE_REPLY.unpack(bytes(self.c._recv(SIMPLE_REPLY.size)))
        assert magic == C.SIMPLE_REPLY_MAGIC
        data = bytes(self.c._recv(length)) if length and not error else b""
        return cookie, error, data

    def call(self, cmd, offset=0, data=b"", length=None):
        ck = self.send(cmd, offset, data, length)
        got, error, out = self.reply(length if cmd == C.CMD_READ else 0)
        assert got == ck
        return error, out


def test_node_restart_loses_nothing_acknowledged(node, tmp_path):
    r = start_relay(node, tmp_path, reconnect_seconds=30)
    assert r["size"] == 4 * MiB and not r["readonly"]
    d = Simple(r["sock"])
    assert d.size == 4 * MiB and d.flags & C.FLAG_SEND_FLUSH and not d.flags & C.FLAG_READ_ONLY
    w1, w2, w3 = os.urandom(MiB), os.urandom(MiB), os.urandom(MiB)
    assert d.call(C.CMD_WRITE, 0, w1) == (0, b"")
    assert d.call(C.CMD_FLUSH) == (0, b"")
    assert d.call(C.CMD_WRITE, MiB, w2) == (0, b"")          # acknowledged, not flushed
    # the node "crashes": stopped, and what it acknowledged since the last
    # FLUSH is gone from its disk (a lost page cache)
    node.stop()
    with open(node.img, "r+b") as f:
        f.seek(MiB)
        f.write(bytes(MiB))
    # a write and a read go out while the node is away (back in 2 s): they
    # wait, no error (the relay reads no more of them while it reconnects, so
    # the node comes back from another thread)
    back = threading.Timer(2.0, node.start)
    back.start()
    ck3 = d.send(C.CMD_WRITE, 2 * MiB, w3)
    ck4 = d.send(C.CMD_READ, 0, length=MiB)
    back.join()
    assert d.reply() == (ck3, 0, b"")
    assert d.reply(MiB) == (ck4, 0, w1)
    assert d.call(C.CMD_FLUSH) == (0, b"")
    # W2 was replayed before anything else went out: all three are there
    err, got = d.call(C.CMD_READ, 0, length=3 * MiB)
    assert err == 0 and got == w1 + w2 + w3
    with open(node.img, "rb") as f:
        assert f.read(3 * MiB) == w1 + w2 + w3
    assert nbd_relay.alive(r["pid"], r["sock"])
    d.c.sock.sendall(REQUEST.pack(C.REQUEST_MAGIC, 0, C.CMD_DISC, 99, 0, 0))
    d.c.close()
    assert wait_for(lambda: not nbd_relay.alive(r["pid"], r["sock"]), 10)


def test_a_client_that_leaves_before_its_first_request_is_followed(node, tmp_path):
    """nbd-client that lost its /dev/nbdN to another connect (NLE_BUSY) leaves
    after its handshake and tries the next device with the same socket."""
    r = start_relay(node, tmp_path)
    first = Simple(r["sock"])
    first.c.close()
    d = Simple(r["sock"])
    assert d.call(C.CMD_WRITE, 0, b"y" * 4096) == (0, b"")
    assert d.call(C.CMD_READ, 0, length=4096) == (0, b"y" * 4096)
    assert not os.path.exists(r["sock"])          # chosen: no third client
    d.c.close()
    assert wait_for(lambda: not nbd_relay.alive(r["pid"], r["sock"]), 10)


def test_a_refused_export_ends_the_relay_at_once(node, tmp_path):
    r = start_relay(node, tmp_path, reconnect_seconds=60)
    d = Simple(r["sock"])
    assert d.call(C.CMD_WRITE, 0, b"x" * 4096) == (0, b"")
    node.stop()
    node.start([{"name": "other", "path": node.img}])       # "d" is no longer granted
    t0 = time.time()
    d.send(C.CMD_READ, 0, length=4096)
    with pytest.raises(Exception):
        d.reply(4096)                                      # the relay closed our side
    assert time.time() - t0 < 20, "waited for the reconnect deadline"
    assert wait_for(lambda: not nbd_relay.alive(r["pid"], r["sock"]), 10)


def test_an_unreachable_node_fails_the_start_clearly(tmp_path):
    h1 = os.path.join(PKI, "h1")
    with pytest.raises(nbd_relay.RelayFailed) as e:
        nbd_relay.start(str(tmp_path / "r.sock"), "127.0.0.1", free_port(), "d",
                        os.path.join(h1, "client-cert.pem"), os.path.join(h1, "client-key.pem"),
                        os.path.join(h1, "ca-cert.pem"), tls_hostname="node")
    assert "127.0.0.1" in str(e.value)


def test_a_forged_certificate_is_refused_at_start(node, tmp_path):
    f = os.path.join(PKI, "forged")
    with pytest.raises(nbd_relay.RelayFailed):
        nbd_relay.start(str(tmp_path / "r.sock"), "127.0.0.1", node.port, "d",
                        os.path.join(f, "client-cert.pem"), os.path.join(f, "client-key.pem"),
                        os.path.join(PKI, "h1", "ca-cert.pem"), tls_hostname="node")


@pytest.mark.skipif(not shutil.which("nbdcopy"), reason="needs libnbd's nbdcopy")
def test_libnbd_reads_through_the_relay(node, tmp_path):
    data = os.urandom(4 * MiB)
    with open(node.img, "r+b") as f:
        f.write(data)
    r = start_relay(node, tmp_path)
    out = str(tmp_path / "copy.img")
    p = subprocess.run(["nbdcopy", "--connections=1", "nbd+unix:///d?socket=" + r["sock"], out],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    with open(out, "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
    assert wait_for(lambda: not nbd_relay.alive(r["pid"], r["sock"]), 10)


# -- the sans-IO core -------------------------------------------------------------------

def _req(cmd, cookie, offset=0, data=b"", length=None):
    return REQUEST.pack(C.REQUEST_MAGIC, 0, cmd, cookie, offset,
                        len(data) if length is None else length) + data


def _replies_to(relay):
    """Answer everything relay sent up with success; -> [(our cookie, cmd)]."""
    out, buf = [], bytes(relay.to_up)
    del relay.to_up[:]
    while buf:
        _, _, cmd, cookie, _, n = REQUEST.unpack_from(buf)
        buf = buf[REQUEST.size + (n if cmd == C.CMD_WRITE else 0):]
        out.append((cookie, cmd, n))
    for cookie, cmd, n in out:
        relay.from_up(SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, 0, cookie)
                      + (bytes(n) if cmd == C.CMD_READ else b""))
    return [(c, cmd) for c, cmd, _ in out]


def test_the_log_is_trimmed_by_flushes_and_bounded_by_its_own():
    r = Relay(log_limit=3 * 4096)
    r.from_down(_req(C.CMD_WRITE, 7, 0, b"a" * 4096) + _req(C.CMD_WRITE, 8, 4096, b"b" * 4096))
    _replies_to(r)
    assert r.log_size() == (2, 8192)
    replies = bytes(r.to_down)
    assert [SIMPLE_REPLY.unpack_from(replies, i)[2] for i in (0, 16)] == [7, 8]
    r.from_down(_req(C.CMD_FLUSH, 9))
    _replies_to(r)
    assert r.log_size() == (0, 0)
    # past the limit without a FLUSH from the client: the relay sends its own,
    # and its reply goes nowhere
    del r.to_down[:]
    r.from_down(b"".join(_req(C.CMD_WRITE, 10 + i, i * 4096, b"c" * 4096) for i in range(4)))
    sent = _replies_to(r)
    assert [cmd for _, cmd in sent] == [C.CMD_WRITE] * 4
    own = _replies_to(r)
    assert [cmd for _, cmd in own] == [C.CMD_FLUSH]
    assert r.log_size() == (0, 0)
    assert len(r.to_down) == 4 * SIMPLE_REPLY.size


def test_replay_comes_first_and_is_awaited():
    r = Relay()
    r.from_down(_req(C.CMD_WRITE, 1, 0, b"a" * 512))
    _replies_to(r)
    r.from_down(_req(C.CMD_READ, 2, 0, length=512))       # in flight when the link breaks
    r.lost()
    r.from_down(_req(C.CMD_FLUSH, 3))                     # arrives while away
    assert not r.to_up
    r.made()
    first = _replies_to(r)                                # only the replay went out
    assert [cmd for _, cmd in first] == [C.CMD_WRITE]
    rest = _replies_to(r)                                 # then the READ and the FLUSH, in order
    assert [cmd for _, cmd in rest] == [C.CMD_READ, C.CMD_FLUSH]
    assert r.log_size() == (0, 0) and r.unanswered() == 0


def test_a_refused_replay_is_fatal():
    r = Relay()
    r.from_down(_req(C.CMD_WRITE, 1, 0, b"a" * 512))
    _replies_to(r)
    r.lost()
    r.made()
    cookie = REQUEST.unpack_from(bytes(r.to_up))[3]      # the replayed WRITE
    r.from_up(SIMPLE_REPLY.pack(C.SIMPLE_REPLY_MAGIC, C.EPERM, cookie))
    assert r.fatal and "replayed" in r.fatal


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_server_replies(data):
    r = Relay()
    r.from_down(_req(C.CMD_READ, 5, 0, length=64) + _req(C.CMD_FLUSH, 6))
    try:
        r.from_up(data)
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_client_requests(data):
    r = Relay()
    try:
        r.from_down(data)
    except ProtocolError:
        pass
