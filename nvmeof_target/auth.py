"""NVMe in-band authentication: DH-HMAC-CHAP (NVMe Base 2.0 §8.13; the NVMe-oF
Authentication Send/Receive fabrics commands, fctype 0x05/0x06), the
controller's side as a sans-IO state machine, plus the DHHC-1 secret format.
Reference: Linux drivers/nvme/target/{auth.c,fabrics-cmd-auth.c}, the host's
drivers/nvme/host/auth.c and drivers/nvme/common/auth.c; nvme-cli's
gen-dhchap-key.  Python stdlib only (hmac, hashlib, secrets, pow()).

One transaction per queue, started by the host when the Connect response has
AUTHREQ.ATR (DW0 bit 17) set:

    host  Send  AUTH_Negotiate      hash ids and DH groups it can do, T_ID
    ctrl  Recv  _Challenge          HashID, DH group, S1, C1 (+ g^x mod p)
    host  Send  _Reply              R1 = HMAC(Kh, Ca1|S1|T_ID|0|"HostHost"|NQNh|0|NQNc)
                                    (+ g^y mod p, + S2 and C2 to check us back)
    ctrl  Recv  _Success1           (+ R2 = HMAC(Kc, Ca2|S2|T_ID|0|"Controller"|NQNc|0|NQNh))
    host  Send  _Success2           only when it checked R2

Kh = HMAC(host secret, NQNh | "NVMe-over-Fabrics") with the secret's own hash
(DHHC-1:01/02/03), the secret itself for DHHC-1:00; Kc likewise from the
controller secret and NQNc.  Ca = C with the null DH group, else
HMAC(H(g^xy mod p), C), the shared value big-endian, padded to the size of p.
A wrong response gets _Failure1 and the connection closes; so does a
_Failure2 from the host (it refused our R2) or a message out of turn.

The admin's side (zfs-ng target host-key / require-auth, see sr_tools/target_cmds.py):

    nvme gen-dhchap-key -n HOSTNQN          # on the host, or: zfs-ng target host-key set
    zfs-ng target host-key set HOSTNQN --secret DHHC-1:00:...: [--generate-ctrl]
    zfs-ng target require-auth NQN          # this volume: hosts without a key are refused
    zfs-ng target require-auth --all        # every volume
    nvme connect -t tcp -a NODE -n NQN --dhchap-secret=DHHC-1:00:...: [--dhchap-ctrl-secret=...]

A host that has a key always authenticates, on its admin and every I/O queue
(or anyone naming the host and a guessed cntlid could add an I/O queue to its
controller), whatever the volume says; the keys live in the registry (0600).
The discovery controller never asks: the Linux host cannot answer there
(libnvme gives a discovery controller no secret) and nvmet does not ask
either; its log names volumes, each of which asks for the key.
"""

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import struct
import zlib

# ---- wire constants (include/linux/nvme.h) ------------------------------------------
AUTH_SEND, AUTH_RECEIVE = 0x05, 0x06
SECP_DHCHAP = 0xE9                       # security protocol, SQE byte 43
CONNECT_ATR = 1 << 17                    # Connect response DW0: AUTHREQ.ATR
MAX_SEND = 8192                          # the largest legitimate Reply is 1168 bytes
MAX_RECEIVE = 65536                      # the Linux host asks for 4096

COMMON, DHCHAP = 0x00, 0x01              # auth_type
NEGOTIATE, CHALLENGE, REPLY, SUCCESS1, SUCCESS2 = 0x00, 0x01, 0x02, 0x03, 0x04
FAILURE2, FAILURE1 = 0xF0, 0xF1          # auth_id
AUTHID_DHCHAP = 0x01

# rescode_exp of a failure message
FAILED, NOT_USABLE, CONCAT_MISMATCH, HASH_UNUSABLE = 0x01, 0x02, 0x03, 0x04
DHGROUP_UNUSABLE, INCORRECT_PAYLOAD, INCORRECT_MESSAGE = 0x05, 0x06, 0x07
REASON_FAILED = 0x01

HASHES = {1: "sha256", 2: "sha384", 3: "sha512"}
HASH_IDS = {v: k for k, v in HASHES.items()}
HASH_LEN = {1: 32, 2: 48, 3: 64}
DHGROUP_NAMES = {0: "null", 1: "ffdhe2048", 2: "ffdhe3072", 3: "ffdhe4096", 4: "ffdhe6144",
                 5: "ffdhe8192"}
