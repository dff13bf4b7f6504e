"""nbd+tls on the host: the URI (parse, the one builder, a hypothesis fuzz of the
parser), the node's grant/claim records (node_nbd.py, ZFS stood in for by
image files), the host datapath's refusals before it asks the node, and the
node's one NBD-over-TLS endpoint (`zfs-ng nbd serve-node`) with real TLS on
loopback: certificates made here with openssl, libnbd (nbdinfo, nbdcopy) as
the client.  An export is served only to the identity granted it, read-only
when granted so; other CAs, other identities and revoked grants get nothing.
The kernel side is tests/e2e/test_datapath_nbdtls.py."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as hst

from plugins import records, smapi, uri
from plugins.datapath import devices, nbdtls, node, node_nbd
from conftest import free_port, wait_for
from nbd_peer import client_dir, make_ca, make_leaf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRU = "5b1f2a8e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"
MiB = 1 << 20


# -- URIs ---------------------------------------------------------------------------

def test_uri_build_and_parse():
    u = uri.nbd_tls_uri("10.0.0.5", 10809, SRU, "vol1@snap")
    assert u == "nbd+tls://10.0.0.5:10809/%s/vol1@snap" % SRU
    p = uri.parse(u)
    assert (p.scheme, p.host, p.port, p.sr, p.key) == ("nbd+tls", "10.0.0.5", 10809, SRU,
                                                      "vol1@snap")
    assert p.volume_id == "%s/vol1@snap" % SRU
    assert p.subnqn == uri.subnqn_for(SRU, "vol1@snap")      # shared claim records
    v6 = uri.parse(uri.nbd_tls_uri("fd00::1", 1, SRU, "k"))
    assert (v6.host, v6.port, v6.uri) == ("fd00::1", 1, "nbd+tls://[fd00::1]:1/%s/k" % SRU)
    assert uri.nbd_tls_export(SRU, "k") == "%s/k" % SRU
    assert uri.split_nbd_tls_export("%s/k" % SRU) == (SRU, "k")


@pytest.mark.parametrize("bad", [
    "nbd+tls://h/%s/k" % SRU, "nbd+tls://h:0/%s/k" % SRU, "nbd+tls://h:65536/%s/k" % SRU,
    "nbd+tls://h:1\u00b2/%s/k" % SRU, "nbd+tls://h:10809/%s" % SRU, "nbd+tls://h:10809/%s/" % SRU,
    "nbd+tls://h:10809/tank/k", "nbd+tls://h:10809/%s/k" % SRU.upper(),
    "nbd+tls://-h:10809/%s/k" % SRU, "nbd+tls://h;x:10809/%s/k" % SRU,
    "nbd+tls://h:10809/%s/a/b" % SRU, "nbd+tls://h:10809/%s/-k" % SRU,
    "nbd+tls://h:10809/%s/k k" % SRU, "nbd+tls://[fd00::1]/%s/k" % SRU,
])
def test_bad_nbd_tls_uris_refused(bad):
    with pytest.raises(uri.BadUri):
        uri.parse(bad)


@pytest.mark.parametrize("args", [
    ("-h", 1, SRU, "k"), ("h", 0, SRU, "k"), ("h", True, SRU, "k"), ("h", "1", SRU, "k"),
    ("h", 1, "tank", "k"), ("h", 1, SRU, "a/b"), ("h", 1, SRU, ""),
])
def test_builder_validates(args):
    with pytest.raises(uri.BadUri):
        uri.nbd_tls_uri(*args)


@settings(max_examples=600, deadline=None)
@given(hst.text(max_size=120))
def test_fuzz_parser_raises_only_baduri(text):
    for s in (text, "nbd+tls://" + text, "nbd+tls://h:1/" + text, "nbd+tls://%s/%s/k" % (text, SRU)):
        try:
            p = uri.parse(s)
        except uri.BadUri:
            continue
        if p.scheme == uri.NBD_TLS:     # whatever parses is what the builder makes
            assert uri.nbd_tls_uri(p.host, p.port, p.sr, p.key) == s


@settings(max_examples=300, deadline=None)
@given(hst.from_regex(r"\A[a-z0-9][a-z0-9-]{0,20}(\.[a-z0-9]{1,8}){0,2}\Z"),
       hst.integers(1, 65535), hst.uuids(), hst.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,60}\Z"))
def test_fuzz_build_parse_roundtrip(host, port, sr, key):
    s = uri.nbd_tls_uri(host, port, str(sr), key)
    p = uri.parse(s)
    assert (p.host, p.port, p.sr, p.key) == (host, port, str(sr), key)


# -- the node's records ------------------------------------------------------------------

@pytest.fixture
def node_dir(tmp_path, monkeypatch):
    """Node ops in-process, ZFS replaced by image files: devices.acquire gives
    a file per key (snapshots, keys with '@', read-only)."""
    monkeypatch.setenv("ZFSNG_NODE_RUN_DIR", str(tmp_path / "node"))
    monkeypatch.setenv("ZFSNG_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("ZFSNG_NODE_COMMAND", raising=False)
    imgs = tmp_path / "img"
    imgs.mkdir()
    users = {}

    def acquire(pool, key, user, link=True):
        p = imgs / key
        if not p.exists():
            p.write_bytes(b"\0" * 4 * MiB)
        users.setdefault(key, set()).add(user)
        return {"device": str(p), "readonly": "@" in key, "size": 4 * MiB, "uuid": key}

    def release(pool, key, user):
        users.get(key, set()).discard(user)

    monkeypatch.setattr(devices, "acquire", acquire)
    monkeypatch.setattr(devices, "release", release)
    from plugins.volume import sr
    monkeypatch.setattr(sr, "attached_pool", lambda sr_uuid: "tank")
    return {"dir": tmp_path / "node", "img": imgs, "users": users}


def test_grant_claim_revoke_records(node_dir):
    g = node.OPS["nbd_grant"](sr_uuid=SRU, key="v1", client="h1", mode="rw")
    assert g == {"export": "%s/v1" % SRU, "readonly": False, "size": 4 * MiB}
    assert node.OPS["nbd_grant"](sr_uuid=SRU, key="v1", client="h1", mode="rw") == g
    assert node_nbd.lookup("h1", "%s/v1" % SRU)["path"] == str(node_dir["img"] / "v1")
    assert node_nbd.lookup("h2", "%s/v1" % SRU) is None
    assert node_nbd.names("h1") == ["%s/v1" % SRU] and node_nbd.names("h2") == []
    node.OPS["nbd_grant"](sr_uuid=SRU, key="v1", client="h2", mode="rw")
    node_nbd.nbd_claim(SRU, "v1", "h1", "rw")
    node_nbd.nbd_claim(SRU, "v1", "h1", "rw")                 # idempotent
    for mode in ("rw", "ro"):
        with pytest.raises(smapi.SmapiError) as e:
            node_nbd.nbd_claim(SRU, "v1", "h2", mode)
        assert e.value.name == "Activated_on_another_host" and "h1" in e.value.message
    # nvme+tcp hosts share the rule: one record per volume
    with pytest.raises(smapi.SmapiError) as e:
        with records.volume_lock(uri.subnqn_for(SRU, "v1")) as st:
            records.claim_in(st, "nqn.2014-08.org.zfs-ng:nvme-host", "ro")
    assert e.value.name == "Activated_on_another_host"
    node_nbd.nbd_unclaim(SRU, "v1", "h1")
    node_nbd.nbd_claim(SRU, "v1", "h2", "rw")                 # migrated
    with pytest.raises(smapi.SmapiError) as e:
        node_nbd.nbd_claim(SRU, "v1", "h3", "ro")
    assert e.value.name == "Not_attached"                      # never granted
    node_nbd.nbd_revoke(SRU, "v1", "h2")
    node_nbd.nbd_revoke(SRU, "v1", "h2")                       # idempotent
    assert node_nbd.lookup("h2", "%s/v1" % SRU) is None
    node_nbd.nbd_claim(SRU, "v1", "h1", "rw")                  # h2's claim went with it
    assert node_dir["users"]["v1"] == {node_nbd.NBD_USER}
    node_nbd.nbd_revoke(SRU, "v1", "h1")
    assert node_dir["users"]["v1"] == set()                    # last client: released
    assert node_nbd.names("h1") == []


def test_read_only_grants(node_dir):
    snap = node.OPS["nbd_grant"](sr_uuid=SRU, key="v1@s1", client="h1", mode="rw")
    assert snap["readonly"] is True
    assert node_nbd.lookup("h1", "%s/v1@s1" % SRU)["readonly"] is True
    ro = node_nbd.nbd_grant(SRU, "v2", "h1", mode="ro")
    assert ro["readonly"] is True
    for key in ("v1@s1", "v2"):
        with pytest.raises(smapi.SmapiError) as e:
            node_nbd.nbd_claim(SRU, key, "h1", "rw")
        assert e.value.name == "Volume_read_only"
        node_nbd.nbd_claim(SRU, key, "h1", "ro")
    node_nbd.nbd_grant(SRU, "v1@s1", "h2")
    node_nbd.nbd_claim(SRU, "v1@s1", "h2", "ro")               # many read-only hosts


@pytest.mark.parametrize("args", [
    dict(sr_uuid="tank", key="k", client="h1"), dict(sr_uuid=SRU, key="../k", client="h1"),
    dict(sr_uuid=SRU, key="k", client="nqn.2014-08.org.x:h"), dict(sr_uuid=SRU, key="k", client=""),
    dict(sr_uuid=SRU, key="k", client="../h"), dict(sr_uuid=SRU, key="k", client="h1", mode="x"),
])
def test_node_ops_validate(node_dir, args):
    with pytest.raises(smapi.SmapiError) as e:
        node_nbd.nbd_grant(**args)
    assert e.value.name == "Invalid_parameters"


def test_node_op_over_the_transport(node_dir):
    """`python3 -m plugins.node_ops nbd_...`: JSON in, JSON out, errors as SMAPI."""
    env = dict(os.environ, ZFSNG_NODE_RUN_DIR=str(node_dir["dir"]))
    p = subprocess.run([sys.executable, "-m", "plugins.node_ops", "nbd_claim"],
                       input=json.dumps({"sr_uuid": SRU, "key": "k", "client": "h1",
                                         "mode": "rw"}) + "\n", cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert json.loads(p.stdout) == {"error": ["Not_attached", "h1 is not granted %s/k" % SRU]}
    p = subprocess.run([sys.executable, "-m", "plugins.node_ops", "nbd_revoke"],
                       input=json.dumps({"sr_uuid": SRU, "key": "k", "client": "h1"}) + "\n",
                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    assert json.loads(p.stdout) == {"result": None}, p.stderr


def test_lookup_refuses_foreign_names(node_dir):
    node_nbd.nbd_grant(SRU, "v1", "h1")
    for ident, name in (("h1", "/%s/v1" % SRU), ("h1", "%s/v1/" % SRU), ("../h1", "%s/v1" % SRU),
                        ("h1", "../../etc/passwd"), (None, "%s/v1" % SRU), ("h1", ""),
                        ("H1", "%s/v1" % SRU)):
        assert node_nbd.lookup(ident, name) is None


# -- the host datapath refuses before asking the node -------------------------------------

def _call(method, **params):
    dp = nbdtls.NbdTlsDatapath()
    return getattr(dp, method)(**params)


def test_attach_without_client_or_credentials_is_unavailable(node_dir, tmp_path, monkeypatch,
                                                             pki):
    asked = []
    monkeypatch.setattr(node, "call", lambda *a, **k: asked.append(a))
    u = uri.nbd_tls_uri("127.0.0.1", 10809, SRU, "v1")
    monkeypatch.setenv("ZFSNG_NBD_CLIENT_DIR", str(tmp_path / "none"))
    with pytest.raises(smapi.SmapiError) as e:
        _call("attach", uri=u, domain="3")
    assert e.value.name == "Nbd_client_unavailable" and "is missing" in e.value.message
    monkeypatch.setenv("ZFSNG_NBD_CLIENT_DIR", pki["h1"])
    monkeypatch.setenv("ZFSNG_NBD_CLIENT", "")
    with pytest.raises(smapi.SmapiError) as e:
        _call("attach", uri=u, domain="3")
    assert e.value.name == "Nbd_client_unavailable" and "nbd-client not found" in e.value.message
    # (nbd-client needs no TLS of its own: the relay does TLS, nbd_relay.py)
    assert asked == []
    _call("detach", uri=u, domain="3")                          # never fails
    assert nbdtls.identity(uri.parse(u), nbdtls.credentials(uri.parse(u))) == "h1"


def test_identity_is_the_certificate_cn(pki):
    assert nbdtls._subject_cn(os.path.join(pki["h1"], "client-cert.pem")) == "h1"
    assert nbdtls._subject_cn(os.path.join(pki["h2"], "client-cert.pem")) == "h2"


# -- the node's endpoint, real TLS -----------------------------------------------------------

pytestmark_tools = pytest.mark.skipif(not all(shutil.which(t) for t in ("openssl", "nbdinfo",
                                                                         "nbdcopy")),
                                      reason="needs openssl and libnbd tools")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("needs openssl")
    d = str(tmp_path_factory.mktemp("pki"))
    ca = make_ca(d, "/CN=zfs-ng pool CA")
    od = os.path.join(d, "other")
    os.mkdir(od)
    other = make_ca(od, "/CN=another CA")
    server = make_leaf(d, "node", "/CN=node", ca, "serverAuth", "DNS:localhost,IP:127.0.0.1")
    p = {"ca": ca[1], "server": server}
    for name in ("h1", "h2"):
        p[name] = client_dir(d, "c-" + name, ca[1], *make_leaf(d, name, "/O=pool/CN=" + name, ca,
                                                             "clientAuth"))
    p["forged"] = client_dir(d, "c-forged", ca[1], *make_leaf(od, "h1", "/O=pool/CN=h1", other,
                                                           "clientAuth"))
    p["nocert"] = client_dir(d, "c-nocert", ca[1], None, None)
    return p


@pytest.fixture
def endpoint(node_dir, pki, tmp_path):
    port = free_port()
    log = open(str(tmp_path / "serve-node.log"), "w")
    env = dict(os.environ, ZFSNG_NODE_RUN_DIR=str(node_dir["dir"]))
    p = subprocess.Popen([sys.executable, "-m", "sr_tools", "nbd", "serve-node", "-v",
                          "--listen", "127.0.0.1:%d" % port, "--cert", pki["server"][1],
                          "--key", pki["server"][0], "--ca", pki["ca"]],
                         cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import socket
        assert wait_for(lambda: _accepts(socket, port), 30)
        yield dict(node_dir, port=port, log=str(tmp_path / "serve-node.log"))
    finally:
        p.terminate()
        p.wait(30)
        log.close()


def _accepts(socket, port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _sh(*argv):
    return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=120)


def _url(ep, certdir, export):
    return "nbds://127.0.0.1:%d/%s?tls-certificates=%s" % (ep["port"], export, certdir)


def _sha(path, n=None):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


@pytestmark_tools
def test_endpoint_serves_grants_to_their_identity_only(endpoint, pki, tmp_path):
    ep = endpoint
    e1 = node_nbd.nbd_grant(SRU, "v1", "h1")["export"]
    e2 = node_nbd.nbd_grant(SRU, "v2", "h2")["export"]
    es = node_nbd.nbd_grant(SRU, "v1@s1", "h2")["export"]     # a snapshot: read-only
    (ep["img"] / "v1").write_bytes(os.urandom(4 * MiB))
    # h1 lists and reads only its own export
    r = _sh("nbdinfo", "--json", "--list", _url(ep, pki["h1"], ""))
    assert r.returncode == 0, r.stderr
    assert [x["export-name"] for x in json.loads(r.stdout)["exports"]] == [e1]
    out = str(tmp_path / "copy")
    r = _sh("nbdcopy", _url(ep, pki["h1"], e1), out)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == _sha(str(ep["img"] / "v1"))
    # ...and writes it (granted read-write)
    src = tmp_path / "src"
    src.write_bytes(b"\x5a" * 4 * MiB)
    r = _sh("nbdcopy", str(src), _url(ep, pki["h1"], e1))
    assert r.returncode == 0, r.stderr
    assert (ep["img"] / "v1").read_bytes() == src.read_bytes()
    for export in (e2, es):                     # granted to h2, not h1
        r = _sh("nbdinfo", "--json", _url(ep, pki["h1"], export))
        assert r.returncode != 0 and "export-size" not in r.stdout
    r = _sh("nbdinfo", "--json", "--list", _url(ep, pki["h2"], ""))
    assert sorted(x["export-name"] for x in json.loads(r.stdout)["exports"]) == sorted([e2, es])
    info = json.loads(_sh("nbdinfo", "--json", _url(ep, pki["h2"], es)).stdout)
    assert info["exports"][0]["is_read_only"] is True
    r = _sh("nbdcopy", str(src), _url(ep, pki["h2"], es))
    assert r.returncode != 0                       # read-only
    # another CA's certificate with the same CN, or none: nothing
    for who in ("forged", "nocert"):
        for args in (("--list", _url(ep, pki[who], "")), (_url(ep, pki[who], e1),)):
            r = _sh("nbdinfo", "--json", *args)
            assert r.returncode != 0 and "export-size" not in r.stdout, (who, r.stdout)
    # revoked: the next connection is refused
    node_nbd.nbd_revoke(SRU, "v1", "h1")
    r = _sh("nbdinfo", "--json", _url(ep, pki["h1"], e1))
    assert r.returncode != 0
    r = _sh("nbdinfo", "--json", "--list", _url(ep, pki["h1"], ""))
    assert r.returncode == 0 and json.loads(r.stdout)["exports"] == []


def test_serve_node_needs_its_files(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sr_tools", "nbd", "serve-node", "--listen",
                        "127.0.0.1:1", "--cert", str(tmp_path / "no.pem")], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode != 0 and "no such file" in p.stderr and "Traceback" not in p.stderr


def test_revoke_cuts_an_open_connection(endpoint, pki):
    """A connection open when its grant is revoked is cut before its next
    request (within a second); an unrevoked neighbour goes on."""
    import ssl
    import struct as st
    from nbd_server import constants as C
    from nbd_server.client import Connection, NbdError
    ep = endpoint
    (ep["img"] / "v1").write_bytes(os.urandom(MiB))
    (ep["img"] / "v2").write_bytes(os.urandom(MiB))
    e1 = node_nbd.nbd_grant(SRU, "v1", "h1")["export"]
    e2 = node_nbd.nbd_grant(SRU, "v2", "h1")["export"]

    def connect(export):
        d = pki["h1"]
        ctx = ssl.create_default_context(cafile=os.path.join(d, "ca-cert.pem"))
        ctx.load_cert_chain(os.path.join(d, "client-cert.pem"), os.path.join(d, "client-key.pem"))
        c = Connection(export, tcp=("127.0.0.1", ep["port"]), timeout=30,
                       tls=(ctx, "127.0.0.1"))
        c.go(export)
        return c

    def read(c, cookie):
        c.sock.sendall(st.pack(">IHHQQI", C.REQUEST_MAGIC, 0, C.CMD_READ, cookie, 0, 4096))
        magic, err, ck = st.unpack(">IIQ", bytes(c._recv(16)))
        assert (magic, err, ck) == (C.SIMPLE_REPLY_MAGIC, 0, cookie)
        return bytes(c._recv(4096))

    c1, c2 = connect(e1), connect(e2)
    assert read(c1, 1) == (ep["img"] / "v1").read_bytes()[:4096]
    node_nbd.nbd_revoke(SRU, "v1", "h1")
    time.sleep(1.2)
    with pytest.raises((NbdError, OSError, AssertionError)):
        read(c1, 2)                                  # cut, no data
    assert read(c2, 3) == (ep["img"] / "v2").read_bytes()[:4096]
    assert "grant was revoked; connection cut" in open(ep["log"]).read()
    c1.close()
    c2.close()


def test_holders_and_release_from_the_cli(node_dir, monkeypatch):
    """`zfs-ng vol holders/release` on the node's records (ZFS and the
    NVMe/TCP target stood in for: which revoke runs for which holder is what
    is checked here; the real fencing is in the VM, test_datapath_nbdtls.py)."""
    from click.testing import CliRunner
    from plugins.volume import sr as srmod
    from sr_tools.vol_attach_cmds import group
    monkeypatch.setattr(srmod, "read_root_props",
                        lambda pool: {"sr-uuid": SRU} if pool == "tank" else None)
    nq = "nqn.2014-08.org.zfs-ng:nvme-host"
    subnqn = uri.subnqn_for(SRU, "v1")
    node_nbd.nbd_grant(SRU, "v1", "h2", "rw")
    node_nbd.nbd_claim(SRU, "v1", "h2", "rw")
    with records.volume_lock(subnqn) as st:
        st.shared.setdefault("hosts", []).append(nq)         # granted over NVMe/TCP
    revoked = []

    def revoke(s, h):                                        # the target's side of it
        revoked.append((s, h))
        with records.volume_lock(s) as st:
            st.shared["hosts"].remove(h)
            st.active.pop(h, None)
    monkeypatch.setattr(node, "revoke", revoke)

    def cli(*args):
        r = CliRunner().invoke(group, list(args))
        return r.exit_code, r.output

    rc, out = cli("holders", "tank", "v1", "--json")
    assert rc == 0, out
    assert json.loads(out) == [
        {"holder": "h2", "transport": "nbd+tls", "granted": True, "active": "rw"},
        {"holder": nq, "transport": "nvme+tcp", "granted": True, "active": "-"}]
    rc, out = cli("release", "tank", "v1", "h2", "--json")
    assert (rc, json.loads(out)) == (0, {"holder": "h2", "transport": "nbd+tls",
                                         "released": True})
    assert node_nbd.lookup("h2", "%s/v1" % SRU) is None and revoked == []
    rc, out = cli("release", "tank", "v1", nq, "--json")
    assert rc == 0 and revoked == [(subnqn, nq)]
    assert json.loads(cli("holders", "tank", "v1", "--json")[1]) == []
    rc, out = cli("release", "tank", "v1", "h2", "--json")           # again: nothing held
    assert rc == 0 and json.loads(out)["released"] is False
    rc, out = cli("holders", "nope", "v1")
    assert rc == 1 and "not a zfs-ng SR" in out and "Traceback" not in out
