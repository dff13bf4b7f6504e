"""NVMe in-band authentication (DH-HMAC-CHAP, nvmeof_target/auth.py).

The host side here is written again from the spec (NVMe Base 2.0 §8.13.5) and
the Linux host (drivers/nvme/host/auth.c), not with auth.py's helpers, so a
mistake in one is not mirrored in the other: the secret format, the key
transform (known answers from nvme-cli 2.13's gen-dhchap-key), R1/R2, the
augmented challenge, the RFC 7919 groups (checked against openssl and the RFC's
construction).  Then the target's state machine through the sans-IO queue and
a real `zfs-ng target serve` process, and a hypothesis fuzz of the parsers and
of the state machine."""

import base64
import hashlib
import hmac
import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from nvmeof_target import auth
from nvmeof_target import status as st
from nvmeof_target.control import handle
from nvmeof_target.nqn import DISCOVERY_NQN
from nvmeof_target.queue import Queue
from nvmeof_target.registry import Registry
from nvmeof_target.target import Target
from nvme_peer import CONNECT_DATA, HOSTNQN, Host, QueueTransport

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBNQN = "nqn.2014-08.org.zfs-ng:sr1:vol1"
OTHER = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555"

# ---- known answers ---------------------------------------------------------------------
# nvme-cli 2.13 (the test VM's), with --nqn HOSTNQN and --secret 000102...:
#   nvme gen-dhchap-key -s <32|48|64 bytes> -l <len> -n HOSTNQN -m <0..3>
# gen-dhchap-key -m N (N > 0) prints HMAC_hash(secret, NQN | "NVMe-over-Fabrics"),
# the same transform the kernel applies to a DHHC-1:0N key at use.
SEED = bytes(range(64))
KAT_NVME_CLI = {}            # filled below from the recorded output
KAT_SAMPLE = "DHHC-1:00:o0QEnbTj3L0VckJXm+r/S9dLldBJqVjyEkiTc4+EkmV70TBB:"   # gen-dhchap-key
FFDHE2048 = int(
    "FFFFFFFFFFFFFFFFADF85458A2BB4A9AAFDC5620273D3CF1D8B9C583CE2D3695"
    "A9E13641146433FBCC939DCE249B3EF97D2FE363630C75D8F681B202AEC4617A"
    "D3DF1ED5D5FD65612433F51F5F066ED0856365553DED1AF3B557135E7F57C935"
    "984F0C70E0E68B77E2A689DAF3EFE8721DF158A136ADE73530ACCA4F483A797A"
    "BC0AB182B324FB61D108A94BB2C8E3FBB96ADAB760D7F4681D4F42A3DE394DF4"
    "AE56EDE76372BB190B07A7C8EE0A6D709E02FCE1CDF7E2ECC03404CD28342F61"
    "9172FE9CE98583FF8E4F1232EEF28183C3FE3B1B4C6FAD733BB5FCBC2EC22005"
    "C58EF1837D1683B2C6F34A26C1B2EFFA886B423861285C97FFFFFFFFFFFFFFFF", 16)   # RFC 7919 A.1


# ---- the host side, from the spec ------------------------------------------------------------
H = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}


def spec_secret(text):
    """(hash id, key) of a DHHC-1 secret (NVMe Base 2.0 §8.13.5.8)."""
    head, hh, b64 = text.split(":")[:3]
    assert head == "DHHC-1"
    raw = base64.b64decode(b64)
    key, crc = raw[:-4], raw[-4:]
    assert crc == struct.pack("<I", zlib.crc32(key))
    return int(hh), key


def spec_transform(hash_id, key, nqn):
    if hash_id == 0:
        return key
    return hmac.new(key, nqn.encode() + b"NVMe-over-Fabrics", H[hash_id]).digest()


def spec_response(hash_id, key, chal, seq, tid, first, second, label):
    m = (chal + struct.pack("<I", seq) + struct.pack("<H", tid) + b"\x00" + label
         + first.encode() + b"\x00" + second.encode())
    return hmac.new(key, m, H[hash_id]).digest()


def spec_augment(hash_id, skey, chal):
    return hmac.new(H[hash_id](skey).digest(), chal, H[hash_id]).digest()


def auth_sqe(fctype, length):
    # nvmf_auth_send/receive_command: SPSP0=1 @41, SPSP1=1 @42, SECP=0xE9 @43, TL/AL @44
    return dict(opcode=0x7F, nsid=fctype, cdw10=(0xE9 << 24) | (1 << 16) | (1 << 8), cdw11=length)


