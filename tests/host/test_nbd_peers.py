"""nbd_server against real userspace peers: nbdinfo, nbdcopy, qemu-img,
qemu-io, python libnbd, an XO-style client, over unix sockets and loopback
TCP.  The server runs as `python -m nbd_server serve`, started with
nbd_server.run.start as the datapath plugins do."""

import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from nbd_server import constants as C
from nbd_server import run as nbd_run
from nbd_server.exports import Export, ExportTable
from nbd_server.server import Server
from conftest import free_port
from nbd_peer import recv_exact, xo_connect

MiB = 1 << 20
SIZE = 32 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"      # python3-libnbd is a Debian package


def sh(*argv, **kw):
    kw.setdefault("check", True)
    return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120, **kw)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Served:
    def __init__(self, tmp):
        self.tmp = tmp
        self.disk = str(tmp / "disk.img")
        self.snap = str(tmp / "snap.img")
        self.sock = str(tmp / "nbd.sock")
        self.port = free_port()
        self.log = str(tmp / "nbd.log")

    def uri(self, name, tcp=False):
        if tcp:
            return "nbd://127.0.0.1:%d/%s" % (self.port, name)
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    with open(s.disk, "wb") as f:        # sparse: data at 1 MiB and 5 MiB only
        f.truncate(SIZE)
        f.seek(MiB)
        f.write(b"\x11" * 65536)
        f.seek(5 * MiB)
        f.write(os.urandom(MiB))
    with open(s.snap, "wb") as f:
        f.write(os.urandom(SIZE))
    # CBT bitmap: 64 KiB blocks 0, 16 and 17 changed (MSB first)
    bitmap = bytearray(SIZE // 65536 // 8)
    bitmap[0] = 0x80
    bitmap[2] = 0xC0
    with open(str(tmp_path / "cbt"), "wb") as f:
        f.write(bitmap)
    pid = nbd_run.start([
        {"name": "disk", "path": s.disk, "description": "test disk"},
        {"name": "snap", "path": s.snap, "readonly": True,
         "bitmaps": {"since-s0": str(tmp_path / "cbt")}},
    ], unix_path=s.sock, tcp="127.0.0.1:%d" % s.port, log_path=s.log)
    s.pid = pid
    yield s
    assert nbd_run.stop(pid)
    assert not os.path.exists(s.sock)
    with open(s.log) as f:
        log = f.read()
    assert "Traceback" not in log and "internal error" not in log, log


# -- libnbd tools -------------------------------------------------------------

def test_nbdinfo_list(served):
    out = json.loads(sh("nbdinfo", "--list", "--json", served.uri("")).stdout)
    exports = {e["export-name"]: e for e in out["exports"]}
    assert sorted(exports) == ["disk", "snap"]
    disk, snap = exports["disk"], exports["snap"]
    assert disk["export-size"] == SIZE and disk["description"] == "test disk"
    assert disk["is_read_only"] is False and disk["can_multi_conn"] is True
    assert disk["can_fua"] and disk["can_trim"] and disk["can_zero"] and disk["can_flush"]
    assert snap["is_read_only"] is True
    assert snap["contexts"] == ["base:allocation", "qemu:dirty-bitmap:since-s0"]


def test_nbdinfo_map_base_allocation(served):
    out = json.loads(sh("nbdinfo", "--map", "--json", served.uri("disk")).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in out]
    assert got == [(0, MiB, 3), (MiB, 65536, 0), (MiB + 65536, 4 * MiB - 65536, 3),
                   (5 * MiB, MiB, 0), (6 * MiB, SIZE - 6 * MiB, 3)]


def test_nbdinfo_map_dirty_bitmap_over_tcp(served):
    out = json.loads(sh("nbdinfo", "--map=qemu:dirty-bitmap:since-s0", "--json",
                        served.uri("snap", tcp=True)).stdout)
    got = [(e["offset"], e["length"], e["type"]) for e in out]
    assert got == [(0, 65536, 1), (65536, 15 * 65536, 0), (16 * 65536, 2 * 65536, 1),
                   (18 * 65536, SIZE - 18 * 65536, 0)]


def test_nbdcopy_both_ways(served, tmp_path):
    src = str(tmp_path / "src.img")
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE // 2))
        f.truncate(SIZE)                                # second half sparse
    sh("nbdcopy", src, served.uri("disk"))             # 4 connections (multi-conn)
    assert sha(served.disk) == sha(src)
    out = str(tmp_path / "out.img")
    sh("nbdcopy", served.uri("disk", tcp=True), out)
    assert sha(out) == sha(src)
    out2 = str(tmp_path / "out2.img")
    sh("nbdcopy", "--request-size=%d" % (32 * MiB), served.uri("snap"), out2)
    assert sha(out2) == sha(served.snap)


def test_nbdcopy_to_a_read_only_export_fails(served, tmp_path):
    src = str(tmp_path / "src.img")
    with open(src, "wb") as f:
        f.write(b"\1" * SIZE)
    r = sh("nbdcopy", src, served.uri("snap"), check=False)
    assert r.returncode != 0


# -- qemu -----------------------------------------------------------------------

def test_qemu_img_info_convert_compare(served, tmp_path):
    info = json.loads(sh("qemu-img", "info", "--output=json", served.uri("snap")).stdout)
    assert info["virtual-size"] == SIZE
    # The legacy syntax the datapath hands to qemu (XenDisk params, Nbd uri).
    legacy = "nbd:unix:%s:exportname=snap" % served.sock
    assert json.loads(sh("qemu-img", "info", "--output=json", legacy).stdout)["virtual-size"] == SIZE
    qcow = str(tmp_path / "snap.qcow2")
    sh("qemu-img", "convert", "-O", "qcow2", served.uri("snap"), qcow)
    sh("qemu-img", "compare", served.snap, qcow)
    sh("qemu-img", "convert", "-n", "-O", "raw", qcow, served.uri("disk", tcp=True))
    assert sha(served.disk) == sha(served.snap)
    sh("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk"), served.snap)


