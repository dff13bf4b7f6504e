"""NBD over TLS with client certificates (nbd_server/tlsauth.py): a CA and an
allow list of client identities, as qemu-nbd's tls-creds-x509 verify-peer +
tls-authz.  Real peers on the host: libnbd (nbdinfo, nbdcopy) and qemu-img
with certificate directories, certificates made here with openssl.  A client
without a certificate, with one from another CA, or with an identity not on
the list gets nothing: no export listed, described or read."""

import hashlib
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time

import pytest

from nbd_server import constants as C
from nbd_server import run as nbd_run
from nbd_server import tlsauth
from conftest import free_port
from nbd_peer import client_dir, make_ca, make_leaf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "nbdinfo",
                                                                   "nbdcopy", "qemu-img")),
                                reason="needs openssl, libnbd tools and qemu-img")


def sh(*argv, **kw):
    kw.setdefault("check", True)
    return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120, **kw)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(d, "/CN=zfs-ng test CA")
    od = os.path.join(d, "other")
    os.mkdir(od)
    other = make_ca(od, "/CN=another CA")
    server = make_leaf(d, "server", "/CN=localhost", ca, "serverAuth",
                   "DNS:localhost,IP:127.0.0.1")
    good = make_leaf(d, "client1", "/O=ZfsNg/CN=client1", ca, "clientAuth")
    xo = make_leaf(d, "xo", "/C=FR/O=Example, Inc./CN=xo", ca, "clientAuth")
    intruder = make_leaf(d, "intruder", "/O=ZfsNg/CN=intruder", ca, "clientAuth")
    forged = make_leaf(od, "client1", "/O=ZfsNg/CN=client1", other, "clientAuth")   # same name
    p = {"dir": d, "ca": ca[1], "server": server}
    p["good"] = client_dir(d, "c-good", ca[1], *good)
    p["xo"] = client_dir(d, "c-xo", ca[1], *xo)
    p["intruder"] = client_dir(d, "c-intruder", ca[1], *intruder)
    p["forged"] = client_dir(d, "c-forged", ca[1], *forged)
    p["nocert"] = client_dir(d, "c-nocert", ca[1], None, None)
    p["good_raw"], p["intruder_raw"] = good, intruder
    return p


@pytest.fixture
def served(tmp_path, pki):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.write(os.urandom(2 * MiB))
    sock = str(tmp_path / "s.sock")
    port = free_port()
    log = str(tmp_path / "nbd.log")
    pid = nbd_run.start([{"name": "d", "path": img}], unix_path=sock,
                        tcp="127.0.0.1:%d" % port, log_path=log, verbose=1,
                        tls_cert=pki["server"][1], tls_key=pki["server"][0], tls_ca=pki["ca"],
                        tls_allow=["CN=client1,O=ZfsNg", "CN=xo,O=Example\\, Inc.,C=FR"])
    try:
        yield {"img": img, "sock": sock, "port": port, "log": log}
    finally:
        nbd_run.stop(pid)


def nbdinfo(uri, *args):
    return sh("nbdinfo", "--json", *(list(args) + [uri]), check=False)


def unix_uri(served, certdir, name="d"):
    return "nbds+unix:///%s?socket=%s&tls-certificates=%s" % (name, served["sock"], certdir)


# qemu checks the server certificate against a host name: a unix socket has none
IMAGE_OPTS = ("driver=nbd,server.type=unix,server.path=%s,export=d,tls-creds=tls0,"
              "tls-hostname=localhost")


def qemu_img(served, certdir, *args):
    return sh("qemu-img", *(list(args[:1]) + [
        "--object", "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % certdir,
        "--image-opts", IMAGE_OPTS % served["sock"]] + list(args[1:])), check=False)


def test_allowed_clients_read_with_libnbd_and_qemu(served, pki, tmp_path):
    r = nbdinfo(unix_uri(served, pki["good"]))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 2 * MiB
    out = str(tmp_path / "copy.img")
    r = sh("nbdcopy", unix_uri(served, pki["good"]), out, check=False)
    assert r.returncode == 0, r.stderr
    assert sha(out) == sha(served["img"])
    # over TCP too (the server certificate names 127.0.0.1)
    r = nbdinfo("nbds://127.0.0.1:%d/d?tls-certificates=%s" % (served["port"], pki["good"]))
    assert r.returncode == 0, r.stderr
    # the second allowed identity, with an escaped comma in its O
    assert nbdinfo(unix_uri(served, pki["xo"])).returncode == 0
    # qemu-img (GnuTLS through qemu's tls-creds-x509)
    r = qemu_img(served, pki["good"], "info", "--output=json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["virtual-size"] == 2 * MiB
    out2 = str(tmp_path / "qcopy.img")
    r = sh("qemu-img", "convert", "-O", "raw", "--object",
           "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % pki["good"], "--image-opts",
           IMAGE_OPTS % served["sock"], out2, check=False)
    assert r.returncode == 0, r.stderr
    assert sha(out2) == sha(served["img"])
    assert "client certificate CN=client1,O=ZfsNg allowed" in open(served["log"]).read()


@pytest.mark.parametrize("who", ["intruder", "forged", "nocert"])
def test_other_clients_get_nothing(served, pki, who):
    for args in ((), ("--list",)):
        r = nbdinfo(unix_uri(served, pki[who]), *args)
        assert r.returncode != 0, r.stdout
        assert "export-size" not in r.stdout
    assert qemu_img(served, pki[who], "info").returncode != 0
    # no TLS at all: only STARTTLS is accepted before TLS
    r = nbdinfo("nbd+unix:///d?socket=%s" % served["sock"], "--list")
    assert r.returncode != 0 and "export-size" not in r.stdout
    if who == "intruder":
        assert "client certificate CN=intruder,O=ZfsNg is not allowed" in \
            open(served["log"]).read()


def _raw_starttls(served, ctx):
    """STARTTLS by hand, then LIST: the export names if the server answers."""
    s = socket.create_connection(("127.0.0.1", served["port"]), timeout=10)
    s.recv(18)
    s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_STARTTLS, 0))
    hdr = b""
    while len(hdr) < 20:
        hdr += s.recv(20 - len(hdr))
    assert struct.unpack(">QIII", hdr)[2] == C.REP_ACK
    t = ctx.wrap_socket(s, server_hostname="localhost")
    t.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_LIST, 0))
    got = b""
    while True:
        try:
            chunk = t.recv(4096)
        except (OSError, ssl.SSLError):
            break
        if not chunk:
            break
        got += chunk
        if len(got) >= 20 and struct.unpack(">QIII", got[-20:])[2] == C.REP_ACK:
            break
    t.close()
    return got