class SpecHost(object):
    """Runs DH-HMAC-CHAP over a nvme_peer.Host, as the Linux host does."""

    def __init__(self, h, subnqn, hostnqn, secret, ctrl_secret=None, hashes=(1, 2, 3),
                 dhgroups=(0, 1, 2, 3, 4, 5)):
        self.h, self.subnqn, self.hostnqn = h, subnqn, hostnqn
        self.secret, self.ctrl_secret = secret, ctrl_secret
        self.hashes, self.dhgroups = hashes, dhgroups
        self.tid = 7

    def send(self, payload):
        return self.h.submit(auth_sqe(0x05, len(payload)), payload)

    def receive(self, al=4096):
        status, _, _, data = self.h.submit(auth_sqe(0x06, al), read_len=al)
        assert status == 0, "Auth Receive status %#x" % status
        assert len(data) == al
        return data

    def negotiate(self):
        idlist = bytearray(60)
        idlist[:len(self.hashes)] = bytes(self.hashes)
        idlist[30:30 + len(self.dhgroups)] = bytes(self.dhgroups)
        msg = (struct.pack("<BBHHBB", 0, 0, 0, self.tid, 0, 1)
               + struct.pack("<BBBB", 1, 0, len(self.hashes), len(self.dhgroups)) + bytes(idlist))
        assert self.send(msg)[0] == 0

    def run(self, tamper=None, c2_check=True):
        """The whole transaction; returns ("ok"|"failure1"|"bad ctrl", info)."""
        self.negotiate()
        ch = self.receive()
        atype, aid, _, tid, hl, _, hashid, dhgid, dhvlen, s1 = struct.unpack_from("<BBHHBBBBHI", ch)
        if (atype, aid) == (0, 0xF1):
            return "failure1", ch[7]
        assert (atype, aid, tid) == (1, 1, self.tid) and hl == len(H[hashid]().digest())
        c1 = ch[16:16 + hl]
        ctrl_pub = ch[16 + hl:16 + hl + dhvlen]
        self.hashid, self.dhgid = hashid, dhgid
        host_pub, skey = b"", None
        if dhgid:
            p = auth.ffdhe_prime(dhgid)          # checked against openssl/RFC below
            size = (p.bit_length() + 7) // 8
            assert len(ctrl_pub) == size
            y = int.from_bytes(os.urandom(32), "big") | 1
            host_pub = pow(2, y, p).to_bytes(size, "big")
            skey = pow(int.from_bytes(ctrl_pub, "big"), y, p).to_bytes(size, "big")
        else:
            assert dhvlen == 0
        hh, key = spec_secret(self.secret)
        kh = spec_transform(hh, key, self.hostnqn)
        ca = c1 if skey is None else spec_augment(hashid, skey, c1)
        r1 = spec_response(hashid, kh, ca, s1, self.tid, self.hostnqn, self.subnqn, b"HostHost")
        if tamper:
            r1 = tamper(r1)
        s2, c2 = 0, bytes(hl)
        if self.ctrl_secret:
            s2, c2 = 0x12345678, os.urandom(hl)
        reply = (struct.pack("<BBHHBBBBHI", 1, 2, 0, self.tid, hl, 0, 1 if s2 else 0, 0,
                             len(host_pub), s2) + r1 + c2 + host_pub)
        assert self.send(reply)[0] == 0
        s1msg = self.receive()
        atype, aid, _, tid, rhl, _, rvalid = struct.unpack_from("<BBHHBBB", s1msg)
        if (atype, aid) == (0, 0xF1):
            return "failure1", s1msg[7]
        assert (atype, aid, tid, rhl) == (1, 3, self.tid, hl)
        if self.ctrl_secret:
            assert rvalid == 1
            hc, ckey = spec_secret(self.ctrl_secret)
            kc = spec_transform(hc, ckey, self.subnqn)
            ca2 = c2 if skey is None else spec_augment(hashid, skey, c2)
            r2 = spec_response(hashid, kc, ca2, s2, self.tid, self.subnqn, self.hostnqn,
                               b"Controller")
            if s1msg[16:16 + hl] != r2 and c2_check:
                self.send(struct.pack("<BBHHBB", 0, 0xF0, 0, self.tid, 1, 1))   # Failure2
                return "bad ctrl", None
            assert self.send(struct.pack("<BBHH10x", 1, 4, 0, self.tid))[0] == 0  # Success2
        else:
            assert rvalid == 0
        return "ok", None