def test_qemu_io_write_zero_discard(served):
    sh("qemu-io", "-f", "raw",
       "-c", "write -P 0x5a 0 64k",
       "-c", "write -P 0x5b -f 64k 64k",          # FUA
       "-c", "write -z 1M 64k",                     # WRITE_ZEROES over data
       "-c", "discard 5M 1M",
       "-c", "flush",
       "-c", "read -P 0x5a 0 64k",
       "-c", "read -P 0 1M 64k",
       served.uri("disk"))
    with open(served.disk, "rb") as f:
        data = f.read(6 * MiB)
    assert data[:65536] == b"\x5a" * 65536
    assert data[65536:131072] == b"\x5b" * 65536
    assert data[MiB:MiB + 65536] == bytes(65536)
    assert data[5 * MiB:6 * MiB] == bytes(MiB)
    r = sh("qemu-io", "-f", "raw", "-c", "write 0 4k", served.uri("snap"), check=False)
    assert r.returncode != 0 or "failed" in r.stdout + r.stderr


# -- python libnbd ----------------------------------------------------------------

LIBNBD_SCRIPT = textwrap.dedent("""
    import errno, json, sys, nbd
    uri, ro_uri = sys.argv[1], sys.argv[2]
    out = {}
    num = lambda e: e if isinstance(e, int) else getattr(errno, e)   # libnbd 1.14 gives names

    h = nbd.NBD()
    h.add_meta_context("base:allocation")
    h.add_meta_context("qemu:dirty-bitmap:since-s0")
    h.connect_uri(ro_uri)
    out["ro"] = h.is_read_only()
    out["sr"] = h.get_structured_replies_negotiated()
    out["bitmap_ok"] = h.can_meta_context("qemu:dirty-bitmap:since-s0")
    seen = {}
    def cb(metacontext, offset, entries, err):
        seen.setdefault(metacontext, []).append((offset, list(entries)))
        return 0
    h.block_status(4 * 65536, 0, cb)
    h.block_status(1000, 16 * 65536 + 10, cb, nbd.CMD_FLAG_REQ_ONE)
    out["status"] = seen
    try:
        h.pwrite(b"x" * 512, 0)
        out["ro_write"] = "accepted"
    except nbd.Error as e:
        out["ro_write"] = num(e.errno)
    try:
        h.pread(4096, h.get_size() - 1024)
    except nbd.Error as e:
        out["past_end"] = num(e.errno)
    h.shutdown()

    # The kernel client's dialect: no structured replies, old EXPORT_NAME handshake.
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.set_handshake_flags(0)
    h.connect_uri(uri)
    h.pwrite(b"abc" * 1000, 4096, nbd.CMD_FLAG_FUA)
    out["old_read"] = h.pread(3000, 4096).decode()[:6]
    out["old_sr"] = h.get_structured_replies_negotiated()
    h.zero(65536, 0)
    h.trim(65536, 5 * 1024 * 1024)
    h.flush()
    h.shutdown()
    print(json.dumps(out))
""")