DHGROUP_IDS = {v: k for k, v in DHGROUP_NAMES.items()}

_NEGOTIATE = struct.Struct("<BBHHBB")            # type id rsvd t_id sc_c napd
_DESCRIPTOR = struct.Struct("<BBBB60s")          # authid rsvd halen dhlen idlist
_CHALLENGE = struct.Struct("<BBHHBBBBHI")    # type id rsvd t_id hl rsvd hashid dhgid dhvlen seqnum
_REPLY = struct.Struct("<BBHHBBBBHI")        # type id rsvd t_id hl rsvd cvalid rsvd dhvlen seqnum
_SUCCESS1 = struct.Struct("<BBHHBBB7x")          # type id rsvd t_id hl rsvd rvalid
_SUCCESS2 = struct.Struct("<BBHH10x")            # type id rsvd t_id
_FAILURE = struct.Struct("<BBHHBB")              # type id rsvd t_id rescode rescode_exp
_HEADER = struct.Struct("<BBHH")                 # what every message starts with


class AuthError(ValueError):
    """A message that cannot be accepted: `reason` is the rescode_exp to report."""

    def __init__(self, reason, msg):
        ValueError.__init__(self, msg)
        self.reason = reason


# ---- secrets: DHHC-1:<hh>:<base64(key | crc32le(key))>: -------------------------------
_SECRET = re.compile(r"^DHHC-1:([0-9]{2}):([A-Za-z0-9+/]+={0,2}):?\Z")


class Secret(object):
    """A DH-HMAC-CHAP secret: the key bytes and the hash (0: none, 1-3:
    SHA-256/384/512) that transforms it with an NQN before use."""
    __slots__ = ("hash_id", "key")

    def __init__(self, key, hash_id=0):
        if len(key) not in (32, 48, 64):
            raise ValueError("a DH-HMAC-CHAP key is 32, 48 or 64 bytes, not %d" % len(key))
        if hash_id not in (0, 1, 2, 3):
            raise ValueError("invalid DH-HMAC-CHAP key hash %d" % hash_id)
        if hash_id and len(key) != HASH_LEN[hash_id]:
            # The kernel then reads past (or stops short of) the transformed key
            # depending on its version; nvme gen-dhchap-key never makes one.
            raise ValueError("a DHHC-1:%02d key must be %d bytes long, not %d"
                             % (hash_id, HASH_LEN[hash_id], len(key)))
        self.key = bytes(key)
        self.hash_id = hash_id

    def transform(self, nqn):
        """The key used for the response (nvme_auth_transform_key)."""
        if self.hash_id == 0:
            return self.key
        return hmac.new(self.key, nqn.encode("utf-8") + b"NVMe-over-Fabrics",
                        HASHES[self.hash_id]).digest()

    def __str__(self):
        return format_secret(self.key, self.hash_id)

    def __repr__(self):
        return "Secret(DHHC-1:%02d, %d bytes)" % (self.hash_id, len(self.key))