# ---- secrets and the transform ---------------------------------------------------------------
def test_secret_format_and_nvme_cli_sample():
    s = auth.parse_secret(KAT_SAMPLE)
    assert s.hash_id == 0 and len(s.key) == 32
    assert str(s) == KAT_SAMPLE and spec_secret(KAT_SAMPLE) == (0, s.key)
    assert auth.parse_secret(KAT_SAMPLE[:-1]).key == s.key          # trailing ':' optional
    for bad, why in ((KAT_SAMPLE.replace("o0Q", "o1Q"), "CRC"),
                     ("DHHC-1:00:" + base64.b64encode(bytes(20)).decode() + ":", "bytes"),
                     ("DHHC-1:04:" + KAT_SAMPLE[10:], "hash"),
                     ("DHHC-2:00:" + KAT_SAMPLE[10:], "DHHC-1"),
                     ("DHHC-1:00:!!!!:", "DHHC-1"), ("", "DHHC-1")):
        with pytest.raises(ValueError) as e:
            auth.parse_secret(bad)
        assert why in str(e.value)
    # a transformed key is as long as its hash (nvme gen-dhchap-key enforces it too)
    with pytest.raises(ValueError):
        auth.parse_secret(auth.format_secret(bytes(64), 1))
    for hid in (0, 1, 2, 3):
        g = auth.generate_secret(hid)
        assert spec_secret(g)[0] == hid and auth.parse_secret(g).hash_id == hid
        assert len(auth.parse_secret(g).key) == {0: 32, 1: 32, 2: 48, 3: 64}[hid]


def _kat():
    """The nvme-cli vectors: hash id -> (secret bytes, DHHC-1 it printed)."""
    return {hid: (SEED[:n], KAT_NVME_CLI[hid]) for hid, n in ((0, 32), (1, 32), (2, 48), (3, 64))
            if hid in KAT_NVME_CLI}


def test_key_transform_known_answers_from_nvme_cli():
    kat = _kat()
    assert len(kat) == 4
    for hid, (seed, printed) in sorted(kat.items()):
        _, printed_key = spec_secret(printed)
        ours = auth.Secret(seed, hid).transform(HOSTNQN)
        assert ours == printed_key == spec_transform(hid, seed, HOSTNQN), hid


def test_responses_match_the_spec_construction():
    key, chal = os.urandom(32), os.urandom(48)
    for hid in (1, 2, 3):
        c = chal[:len(H[hid]().digest())]
        assert auth.host_response(hid, key, c, 0xDEADBEEF, 0x1234, HOSTNQN, SUBNQN) == \
            spec_response(hid, key, c, 0xDEADBEEF, 0x1234, HOSTNQN, SUBNQN, b"HostHost")
        assert auth.ctrl_response(hid, key, c, 7, 9, HOSTNQN, SUBNQN) == \
            spec_response(hid, key, c, 7, 9, SUBNQN, HOSTNQN, b"Controller")
        skey = b"\x01" * 256
        assert auth.augmented_challenge(hid, skey, c) == spec_augment(hid, skey, c)


# ---- RFC 7919 groups ----------------------------------------------------------------------------
def _is_probable_prime(n, bases=(2, 3, 5, 7, 11)):
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_ffdhe2048_is_rfc7919_and_a_safe_prime():
    p = auth.ffdhe_prime(1)
    assert p == FFDHE2048
    assert _is_probable_prime(p, (2, 3)) and _is_probable_prime((p - 1) // 2, (2, 3))


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
def test_all_groups_match_openssl():
    for gid, name in ((1, "ffdhe2048"), (2, "ffdhe3072"), (3, "ffdhe4096"), (4, "ffdhe6144"),
                      (5, "ffdhe8192")):
        pem = subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt",
                              "group:" + name], stdout=subprocess.PIPE, check=True).stdout
        asn = subprocess.run(["openssl", "asn1parse"], input=pem, stdout=subprocess.PIPE,
                             check=True).stdout.decode()
        ints = [line.rsplit(":", 1)[1] for line in asn.splitlines() if "INTEGER" in line]
        assert int(ints[0], 16) == auth.ffdhe_prime(gid) and int(ints[1], 16) == 2, name