def test_python_libnbd(served, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(LIBNBD_SCRIPT)
    r = sh(SYSTEM_PYTHON, str(script), served.uri("disk"), served.uri("snap"))
    out = json.loads(r.stdout)
    assert out["ro"] is True and out["sr"] is True and out["bitmap_ok"] is True
    g = 65536
    assert out["status"]["qemu:dirty-bitmap:since-s0"] == [
        [0, [g, 1, 3 * g, 0]], [16 * g + 10, [1000, 1]]]
    assert out["status"]["base:allocation"] == [[0, [4 * g, 0]], [16 * g + 10, [1000, 0]]]
    assert out["ro_write"] == 1                         # EPERM
    assert out["past_end"] == 22                        # EINVAL
    assert out["old_read"] == "abcabc" and out["old_sr"] is False
    with open(served.disk, "rb") as f:
        assert f.read(5 * MiB + 65536)[5 * MiB:] == bytes(65536)


# -- Xen Orchestra's dialect ---------------------------------------------------------

def test_xo_style_client_2mib_reads_in_flight(served):
    s, size, flags = xo_connect(("127.0.0.1", served.port), "snap")
    assert size == SIZE and flags & C.FLAG_READ_ONLY
    block = 2 * MiB
    # 16 reads in flight, keyed by cookie; the last one runs past the end -> EINVAL.
    reqs = [(1000 + i, i * block) for i in range(SIZE // block)] + [(9999, SIZE - MiB)]
    s.sendall(b"".join(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, cookie, off, block)
                       for cookie, off in reqs))
    with open(served.snap, "rb") as f:
        want = f.read()
    got = {}
    for _ in reqs:
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == C.SIMPLE_REPLY_MAGIC
        got[cookie] = (err, recv_exact(s, block) if err == 0 else None)
    for cookie, off in reqs[:-1]:
        assert got[cookie] == (0, want[off:off + block])
    assert got[9999] == (C.EINVAL, None)
    # A short last block, as XO asks for it (truncated to the export size).
    s.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 1, SIZE - 4096, 4096))
    assert struct.unpack(">IIQ", recv_exact(s, 16))[1] == 0
    assert recv_exact(s, 4096) == want[-4096:]
    s.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_DISC, 2, 0, 0))
    assert s.recv(1) == b""                             # DISC: no reply, connection closed
    s.close()


def test_unknown_export_name_disconnects(served):
    s = socket.socket(socket.AF_UNIX)
    s.connect(served.sock)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 1) + struct.pack(">QII", C.IHAVEOPT, C.OPT_EXPORT_NAME, 4) + b"nope")
    assert s.recv(10) == b""
    s.close()


def test_garbage_request_magic_disconnects_and_server_lives_on(served):
    s, _, _ = xo_connect(served.sock, "disk", socket.AF_UNIX)
    s.sendall(b"\xde\xad\xbe\xef" * 7)
    assert s.recv(16) == b""
    s.close()
    sh("nbdinfo", "--size", served.uri("disk"))


# -- server lifecycle ------------------------------------------------------------------

def test_multi_conn_shares_one_backend_and_idle_export_holds_no_fd(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    table = ExportTable([Export("d", img)])
    server = Server(table, unix_path=str(tmp_path / "s.sock"))
    server.listen()
    t = threading.Thread(target=server.serve_forever)
    t.start()

    def fds_on_image():
        n = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                n += os.readlink("/proc/self/fd/" + fd) == img
            except OSError:
                pass
        return n

    try:
        assert fds_on_image() == 0
        a, _, _ = xo_connect(str(tmp_path / "s.sock"), "d", socket.AF_UNIX)
        b, _, _ = xo_connect(str(tmp_path / "s.sock"), "d", socket.AF_UNIX)
        assert table.open_count("d") == 2 and fds_on_image() == 1
        # A write on one connection is read on the other (one shared page cache).
        a.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, C.CMD_FLAG_FUA, C.CMD_WRITE, 1, 0, 4)
                  + b"ping")
        assert struct.unpack(">IIQ", recv_exact(a, 16))[1] == 0
        b.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 2, 0, 4))
        assert recv_exact(b, 20)[16:] == b"ping"
        a.close()
        b.close()
        deadline = time.time() + 5
        while table.open_count("d") and time.time() < deadline:
            time.sleep(0.02)
        assert table.open_count("d") == 0 and fds_on_image() == 0
    finally:
        server.shutdown()
        t.join(10)
    assert not t.is_alive() and not os.path.exists(str(tmp_path / "s.sock"))