def test_refused_before_the_first_option(served, pki):
    """The check runs right after the handshake: a client with a certificate
    the CA signed but an identity not on the list sends LIST and gets
    nothing back, not even an error reply."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    ctx.load_cert_chain(pki["good_raw"][1], pki["good_raw"][0])
    assert b"\x00\x00\x00\x01d" in _raw_starttls(served, ctx)          # the export name
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki["ca"])
    ctx.load_cert_chain(pki["intruder_raw"][1], pki["intruder_raw"][0])
    assert _raw_starttls(served, ctx) == b""


def test_ca_without_allow_list_takes_any_certificate_of_the_ca(tmp_path, pki):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    sock = str(tmp_path / "s.sock")
    # the admin CLI this time (zfs-ng nbd serve), with --tls-ca alone
    proc = subprocess.Popen(
        [sys.executable, "-m", "sr_tools", "nbd", "serve", "--unix", sock, "--export",
         "d=%s" % img, "--tls-cert", pki["server"][1], "--tls-key", pki["server"][0],
         "--tls-ca", pki["ca"]], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
        stderr=subprocess.PIPE, universal_newlines=True)
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
        served = {"sock": sock}
        assert nbdinfo(unix_uri(served, pki["intruder"])).returncode == 0
        assert nbdinfo(unix_uri(served, pki["forged"])).returncode != 0
        assert nbdinfo(unix_uri(served, pki["nocert"])).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_usage_errors(tmp_path, pki):
    img = str(tmp_path / "d.img")
    with open(img, "wb") as f:
        f.truncate(MiB)
    base = [sys.executable, "-m", "sr_tools", "nbd", "serve", "--unix", str(tmp_path / "x.sock"),
            "--export", "d=%s" % img]
    cert = ["--tls-cert", pki["server"][1], "--tls-key", pki["server"][0]]
    for args, message in ((cert + ["--tls-allow", "CN=a"], "--tls-allow needs --tls-ca"),
                          (["--tls-ca", pki["ca"]], "need --tls-cert"),
                          (cert + ["--tls-ca", pki["ca"], "--tls-allow", "client1"],
                           "want ATTR=VALUE")):
        r = subprocess.run(base + args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=60)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, \
            r.stderr
    # the JSON front end the datapaths spawn carries the same options
    argv = nbd_run.argv([{"name": "d", "path": img}], unix_path="/x", tls_cert="c", tls_key="k",
                        tls_ca="ca", tls_allow=["CN=a"])
    opts = json.loads(argv[-1])
    assert opts["tls_ca"] == "ca" and opts["tls_allow"] == ["CN=a"]


def test_identity_parsing_and_matching():
    assert tlsauth.parse_identity("CN=a, o=Example\\, Inc.") == [("CN", "a"),
                                                                ("O", "Example, Inc.")]
    assert tlsauth.parse_identity("emailAddress=x@y") == [("EMAILADDRESS", "x@y")]
    for bad in ("", "client1", "CN=", "=x", "CN=a\\"):
        with pytest.raises(ValueError):
            tlsauth.parse_identity(bad)
    cert = {"subject": ((("countryName", "FR"),), (("organizationName", "Example, Inc."),),
                        (("commonName", "xo"),))}
    subj = tlsauth.subject_of(cert)
    assert tlsauth.dn_string(subj) == "CN=xo,O=Example\\, Inc.,C=FR"
    ok = [tlsauth.parse_identity("CN=xo")]
    assert tlsauth.allowed(subj, ok)
    assert tlsauth.allowed(subj, [tlsauth.parse_identity(tlsauth.dn_string(subj))])
    assert not tlsauth.allowed(subj, [tlsauth.parse_identity("CN=xo,O=Other")])
    assert not tlsauth.allowed(subj, [tlsauth.parse_identity("CN=XO")])      # values exact
    assert not tlsauth.allowed([], ok)