def test_dh_exchange_and_bad_peer_values():
    a, b = auth.DhGroup(1), auth.DhGroup(1)
    assert len(a.public) == 256 and a.shared(b.public) == b.shared(a.public)
    p = FFDHE2048
    for bad in (bytes(256), (1).to_bytes(256, "big"), (p - 1).to_bytes(256, "big"),
                p.to_bytes(256, "big"), b.public[:-1]):
        with pytest.raises(auth.AuthError) as e:
            a.shared(bad)
        assert e.value.reason == auth.DHGROUP_UNUSABLE


# ---- the state machine through the queue ----------------------------------------------------
class Clock(object):
    t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture(autouse=True)
def image_dir(tmp_path, monkeypatch):
    # regular files are served from configured directories only
    monkeypatch.setenv("ZFSNG_TARGET_FILE_DIRS", str(tmp_path))


@pytest.fixture
def env(tmp_path):
    path = str(tmp_path / "vol.img")
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    clock = Clock()
    target = Target(Registry(":memory:"), clock=clock)
    target.add(SUBNQN, path, str(uuid.uuid4()), allowed_hosts=[HOSTNQN, OTHER])
    return target, clock


def connect(target, subnqn=SUBNQN, hostnqn=HOSTNQN, qid=0, cntlid=0xFFFF):
    """(host, queue, status, dw0) of a Connect; dw0 keeps the AUTHREQ bits."""
    q = Queue(target)
    h = Host(QueueTransport(q))
    h.icreq()
    data = CONNECT_DATA.pack(b"\x01" * 16, cntlid, subnqn.encode(), hostnqn.encode())
    status, dw0, _, _ = h.submit(dict(opcode=0x7F, nsid=0x01, cdw10=qid << 16, cdw11=31,
                                      cdw12=5000 if qid == 0 else 0), data)
    return h, q, status, dw0


SECRET = auth.generate_secret(0)
CTRL_SECRET = auth.generate_secret(2)


@pytest.mark.parametrize("hash_name,dhgroup", [("sha256", "null"), ("sha256", "ffdhe2048"),
                                               ("sha384", "ffdhe3072"), ("sha512", "null")])
def test_unidirectional_then_admin_and_io(env, hash_name, dhgroup):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET, hash_name=hash_name, dhgroup=dhgroup)
    h, q, status, dw0 = connect(target)
    assert status == 0 and dw0 & auth.CONNECT_ATR
    cntlid = dw0 & 0xFFFF
    # nothing but authentication before it is done: 0x191 with DNR
    for fields, n in ((dict(opcode=0x7F, nsid=0x04, cdw11=0), 0),
                      (dict(opcode=0x06, cdw10=1), 4096)):
        assert h.submit(fields, read_len=n)[0] == st.AUTH_REQUIRED | st.DNR
    sh = SpecHost(h, SUBNQN, HOSTNQN, SECRET)
    assert sh.run() == ("ok", None)
    assert (sh.hashid, sh.dhgid) == (auth.HASH_IDS[hash_name], auth.DHGROUP_IDS[dhgroup])
    assert q.auth.authenticated
    h.enable()
    h.set_features(0x07, 0)
    # the I/O queue authenticates too
    io, ioq, status, dw0 = connect(target, qid=1, cntlid=cntlid)
    assert status == 0 and dw0 == cntlid | auth.CONNECT_ATR
    assert io.submit(dict(opcode=0x02, nsid=1, cdw12=0), read_len=512)[0] == \
        st.AUTH_REQUIRED | st.DNR
    assert SpecHost(io, SUBNQN, HOSTNQN, SECRET).run()[0] == "ok"
    io.write(0, b"\xAB" * 512)
    assert io.read(0, 1) == b"\xAB" * 512


def test_key_transformed_secrets_and_hash_fallback(env):
    target, _ = env
    secret = auth.generate_secret(3)                          # DHHC-1:03, 64 bytes
    target.set_host_key(HOSTNQN, secret, hash_name="sha512")
    h, q, _, _ = connect(target)
    sh = SpecHost(h, SUBNQN, HOSTNQN, secret, hashes=(1,), dhgroups=(0,))   # host has sha256 only
    assert sh.run()[0] == "ok" and (sh.hashid, sh.dhgid) == (1, 0)


def test_bidirectional(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET, CTRL_SECRET)
    h, q, _, _ = connect(target)
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET, CTRL_SECRET).run() == ("ok", None)
    assert q.auth.authenticated and not q.closing
    h.enable()