def test_sigterm_with_a_connected_client_is_a_clean_exit(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    sock = str(tmp_path / "s.sock")
    proc = subprocess.Popen(nbd_run.argv([{"name": "d", "path": img}], unix_path=sock),
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        c, _, _ = xo_connect(sock, "d", socket.AF_UNIX)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert c.recv(1) == b""                         # the server closed our connection
        c.close()
        assert not os.path.exists(sock)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_connection_limit(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    sock = str(tmp_path / "s.sock")
    pid = nbd_run.start([{"name": "d", "path": img}], unix_path=sock, max_connections=1)
    try:
        for _ in range(50):     # start()'s readiness probe may still hold the one slot
            try:
                a, _, _ = xo_connect(sock, "d", socket.AF_UNIX)
                break
            except EOFError:
                time.sleep(0.1)
        b = socket.socket(socket.AF_UNIX)
        b.settimeout(10)
        b.connect(sock)
        assert b.recv(18) == b""                        # refused: no greeting
        b.close()
        a.close()
    finally:
        nbd_run.stop(pid)


def test_cli_errors_are_messages_not_tracebacks(tmp_path):
    cli = os.path.join(os.path.dirname(sys.executable), "zfs-ng")
    base = [cli, "nbd", "serve", "--unix", str(tmp_path / "s.sock")]
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    cases = [
        (["--export", "x=/nonexistent"], "export 'x': /nonexistent does not exist"),
        (["--export", "novalue"], "export must be NAME=PATH[:ro]"),
        (["--export", "x=%s" % img, "--bitmap", "y", "b", "/f"], "no --export named 'y'"),
        (["--export", "x=%s" % img, "--bitmap", "x", "b", "/f"], "bitmap /f: No such file"),
        (["--export", "x=%s" % img, "--allocation", "x", str(img)], "not JSON"),
        (["--export", "x=%s:ro" % tmp_path], "a directory; only block devices"),
        (["--export", "x=/etc/passwd"], "a regular file outside"),
        (["--export", "x=%s" % img, "--export", "x=%s" % img], "export 'x' given twice"),
        (["--export", "x=%s" % img, "--tcp", "nope"], "TCP address must be ADDR:PORT"),
        (["--export", "x=%s" % img, "--tls-required"], "--tls-required needs"),
    ]
    for args, message in cases:
        r = sh(*(base + args), check=False)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    with pytest.raises(RuntimeError, match="does not exist"):
        nbd_run.start([{"name": "x", "path": "/nonexistent"}], unix_path=str(tmp_path / "t.sock"))
    # the JSON front end the datapaths spawn: same checks, a message, no traceback
    for opts, message in (('{"exports": ["x=%s"]}' % img, "give --unix PATH"),
                          ('{"bogus": 1}', "unknown options: bogus"), ('[1]', "JSON object")):
        r = sh(sys.executable, "-m", "nbd_server", "--json", opts, check=False)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- TLS -------------------------------------------------------------------------------

def test_starttls_then_go(tmp_path):
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
       "-days", "1", "-subj", "/CN=zfs-ng-test")
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.write(b"secret" * 1000)
        f.truncate(MiB)
    sock = str(tmp_path / "s.sock")
    pid = nbd_run.start([{"name": "d", "path": img}], unix_path=sock, tls_cert=cert,
                        tls_key=key, tls_required=True)
    try:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(sock)
        recv_exact(s, 18)
        s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
        go = struct.pack(">I", 1) + b"d" + struct.pack(">H", 0)
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, len(go)) + go)
        _, _, rep, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        assert rep == C.REP_ERR_TLS_REQD
        s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_STARTTLS, 0))
        assert struct.unpack(">QIII", recv_exact(s, 20))[2] == C.REP_ACK
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE                 # as XO: rejectUnauthorized false
        t = ctx.wrap_socket(s)
        t.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, len(go)) + go)
        while True:
            _, _, rep, n = struct.unpack(">QIII", recv_exact(t, 20))
            recv_exact(t, n)
            if rep == C.REP_ACK:
                break
            assert rep == C.REP_INFO
        t.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, 5, 0, 12))
        assert recv_exact(t, 28)[16:] == b"secretsecret"
        t.close()
        # libnbd (GnuTLS) as a TLS client; without TLS it is refused.
        r = sh("nbdinfo", "--json", "nbds+unix:///d?socket=%s&tls-verify-peer=false" % sock)
        assert json.loads(r.stdout)["TLS"] is True
        r = sh("nbdcopy", "nbds+unix:///d?socket=%s&tls-verify-peer=false" % sock,
               str(tmp_path / "copy.img"))
        assert sha(str(tmp_path / "copy.img")) == sha(img)
        assert sh("nbdinfo", "nbd+unix:///d?socket=%s" % sock, check=False).returncode != 0
    finally:
        nbd_run.stop(pid)