def parse_secret(text):
    """A Secret from its DHHC-1 representation; ValueError if it is not one
    (bad format, length or CRC)."""
    if not isinstance(text, str):
        raise ValueError("a DH-HMAC-CHAP secret is a DHHC-1:... string")
    m = _SECRET.match(text.strip())
    if not m:
        raise ValueError("not a DH-HMAC-CHAP secret (DHHC-1:00:<base64>:)")
    try:
        raw = base64.b64decode(m.group(2).encode("ascii"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("DH-HMAC-CHAP secret: invalid base64")
    if len(raw) not in (36, 52, 68):
        raise ValueError("DH-HMAC-CHAP secret: %d bytes of key and CRC, want 36, 52 or 68"
                         % len(raw))
    key, crc = raw[:-4], struct.unpack("<I", raw[-4:])[0]
    if zlib.crc32(key) & 0xFFFFFFFF != crc:
        raise ValueError("DH-HMAC-CHAP secret: CRC mismatch")
    return Secret(key, int(m.group(1)))


def format_secret(key, hash_id=0):
    return "DHHC-1:%02d:%s:" % (hash_id, base64.b64encode(
        bytes(key) + struct.pack("<I", zlib.crc32(bytes(key)) & 0xFFFFFFFF)).decode("ascii"))


def generate_secret(hash_id=0, length=None):
    """A new random secret in DHHC-1 form (as `nvme gen-dhchap-key` makes)."""
    if length is None:
        length = HASH_LEN.get(hash_id, 32)
    return format_secret(secrets.token_bytes(length), hash_id)


# ---- the responses -----------------------------------------------------------------------
def augmented_challenge(hash_id, session_key, challenge):
    """Ca = HMAC(H(g^xy mod p), C) (nvme_auth_augmented_challenge)."""
    name = HASHES[hash_id]
    return hmac.new(hashlib.new(name, session_key).digest(), challenge, name).digest()


def host_response(hash_id, key, challenge, seqnum, tid, hostnqn, subnqn):
    """R1: what the host proves it knows its key with (key already transformed)."""
    msg = b"".join((challenge, struct.pack("<IHB", seqnum, tid, 0), b"HostHost",
                    hostnqn.encode("utf-8"), b"\0", subnqn.encode("utf-8")))
    return hmac.new(key, msg, HASHES[hash_id]).digest()


def ctrl_response(hash_id, key, challenge, seqnum, tid, hostnqn, subnqn):
    """R2: the controller's proof for bidirectional authentication."""
    msg = b"".join((challenge, struct.pack("<IHB", seqnum, tid, 0), b"Controller",
                    subnqn.encode("utf-8"), b"\0", hostnqn.encode("utf-8")))
    return hmac.new(key, msg, HASHES[hash_id]).digest()


# ---- finite-field DH groups (RFC 7919) ----------------------------------------------------
# p = 2^b - 2^(b-64) + {[2^(b-130) e] + X} * 2^64 - 1 (RFC 7919 Appendix A), g = 2;
# private exponents of twice the group's security strength (NIST SP 800-56A, as
# the kernel's dh_safe_prime does).
_FFDHE = {1: (2048, 560316, 112), 2: (3072, 2625351, 128), 3: (4096, 5736041, 152),
          4: (6144, 15705020, 176), 5: (8192, 10965728, 200)}
_PRIMES = {}


def _e_fixed(bits):
    """floor(e * 2^bits), from the series sum 1/k! in integers (64 guard bits)."""
    one = 1 << (bits + 64)
    total, term, k = 0, one, 0
    while term:
        total += term
        k += 1
        term //= k
    return total >> 64


def ffdhe_prime(group_id):
    p = _PRIMES.get(group_id)
    if p is None:
        b, x, _ = _FFDHE[group_id]
        p = _PRIMES[group_id] = (1 << b) - (1 << (b - 64)) + ((_e_fixed(b - 130) + x) << 64) - 1
    return p


class DhGroup(object):
    def __init__(self, group_id, randbits=secrets.randbits):
        self.id = group_id
        self.bits, _, strength = _FFDHE[group_id]
        self.size = self.bits // 8
        self.p = ffdhe_prime(group_id)
        self._x = randbits(2 * strength) | (1 << (2 * strength - 1))
        self.public = pow(2, self._x, self.p).to_bytes(self.size, "big")

    def shared(self, peer):
        """g^xy mod p, padded to the size of p; AuthError for a value that is
        not a group element other than 1 and p-1 (the order-2 subgroup)."""
        if len(peer) != self.size:
            raise AuthError(DHGROUP_UNUSABLE, "DH value of %d bytes, want %d"
                            % (len(peer), self.size))
        y = int.from_bytes(bytes(peer), "big")
        if not 1 < y < self.p - 1:
            raise AuthError(DHGROUP_UNUSABLE, "DH value out of range")
        return pow(y, self._x, self.p).to_bytes(self.size, "big")


# ---- message parsers and builders ---------------------------------------------------------
def parse_header(data):
    """(auth_type, auth_id, t_id) of any message."""
    if len(data) < _HEADER.size:
        raise AuthError(INCORRECT_PAYLOAD, "message of %d bytes" % len(data))
    auth_type, auth_id, _, tid = _HEADER.unpack_from(data, 0)
    return auth_type, auth_id, tid


def parse_negotiate(data):
    """(t_id, sc_c, [hash ids], [dh group ids]) of an AUTH_Negotiate: the ids
    of its DH-HMAC-CHAP protocol descriptor."""
    if len(data) < _NEGOTIATE.size + _DESCRIPTOR.size:
        raise AuthError(INCORRECT_PAYLOAD, "AUTH_Negotiate of %d bytes" % len(data))
    auth_type, auth_id, _, tid, sc_c, napd = _NEGOTIATE.unpack_from(data, 0)
    if (auth_type, auth_id) != (COMMON, NEGOTIATE):
        raise AuthError(INCORRECT_MESSAGE, "not an AUTH_Negotiate")
    if napd == 0:
        raise AuthError(INCORRECT_PAYLOAD, "AUTH_Negotiate without protocol descriptors")
    for i in range(napd):
        off = _NEGOTIATE.size + i * _DESCRIPTOR.size
        if off + _DESCRIPTOR.size > len(data):
            break
        authid, _, halen, dhlen, idlist = _DESCRIPTOR.unpack_from(data, off)
        if authid != AUTHID_DHCHAP:
            continue
        if halen > 30 or dhlen > 30:
            raise AuthError(INCORRECT_PAYLOAD, "HALEN %d DHLEN %d" % (halen, dhlen))
        return tid, sc_c, list(idlist[:halen]), list(idlist[30:30 + dhlen])
    raise AuthError(INCORRECT_PAYLOAD, "no DH-HMAC-CHAP protocol descriptor")


class Reply(object):
    __slots__ = ("tid", "response", "cvalid", "seqnum", "challenge", "dhvalue")


def parse_reply(data, hash_len):
    """A DH-HMAC-CHAP_Reply whose HL must be hash_len."""
    if len(data) < _REPLY.size:
        raise AuthError(INCORRECT_PAYLOAD, "DH-HMAC-CHAP_Reply of %d bytes" % len(data))
    auth_type, auth_id, _, tid, hl, _, cvalid, _, dhvlen, seqnum = _REPLY.unpack_from(data, 0)
    if (auth_type, auth_id) != (DHCHAP, REPLY):
        raise AuthError(INCORRECT_MESSAGE, "not a DH-HMAC-CHAP_Reply")
    if _REPLY.size + 2 * hl + dhvlen > len(data):
        raise AuthError(INCORRECT_PAYLOAD, "HL %d DHVLEN %d past the %d bytes sent"
                        % (hl, dhvlen, len(data)))
    if hl != hash_len:
        raise AuthError(INCORRECT_PAYLOAD, "HL %d for a %d-byte hash" % (hl, hash_len))
    r = Reply()
    base = _REPLY.size
    r.tid, r.cvalid, r.seqnum = tid, bool(cvalid & 1), seqnum
    r.response = bytes(data[base:base + hl])
    r.challenge = bytes(data[base + hl:base + 2 * hl])
    r.dhvalue = bytes(data[base + 2 * hl:base + 2 * hl + dhvlen])
    return r


def parse_failure2(data):
    """(t_id, rescode, rescode_exp) of a Failure2 (the host refused us)."""
    if len(data) < _FAILURE.size:
        raise AuthError(INCORRECT_PAYLOAD, "failure message of %d bytes" % len(data))
    auth_type, auth_id, _, tid, rescode, exp = _FAILURE.unpack_from(data, 0)
    if (auth_type, auth_id) != (COMMON, FAILURE2):
        raise AuthError(INCORRECT_MESSAGE, "not an AUTH_Failure2")
    return tid, rescode, exp


def challenge_message(tid, hash_id, seqnum, challenge, dhgroup=0, dhvalue=b""):
    return _CHALLENGE.pack(DHCHAP, CHALLENGE, 0, tid, len(challenge), 0, hash_id, dhgroup,
                           len(dhvalue), seqnum) + challenge + dhvalue


def success1_message(tid, hash_len, response=None):
    return _SUCCESS1.pack(DHCHAP, SUCCESS1, 0, tid, hash_len, 0,
                          1 if response is not None else 0) + (response or b"")


def failure1_message(tid, reason):
    return _FAILURE.pack(COMMON, FAILURE1, 0, tid, REASON_FAILED, reason)


# host-side builders (the tests' initiator; kept here beside the parsers they mirror)
def negotiate_message(tid, hash_ids=(1, 2, 3), dhgroups=(0, 1, 2, 3, 4, 5), sc_c=0):
    idlist = bytearray(60)
    idlist[:len(hash_ids)] = bytes(hash_ids)
    idlist[30:30 + len(dhgroups)] = bytes(dhgroups)
    return (_NEGOTIATE.pack(COMMON, NEGOTIATE, 0, tid, sc_c, 1)
            + _DESCRIPTOR.pack(AUTHID_DHCHAP, 0, len(hash_ids), len(dhgroups), bytes(idlist)))


def reply_message(tid, response, seqnum=0, challenge=None, dhvalue=b""):
    hl = len(response)
    return (_REPLY.pack(DHCHAP, REPLY, 0, tid, hl, 0, 1 if challenge else 0, 0, len(dhvalue),
                        seqnum) + response + (challenge or bytes(hl)) + dhvalue)


def success2_message(tid):
    return _SUCCESS2.pack(DHCHAP, SUCCESS2, 0, tid)


def failure2_message(tid, reason=FAILED):
    return _FAILURE.pack(COMMON, FAILURE2, 0, tid, REASON_FAILED, reason)


# ---- the controller's state machine, one per queue ------------------------------------------
class HostAuth(object):
    """What the target knows about one host: its secret, optionally the
    controller secret for bidirectional authentication, and the hash and DH
    group to pick when the host offers them."""
    __slots__ = ("hostnqn", "secret", "ctrl_secret", "hash_id", "dhgroup")

    def __init__(self, hostnqn, secret, ctrl_secret=None, hash_name="sha256",
                 dhgroup="ffdhe2048"):
        self.hostnqn = hostnqn
        self.secret = secret if isinstance(secret, Secret) else parse_secret(secret)
        self.ctrl_secret = (ctrl_secret if isinstance(ctrl_secret, Secret) or ctrl_secret is None
                            else parse_secret(ctrl_secret))
        if hash_name not in HASH_IDS or dhgroup not in DHGROUP_IDS:
            raise ValueError("unknown hash %r or DH group %r" % (hash_name, dhgroup))
        self.hash_id, self.dhgroup = HASH_IDS[hash_name], DHGROUP_IDS[dhgroup]


# steps: what the controller expects next
WAIT_NEGOTIATE, SEND_CHALLENGE, WAIT_REPLY, SEND_SUCCESS1, WAIT_SUCCESS2, SEND_FAILURE1 = range(6)
DONE, FAILED_CLOSE = 6, 7


class Authenticator(object):
    """The controller side of DH-HMAC-CHAP on one queue.

    send(data) takes an Authentication Send payload, receive(al) returns the
    Authentication Receive payload (al bytes, zero padded).  `authenticated`
    becomes True when the host proved its key (and, if it asked to check
    ours, accepted R2); `closing` True when the queue must be dropped once
    the command completes (a failure either side reported)."""

    def __init__(self, host, subnqn, hostnqn, deadline=None, randbytes=secrets.token_bytes,
                 randbits=secrets.randbits):
        self.host = host
        self.subnqn, self.hostnqn = subnqn, hostnqn
        self.deadline = deadline
        self.authenticated = False
        self.closing = False
        self.reason = 0              # rescode_exp of the failure, for Failure1 and logs
        self.why = ""
        self.step = WAIT_NEGOTIATE
        self.tid = 0
        self.hash_id = self.dhgroup_id = 0
        self._rand, self._randbits = randbytes, randbits
        self._s1 = self._c1 = self._c2 = self._dh = self._skey = None
        self._s2 = 0

    # -- Authentication Send ------------------------------------------------------------
    def send(self, data):
        data = bytes(data)
        try:
            auth_type, auth_id, tid = parse_header(data)
            if auth_type == COMMON and auth_id == NEGOTIATE:
                return self._negotiate(data)      # also restarts a transaction
            if auth_type == COMMON and auth_id == FAILURE2:
                _, _, exp = parse_failure2(data)
                return self._fail(exp or FAILED, "host sent Failure2", final=True)
            if auth_type != DHCHAP or (auth_id, self.step) not in ((REPLY, WAIT_REPLY),
                                                                   (SUCCESS2, WAIT_SUCCESS2)):
                return self._fail(INCORRECT_MESSAGE, "message %#x/%#x out of turn"
                                  % (auth_type, auth_id), final=True)
            if tid != self.tid:
                return self._fail(INCORRECT_PAYLOAD, "T_ID %d, transaction is %d"
                                  % (tid, self.tid))
            if auth_id == REPLY:
                return self._reply(data)
            self.authenticated = True              # Success2: the host accepted R2
            self.step = DONE
        except AuthError as e:
            self._fail(e.reason, str(e))

    def _negotiate(self, data):
        tid, sc_c, hash_ids, dhgroups = parse_negotiate(data)
        self.tid = tid
        self._s1 = self._c1 = self._c2 = self._dh = self._skey = None
        self._s2 = 0
        if sc_c != 0:
            raise AuthError(CONCAT_MISMATCH, "secure channel concatenation is not supported")
        self.hash_id = _pick(self.host.hash_id, hash_ids, HASHES)
        if self.hash_id is None:
            raise AuthError(HASH_UNUSABLE, "no usable hash in %s" % hash_ids)
        self.dhgroup_id = _pick(self.host.dhgroup, dhgroups, DHGROUP_NAMES)
        if self.dhgroup_id is None:
            raise AuthError(DHGROUP_UNUSABLE, "no usable DH group in %s" % dhgroups)
        self.step = SEND_CHALLENGE

    def _reply(self, data):
        hl = HASH_LEN[self.hash_id]
        r = parse_reply(data, hl)
        if self._dh is not None:
            if not r.dhvalue:
                raise AuthError(INCORRECT_PAYLOAD, "no DH value with group %s"
                                % DHGROUP_NAMES[self.dhgroup_id])
            self._skey = self._dh.shared(r.dhvalue)
        elif r.dhvalue:
            raise AuthError(INCORRECT_PAYLOAD, "DH value with the null group")
        key = self.host.secret.transform(self.hostnqn)
        challenge = self._c1 if self._skey is None else augmented_challenge(
            self.hash_id, self._skey, self._c1)
        expect = host_response(self.hash_id, key, challenge, self._s1, self.tid, self.hostnqn,
                               self.subnqn)
        if not hmac.compare_digest(expect, r.response):
            raise AuthError(FAILED, "host response mismatch")
        self._s2 = r.seqnum
        if r.seqnum and r.cvalid:
            if self.host.ctrl_secret is None:
                raise AuthError(FAILED, "host asks for bidirectional authentication, "
                                "no controller secret is set for it")
            self._c2 = r.challenge
        else:
            self.authenticated = True
        self.step = SEND_SUCCESS1

    # -- Authentication Receive ------------------------------------------------------------
    def receive(self, al):
        if self.step == SEND_CHALLENGE:
            hl = HASH_LEN[self.hash_id]
            self._c1 = self._rand(hl)
            self._s1 = self._randbits(32) or 1
            dhvalue = b""
            if self.dhgroup_id:
                self._dh = DhGroup(self.dhgroup_id, self._randbits)
                dhvalue = self._dh.public
            msg = challenge_message(self.tid, self.hash_id, self._s1, self._c1,
                                    self.dhgroup_id, dhvalue)
            self.step = WAIT_REPLY
        elif self.step == SEND_SUCCESS1:
            response = None
            if self._c2 is not None:
                key = self.host.ctrl_secret.transform(self.subnqn)
                challenge = self._c2 if self._skey is None else augmented_challenge(
                    self.hash_id, self._skey, self._c2)
                response = ctrl_response(self.hash_id, key, challenge, self._s2, self.tid,
                                         self.hostnqn, self.subnqn)
            msg = success1_message(self.tid, HASH_LEN[self.hash_id], response)
            self.step = WAIT_SUCCESS2 if response is not None else DONE
            self._dh = None
        else:
            if self.step != SEND_FAILURE1:
                self.reason = self.reason or FAILED
            msg = failure1_message(self.tid, self.reason or FAILED)
            self.authenticated = False
            self.closing = True
            self.step = FAILED_CLOSE
        if len(msg) > al:
            self._fail(INCORRECT_PAYLOAD, "Receive of %d bytes for a %d-byte message"
                       % (al, len(msg)), final=True)
            return None
        return msg + bytes(al - len(msg))

    def _fail(self, reason, why, final=False):
        """final: the transaction is over (Failure2 or a message out of turn):
        drop the queue now; else Failure1 goes out with the next Receive."""
        self.reason = reason
        self.why = why
        self.authenticated = False
        self._dh = None
        if final:
            self.closing = True
            self.step = FAILED_CLOSE
        else:
            self.step = SEND_FAILURE1

    def expired(self, now):
        return not self.authenticated and self.deadline is not None and now > self.deadline


def _pick(preferred, offered, known):
    """The preferred id if the host offers it, else the first offered we know."""
    if preferred in offered:
        return preferred
    for i in offered:
        if i in known:
            return i
    return None