def test_bidirectional_host_refuses_a_wrong_controller_key(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET, CTRL_SECRET)
    h, q, _, _ = connect(target)
    wrong = auth.generate_secret(2)
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET, wrong).run()[0] == "bad ctrl"
    assert q.closing and not q.auth.authenticated
    q.connection_lost()
    assert target.controllers == {}


def test_bidirectional_asked_without_a_controller_secret_fails(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET)
    h, q, _, _ = connect(target)
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET, CTRL_SECRET).run() == ("failure1", auth.FAILED)
    assert q.closing


@pytest.mark.parametrize("dhgroup", ["null", "ffdhe2048"])
def test_wrong_secret_gets_failure1_and_the_controller_goes(env, dhgroup):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET, dhgroup=dhgroup)
    h, q, _, _ = connect(target)
    assert SpecHost(h, SUBNQN, HOSTNQN, auth.generate_secret(0)).run() == ("failure1", auth.FAILED)
    assert q.closing and not q.auth.authenticated
    q.connection_lost()
    assert target.controllers == {} and target.live == {}
    # one flipped bit of the right response fails the same way
    h, q, _, _ = connect(target)
    flip = lambda r: bytes([r[0] ^ 1]) + r[1:]  # noqa: E731
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET).run(tamper=flip) == ("failure1", auth.FAILED)


def test_required_auth_refuses_hosts_without_a_key(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET)
    # OTHER has no key: accepted until the volume requires authentication
    h, q, status, dw0 = connect(target, hostnqn=OTHER)
    assert status == 0 and not dw0 & auth.CONNECT_ATR
    target.set_auth_required(SUBNQN, True)
    assert q.closing                                      # disconnected by the change
    _, _, status, dw0 = connect(target, hostnqn=OTHER)
    assert status == st.CONNECT_INVALID_HOST | st.DNR and dw0 == (1 << 16) | 512
    assert target.registry.list()[0]["require_auth"]
    # the host with a key still gets in, after authenticating
    h, q, status, dw0 = connect(target)
    assert status == 0 and dw0 & auth.CONNECT_ATR
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET).run()[0] == "ok"
    target.set_auth_required(SUBNQN, False)
    assert connect(target, hostnqn=OTHER)[2] == 0


def test_discovery_never_asks(env):
    """libnvme gives a discovery controller no secret (nvmet does not ask
    either): discovery answers hosts with and without a key, required or not."""
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET)
    target.set_auth_required("*", True)
    for host in (HOSTNQN, OTHER):
        h, q, status, dw0 = connect(target, subnqn=DISCOVERY_NQN, hostnqn=host)
        assert status == 0 and not dw0 & auth.CONNECT_ATR and q.auth is None
    # while every volume wants the key
    assert connect(target, hostnqn=OTHER)[2] == st.CONNECT_INVALID_HOST | st.DNR
    assert connect(target)[3] & auth.CONNECT_ATR


def test_key_change_disconnects_the_host(env):
    target, _ = env
    h, q, status, dw0 = connect(target)
    assert status == 0 and not dw0 & auth.CONNECT_ATR
    target.set_host_key(HOSTNQN, SECRET)
    assert q.closing                                      # it reconnects and authenticates
    h, q, _, _ = connect(target)
    assert SpecHost(h, SUBNQN, HOSTNQN, SECRET).run()[0] == "ok"
    target.remove_host_key(HOSTNQN)
    assert q.closing
    assert not connect(target)[3] & auth.CONNECT_ATR


def test_no_authentication_within_the_deadline_closes(env):
    target, clock = env
    target.set_host_key(HOSTNQN, SECRET)
    h, q, _, dw0 = connect(target)
    ok_h, ok_q, _, _ = connect(target, hostnqn=HOSTNQN)
    assert SpecHost(ok_h, SUBNQN, HOSTNQN, SECRET).run()[0] == "ok"
    ok_h.enable()
    clock.t += 61
    ok_q.ctrl.touch(clock.t)
    target.expire()
    assert q.closing and not ok_q.closing