# -- parallel workers per connection ------------------------------------------------------

def test_parallel_workers(tmp_path):
    img, src, out = (str(tmp_path / n) for n in ("d.img", "src.img", "out.img"))
    with open(img, "wb") as f:
        f.truncate(SIZE)
    with open(src, "wb") as f:
        f.write(os.urandom(SIZE))
    sock = str(tmp_path / "s.sock")
    pid = nbd_run.start([{"name": "d", "path": img}], unix_path=sock, workers=4,
                        log_path=str(tmp_path / "log"))
    try:
        uri = "nbd+unix:///d?socket=" + sock
        sh("nbdcopy", "--connections=1", "--requests=64", src, uri)
        sh("nbdcopy", uri, out)
        assert sha(img) == sha(src) == sha(out)
        sh("qemu-img", "bench", "-f", "raw", "-t", "none", "-c", "2000", "-d", "16", "-s", "4096",
           "-w", uri)
        s, size, _ = xo_connect(sock, "d", socket.AF_UNIX)
        reqs = [(7000 + i, i * MiB) for i in range(16)] + [(9999, SIZE)]
        s.sendall(b"".join(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, c, o, MiB)
                           for c, o in reqs))
        got = {}
        for _ in reqs:                                  # any order, keyed by cookie
            _, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            got[cookie] = (err, recv_exact(s, MiB) if err == 0 else None)
        want = open(img, "rb").read()
        assert all(got[c] == (0, want[o:o + MiB]) for c, o in reqs[:-1])
        assert got[9999] == (C.EINVAL, None)
        s.sendall(struct.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_DISC, 1, 0, 0))
        assert s.recv(1) == b""
        s.close()
    finally:
        nbd_run.stop(pid)
    assert "Traceback" not in open(str(tmp_path / "log")).read()


def test_client_vanishing_during_go_leaks_no_backend(tmp_path):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    table = ExportTable([Export("d", img)])
    server = Server(table, unix_path=str(tmp_path / "s.sock"))
    server.listen()
    t = threading.Thread(target=server.serve_forever)
    t.start()
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(tmp_path / "s.sock"))
            recv_exact(s, 18)
            go = struct.pack(">I", 1) + b"d" + struct.pack(">H", 0)
            # GO, then gone at once (RST): the server's reply may hit a dead socket.
            s.sendall(struct.pack(">I", 3) + struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, len(go))
                      + go)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        deadline = time.time() + 5
        while table.open_count("d") and time.time() < deadline:
            time.sleep(0.02)
        assert table.open_count("d") == 0
    finally:
        server.shutdown()
        t.join(10)


def test_zfs_ng_nbd_ls(served, tmp_path):
    cli = os.path.join(os.path.dirname(sys.executable), "zfs-ng")
    r = sh(cli, "nbd", "ls", "--unix", served.sock, "--json")
    rows = {e["name"]: e for e in json.loads(r.stdout)}
    assert rows["disk"] == {"name": "disk", "description": "test disk", "size": SIZE,
                            "readonly": False, "multi_conn": True,
                            "contexts": ["base:allocation"]}
    assert rows["snap"]["readonly"] is True
    assert rows["snap"]["contexts"] == ["base:allocation", "qemu:dirty-bitmap:since-s0"]
    table = sh(cli, "nbd", "ls", "--tcp", "127.0.0.1:%d" % served.port)
    assert table.stdout.splitlines()[0].split() == ["NAME", "SIZE", "READONLY", "MULTI_CONN",
                                                    "CONTEXTS", "DESCRIPTION"]
    # The same client against another server: qemu-nbd.
    sock = str(tmp_path / "q.sock")
    q = subprocess.Popen(["qemu-nbd", "-f", "raw", "-r", "-x", "qx", "-k", sock, served.snap],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock) and time.time() < deadline:
            time.sleep(0.05)
        r = sh(cli, "nbd", "ls", "--unix", sock, "--json")
        (row,) = json.loads(r.stdout)
        assert row["name"] == "qx" and row["size"] == SIZE and row["readonly"] is True
    finally:
        q.terminate()
        q.wait(10)
    r = sh(cli, "nbd", "ls", "--unix", str(tmp_path / "none"), check=False)
    assert r.returncode == 1 and "No such file" in r.stderr and "Traceback" not in r.stderr