def test_protocol_errors(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET)

    def fresh():
        h, q, _, _ = connect(target)
        return h, q, SpecHost(h, SUBNQN, HOSTNQN, SECRET)

    # Auth commands with the wrong SECP / SPSP, a TL not matching the data
    h, q, sh = fresh()
    neg = auth.negotiate_message(7)
    bad = auth_sqe(0x05, len(neg))
    bad["cdw10"] = (0xEA << 24) | (1 << 16) | (1 << 8)
    assert h.submit(bad, neg)[0] == st.INVALID_FIELD | st.DNR
    assert h.submit(auth_sqe(0x05, len(neg) + 4), neg)[0] == st.SGL_INVALID_DATA | st.DNR
    # Receive before Negotiate: Failure1, then the queue closes
    data = sh.receive()
    assert data[:2] == bytes([0, 0xF1]) and q.closing
    # a Reply out of turn (before the Challenge): closed at once
    h, q, sh = fresh()
    sh.negotiate()
    assert sh.send(auth.reply_message(7, bytes(32)))[0] == 0 and q.closing
    # a wrong transaction id: Failure1 "incorrect payload"
    h, q, sh = fresh()
    sh.negotiate()
    sh.receive()
    assert sh.send(auth.reply_message(8, bytes(32)))[0] == 0 and not q.closing
    assert sh.receive()[7] == auth.INCORRECT_PAYLOAD and q.closing
    # secure channel concatenation is not offered
    h, q, sh = fresh()
    assert sh.send(auth.negotiate_message(7, sc_c=1))[0] == 0
    assert sh.receive()[7] == auth.CONCAT_MISMATCH
    # no hash or DH group we know
    h, q, sh = fresh()
    sh.send(auth.negotiate_message(7, hash_ids=(9,)))
    assert sh.receive()[7] == auth.HASH_UNUSABLE
    h, q, sh = fresh()
    sh.send(auth.negotiate_message(7, dhgroups=(9,)))
    assert sh.receive()[7] == auth.DHGROUP_UNUSABLE
    # a challenge that does not fit the Receive
    h, q, sh = fresh()
    sh.negotiate()
    assert h.submit(auth_sqe(0x06, 16), read_len=16)[0] == st.INVALID_FIELD | st.DNR
    assert q.closing
    # Auth commands on a queue that was not asked to authenticate
    target.remove_host_key(HOSTNQN)
    h, q, _, _ = connect(target)
    assert h.submit(auth_sqe(0x05, len(neg)), neg)[0] == st.CMD_SEQ_ERROR | st.DNR


def test_restart_with_a_new_negotiate(env):
    target, _ = env
    target.set_host_key(HOSTNQN, SECRET)
    h, q, _, _ = connect(target)
    sh = SpecHost(h, SUBNQN, HOSTNQN, SECRET)
    sh.negotiate()
    sh.receive()
    sh.tid = 8                                            # start over, new transaction
    assert sh.run()[0] == "ok"
    assert sh.run()[0] == "ok"                            # re-authentication later on


# ---- registry, control socket, CLI ------------------------------------------------------------
def test_registry_keys_are_private_and_never_listed(tmp_path):
    path = str(tmp_path / "t.db")
    r = Registry(path)
    r.set_host_key(HOSTNQN, SECRET, CTRL_SECRET, "sha384", "ffdhe4096")
    for f in os.listdir(str(tmp_path)):
        assert os.stat(str(tmp_path / f)).st_mode & 0o077 == 0, f
    assert r.host_keys() == [{"hostnqn": HOSTNQN, "bidirectional": True, "hash": "sha384",
                              "dhgroup": "ffdhe4096"}]
    ha = r.host_auth(HOSTNQN)
    assert str(ha.secret) == SECRET and str(ha.ctrl_secret) == CTRL_SECRET
    assert (ha.hash_id, ha.dhgroup) == (2, 3)
    with pytest.raises(ValueError):
        r.set_host_key(HOSTNQN, "DHHC-1:00:nope:")
    with pytest.raises(ValueError):
        r.set_host_key(HOSTNQN, SECRET, SECRET)             # the two must differ
    with pytest.raises(ValueError):
        r.set_host_key(HOSTNQN, SECRET, dhgroup="ffdhe1024")
    r.close()
    os.chmod(path, 0o644)                                 # an older registry is tightened
    Registry(path).close()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_control_ops(env):
    target, _ = env
    resp = handle(target, {"op": "set_host_key", "args": {"hostnqn": HOSTNQN, "secret": SECRET}})
    assert resp == {"ok": True, "result": None}
    resp = handle(target, {"op": "host_keys"})
    assert resp["ok"] and SECRET not in json.dumps(resp)
    assert not handle(target, {"op": "set_host_key", "args": {"hostnqn": HOSTNQN,
                                                              "secret": "x"}})["ok"]
    assert not handle(target, {"op": "remove_host_key", "args": {"hostnqn": OTHER}})["ok"]
    assert handle(target, {"op": "set_auth_required", "args": {"nqn": SUBNQN}})["ok"]
    assert handle(target, {"op": "get", "args": {"nqn": SUBNQN}})["result"]["require_auth"]
    assert not handle(target, {"op": "set_auth_required", "args": {"nqn": SUBNQN + "x"}})["ok"]


def test_cli_and_real_target_process(tmp_path):
    """`zfs-ng target host-key set --generate` on a running target, then a host
    over TCP: the printed secret authenticates, another is refused."""
    from nvme_peer import SocketTransport, TargetProcess, sparse
    t = TargetProcess(tmp_path).start()
    try:
        env = dict(os.environ, PYTHONPATH=ROOT, ZFSNG_TARGET_SOCKET=t.sock)
        cli = [sys.executable, "-m", "sr_tools", "target"]

        def run(*a, **kw):
            return subprocess.run(cli + list(a), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, universal_newlines=True, **kw)

        r = run("add", SUBNQN, sparse(tmp_path), "--uuid", str(uuid.uuid4()), "--allow", HOSTNQN,
                "--allow", OTHER, "--require-auth")
        assert r.returncode == 0, r.stderr
        r = run("host-key", "set", HOSTNQN, "--generate", "--generate-ctrl", "--json")
        assert r.returncode == 0, r.stderr
        keys = json.loads(r.stdout)
        assert keys["bidirectional"] and keys["dhgroup"] == "ffdhe2048"
        r = run("host-key", "set", OTHER, "--secret", "-", input=auth.generate_secret(1) + "\n")
        assert r.returncode == 0, r.stderr
        r = run("host-key", "set", OTHER, "--secret", "DHHC-1:00:AAAA:")
        assert r.returncode == 1 and "DH-HMAC-CHAP" in r.stderr and "Traceback" not in r.stderr
        listed = json.loads(run("host-key", "ls", "--json").stdout)
        assert [x["hostnqn"] for x in listed] == sorted([HOSTNQN, OTHER])
        assert keys["secret"] not in json.dumps(listed)
        assert json.loads(run("ls", "--json").stdout)[0]["require_auth"]

        def host():
            h = Host(SocketTransport(("127.0.0.1", t.port)))
            h.icreq()
            data = CONNECT_DATA.pack(b"\x01" * 16, 0xFFFF, SUBNQN.encode(), HOSTNQN.encode())
            status, dw0, _, _ = h.submit(dict(opcode=0x7F, nsid=0x01, cdw11=31, cdw12=5000), data)
            assert status == 0 and dw0 & auth.CONNECT_ATR
            return h

        h = host()
        assert SpecHost(h, SUBNQN, HOSTNQN, keys["secret"], keys["ctrl_secret"]).run()[0] == "ok"
        h.enable()
        assert h.identify(1)[768:768 + len(SUBNQN)] == SUBNQN.encode()
        h = host()
        assert SpecHost(h, SUBNQN, HOSTNQN, auth.generate_secret(0)).run()[0] == "failure1"
        with pytest.raises((EOFError, OSError)):          # and the target hung up
            h.prop_get(0)
        assert run("host-key", "rm", HOSTNQN).returncode == 0
        assert run("require-auth", SUBNQN, "--off").returncode == 0
        assert run("require-auth").returncode == 1
    finally:
        assert t.stop()[0] == 0


# ---- fuzz ----------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.binary(max_size=600))
def test_fuzz_parsers(data):
    for fn in (auth.parse_header, auth.parse_negotiate, auth.parse_failure2,
               lambda d: auth.parse_reply(d, 32)):
        try:
            fn(data)
        except auth.AuthError as e:
            assert e.reason in (auth.INCORRECT_PAYLOAD, auth.INCORRECT_MESSAGE)


@settings(max_examples=300, deadline=None)
@given(hs.text(max_size=120))
def test_fuzz_secret_parser(text):
    try:
        s = auth.parse_secret(text)
    except ValueError:
        return
    assert auth.parse_secret(str(s)).key == s.key


def _message():
    """Messages a host could send: well-formed ones with random fields, and noise."""
    tid = hs.integers(0, 3)
    return hs.one_of(
        hs.builds(lambda t, h, d, sc: auth.negotiate_message(t, h, d, sc), tid,
                  hs.lists(hs.integers(0, 5), max_size=4), hs.lists(hs.integers(0, 6), max_size=4),
                  hs.sampled_from([0, 0, 1])),
        hs.builds(lambda t, n, s, c, dh: auth.reply_message(t, bytes(n), s, c, dh), tid,
                  hs.sampled_from([32, 48, 64, 7]), hs.integers(0, 2),
                  hs.one_of(hs.none(), hs.binary(min_size=32, max_size=32)),
                  hs.sampled_from([b"", b"\x02" * 256, b"\x01" * 256])),
        hs.builds(auth.success2_message, tid),
        hs.builds(auth.failure2_message, tid),
        hs.binary(max_size=80))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.one_of(_message(), hs.integers(0, 2000)), max_size=8))
def test_fuzz_state_machine(steps):
    """Any sequence of Sends (bytes) and Receives (AL): no exception, every
    Receive answers exactly AL bytes, and nobody authenticates without R1."""
    a = auth.Authenticator(auth.HostAuth(HOSTNQN, SECRET, CTRL_SECRET), SUBNQN, HOSTNQN)
    for s in steps:
        if a.closing:
            break
        if isinstance(s, int):
            out = a.receive(s)
            assert out is None or len(out) == s
        else:
            a.send(s)
        assert not a.authenticated


# ---- recorded nvme-cli vectors -----------------------------------------------------------------
KAT_NVME_CLI.update({
    0: "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
    1: "DHHC-1:01:bOHk6jHoMxpP5YJr/eF6XNOGuPAzh0iRniebpsVb9ydqVuR5:",
    2: "DHHC-1:02:JzgkyQ7IBRNgZgoVJQTRqDZ62Hnj5/kZ+vrrqjiE4TzoZZv5ycVS5cOLCiZ1bQfVVxJqow==:",
    3: "DHHC-1:03:D+Ucidhr9Oh00yaKCrMLB2s2c/hsojlyxwni12p59UZ78f4YQ6UMpEcQG4yaPnLJFkljK+euytry"
       "vvQe2rYShiu0Vv0=:",
})


# ---- the nvme+tcp datapath: the host's key file -------------------------------------------------
def test_datapath_connect_passes_the_hosts_secrets(tmp_path, monkeypatch):
    from plugins.datapath import nvme_host
    keys = tmp_path / "dhchap-keys.json"
    monkeypatch.setenv("ZFSNG_DHCHAP_KEYS", str(keys))
    assert nvme_host.dhchap_keys(HOSTNQN) == (None, None)          # no file: no auth
    keys.write_text(json.dumps({HOSTNQN: {"secret": SECRET, "ctrl_secret": CTRL_SECRET},
                                OTHER: SECRET}))
    os.chmod(str(keys), 0o644)
    with pytest.raises(nvme_host.NvmeError, match="chmod 600"):
        nvme_host.dhchap_keys(HOSTNQN)
    os.chmod(str(keys), 0o600)
    assert nvme_host.dhchap_keys(HOSTNQN) == (SECRET, CTRL_SECRET)
    assert nvme_host.dhchap_keys(OTHER) == (SECRET, None)
    assert nvme_host.dhchap_keys("nqn.2014-08.org.example:nobody") == (None, None)
    # nvme connect gets them (a stand-in nvme records its arguments and fails)
    log = tmp_path / "argv"
    fake = tmp_path / "nvme"
    fake.write_text("#!/bin/sh\necho \"$@\" > %s\necho refused >&2\nexit 1\n" % log)
    os.chmod(str(fake), 0o755)
    monkeypatch.setattr(nvme_host, "SYS_NVME", str(tmp_path / "no-sysfs"))
    with pytest.raises(nvme_host.NvmeError, match="refused"):
        nvme_host.connect("127.0.0.1", 4420, SUBNQN, HOSTNQN, nvme=str(fake))
    argv = log.read_text().split()
    assert "--dhchap-secret=" + SECRET in argv and "--dhchap-ctrl-secret=" + CTRL_SECRET in argv
    with pytest.raises(nvme_host.NvmeError):
        nvme_host.connect("127.0.0.1", 4420, SUBNQN, "nqn.2014-08.org.example:nobody",
                          nvme=str(fake))
    assert "dhchap" not in log.read_text()
    keys.write_text(json.dumps({HOSTNQN: {"secret": "hunter2"}}))
    with pytest.raises(nvme_host.NvmeError, match="not a DHHC-1 secret"):
        nvme_host.dhchap_keys(HOSTNQN)
