#!/usr/bin/env python3
"""A fuzz campaign against the real servers on loopback (issue 12, item 5):
mutated NVMe/TCP PDUs at `zfs-ng target serve` and mutated NBD requests at
the NBD server (nbd_server.run.start, as the datapaths run it), for as long as
you like.  Between rounds a legitimate client must still be served (a write
and its read back on a volume the fuzzer never touches), the server must
still be alive, and its RSS is sampled.

    .venv/bin/python tests/host/fuzz_campaign.py --nvme 1000000 --nbd 1000000 --seed 1
    .venv/bin/python tests/host/fuzz_campaign.py --duration 3600      # an hour, both

A short run is a host test (tests/host/test_fuzz_campaign.py).  Deterministic
for a seed: the bytes sent are a function of the seed and of how far each
session got (a server closing a session early starts the next one earlier).

What is sent (one fuzz "session" is one TCP connection; each counted unit is
one PDU / one NBD request or option, mutated or not):
- NVMe/TCP: sessions start at a random stage (nothing, after ICReq, after an
  admin Connect, after an I/O-queue Connect to a live controller) and then
  send up to --session PDUs drawn from a corpus of valid ones (ICReq,
  fabrics, admin and I/O commands with inline data or R2T, H2CData, TermReq,
  PDUs of the wrong direction), each mutated at the SQE level (then framed
  correctly, digests included) and/or at the byte level (bit flips,
  interesting values in header fields, truncation, extension, splicing).
- NBD: sessions either fuzz the handshake (the client flags and a stream of
  mutated options) or negotiate (EXPORT_NAME, or structured replies + meta
  context + GO) and then send mutated requests (all commands, random flags,
  offsets, lengths and payloads, short payloads, garbage).
Replies are read and discarded as they come (a fuzzer that reads nothing is
what tests/host/test_*_hostile.py cover).
"""

import argparse
import os
import random
import socket
import struct
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from nbd_server import constants as C                                       # noqa: E402
from nvmeof_target import pdu                                               # noqa: E402
from nvmeof_target.command import build_sqe                                 # noqa: E402
from blockio.volpath import FILE_DIRS_ENV                             # noqa: E402
from nvme_peer import CONNECT_DATA, HOSTNQN, Host, SocketTransport  # noqa: E402

MiB = 1 << 20
FUZZ_NQN = "nqn.2014-08.org.zfs-ng:fuzz:target"
LEGIT_NQN = "nqn.2014-08.org.zfs-ng:fuzz:legit"
FUZZ_HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:fuzz0000-2222-3333-4444-555555555555"
INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
               0x80000000, 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 4096, 8192, 65536, 1 << 20, 72,
               24, 128, 511, 512, 513]
SESSION_TIMEOUT = 2.0


# ---- byte-level mutators (shared by both protocols) -----------------------------------------
def mutate_bytes(rng, data, fields=(), max_len=1 << 16):
    """1-4 random mutations of data.  fields: (offset, size) of header fields
    worth setting to interesting values."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(9)
        if op == 0 and b:                                   # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                 # random bytes
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op in (2, 3) and fields:                       # a field to an interesting value
            off, size = rng.choice(fields)
            if off + size <= len(b):
                v = rng.choice(INTERESTING) if op == 2 else rng.getrandbits(8 * size)
                v = (v + rng.choice((-1, 0, 0, 1))) % (1 << (8 * size))
                b[off:off + size] = v.to_bytes(size, rng.choice(("little", "big")))
        elif op == 4 and b:                                 # truncate
            del b[rng.randrange(len(b)):]
        elif op == 5:                                       # extend
            b += bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 3, 4, 8, 64, 600))))
        elif op == 6 and len(b) > 2:                        # duplicate a slice
            i = rng.randrange(len(b))
            j = min(len(b), i + rng.randint(1, 64))
            b[i:i] = b[i:j]
        elif op == 7 and b:                                 # delete a slice
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 16)]
        elif op == 8 and b:                                 # interesting byte
            b[rng.randrange(len(b))] = rng.choice((0, 0xFF, 0x7F, 0x80, 0x01))
    return bytes(b[:max_len])


# ---- NVMe/TCP --------------------------------------------------------------------------------
CMD_FIELDS = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 4), (8, 1), (9, 1), (10, 2), (12, 4),
              (32, 8), (40, 4), (43, 1), (44, 4), (48, 4), (52, 4), (56, 4), (60, 4), (64, 4),
              (68, 4)]
DATA_FIELDS = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 4), (8, 2), (10, 2), (12, 4), (16, 4)]
IC_FIELDS = [(0, 1), (1, 1), (2, 1), (3, 1), (4, 4), (8, 2), (10, 1), (11, 1), (12, 4)]

ADMIN_OPS = [0x02, 0x06, 0x09, 0x0A, 0x0C, 0x18, 0x7F, 0x80, 0x81, 0x10, 0x11, 0x04, 0x05,
             0x01, 0x00, 0xFF, 0x19, 0x24, 0x0D]
IO_OPS = [0x00, 0x01, 0x02, 0x08, 0x09, 0x04, 0x05, 0x0C, 0x7F, 0x80, 0xFF, 0x11, 0x0D]


def _admin_sqe(rng, cid):
    op = rng.choice(ADMIN_OPS)
    f = dict(nsid=rng.choice((0, 1, 2, 0xFFFFFFFF)), cdw10=0, cdw11=0, cdw12=0, cdw13=0)
    n = 0
    if op == 0x06:                                          # identify
        f["cdw10"] = rng.choice((0, 1, 2, 3, 0x10, 0x11, 0x13, 0xFF)); n = 4096
    elif op == 0x02:                                        # get log page
        n = rng.choice((4, 64, 512, 4096, 1 << 16))
        numd = n // 4 - 1
        f["cdw10"] = rng.choice((1, 2, 3, 0x70, 0x80, 0xC0, 0xFF)) | ((numd & 0xFFFF) << 16)
        f["cdw11"] = numd >> 16
        f["cdw12"] = rng.choice((0, 4, 4096, 0xFFFFFFFF))
    elif op in (0x09, 0x0A):                                # set / get features
        f["cdw10"] = rng.choice((0x01, 0x02, 0x04, 0x06, 0x07, 0x08, 0x0B, 0x0F, 0x80, 0xFF))
        f["cdw11"] = rng.getrandbits(32)
    elif op == 0x7F:                                        # fabrics
        f["nsid"] = rng.choice((0x00, 0x01, 0x04, 0x05, 0x06, 0x7F))    # fctype
        f["cdw10"] = rng.choice((0, 1, 0x10000)); f["cdw11"] = rng.choice((0, 0x14, 0x1C, 0x08))
        f["cdw12"] = rng.getrandbits(32)
        if f["nsid"] == 0x01:
            n = 1024
    return op, f, n


def _io_sqe(rng, cid):
    op = rng.choice(IO_OPS)
    slba = rng.choice((0, 1, 8, 2047, (16 << 20) // 512 - 1, 1 << 32, rng.getrandbits(64),
                       rng.randrange(32768)))
    nlb = rng.choice((0, 1, 7, 15, 255, 0xFFFF, rng.randrange(64)))
    f = dict(nsid=rng.choice((1, 1, 1, 0, 2, 0xFFFFFFFF)), cdw10=slba & 0xFFFFFFFF,
             cdw11=slba >> 32, cdw12=nlb | (rng.choice((0, 0, 1 << 30, 1 << 31)) & 0xFFFF0000),
             cdw13=rng.choice((0, rng.getrandbits(32))))
    return op, f, (nlb + 1) * 512


class NvmeFuzzer(object):
    """Sessions of mutated PDUs against a target on 127.0.0.1:port."""

    def __init__(self, rng, port, src="127.0.0.2", session=32):
        self.rng = rng
        self.port = port
        self.src = src
        self.session = session
        self.admin = None           # (Host, cntlid) of a live controller for I/O-queue sessions
        self.sent = 0
        self.sessions = 0
        self.closed_by_server = 0

    def _sock(self):
        s = socket.socket()
        s.settimeout(SESSION_TIMEOUT)
        s.bind((self.src, 0))
        s.connect(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _controller(self):
        if self.admin is None:
            h = Host(SocketTransport(("127.0.0.1", self.port)))
            h.t.sock.settimeout(10)
            h.icreq()
            cntlid = h.connect(FUZZ_NQN, FUZZ_HOSTNQN, kato=0)
            h.enable()
            h.set_features(0x07, (63 << 16) | 63)
            self.admin = (h, cntlid)
        return self.admin

    def drop_controller(self):
        if self.admin:
            self.admin[0].t.close()
            self.admin = None

    def _pdu(self, rng, stage, cid, dg):
        hd, dd = dg
        kind = rng.random()
        if stage == 0 or kind < 0.03:
            return mutate_bytes(rng, pdu.icreq(hpda=rng.choice((0, 0, 1, 31)),
                                               dgst=rng.randrange(4),
                                               maxr2t=rng.choice((0, 1, 0xFFFFFFFF))),
                                IC_FIELDS) if rng.random() < 0.9 else pdu.icreq()
        if kind < 0.12:                                     # H2CData for any transfer
            data = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 4, 512, 4096))))
            raw = pdu.h2c_data(rng.choice((cid, cid - 1, rng.getrandbits(16))),
                               rng.choice((0, 1, rng.getrandbits(16))), data,
                               rng.choice((0, 4, 512, rng.getrandbits(32))),
                               rng.random() < 0.7, hd, dd)
            return mutate_bytes(rng, raw, DATA_FIELDS) if rng.random() < 0.6 else raw
        if kind < 0.15:                                     # TermReq, wrong-direction PDUs
            t = rng.choice((pdu.H2C_TERM, pdu.C2H_TERM, pdu.RSP, pdu.R2T, pdu.C2H_DATA,
                            pdu.ICRESP, 0x0A, 0x0B, 0xFF))
            hlen = pdu.HLEN.get(t, 24)
            raw = struct.pack("<BBBBI", t, 0, hlen, 0, hlen) + bytes(hlen - 8)
            return mutate_bytes(rng, raw, DATA_FIELDS)
        if stage == 1 or kind < 0.20:                       # a Connect
            qid = rng.choice((0, 1, 2, 0xFFFF))
            data = CONNECT_DATA.pack(b"\x01" * 16, rng.choice((0xFFFF, 0xFFFE, 1,
                                                               rng.getrandbits(16))),
                                     rng.choice((FUZZ_NQN, LEGIT_NQN, "", "x" * 300)).encode()[:256],
                                     rng.choice((FUZZ_HOSTNQN, HOSTNQN, "")).encode())
            f = dict(nsid=0x01, cdw10=qid << 16, cdw11=rng.choice((31, 0, 0xFFFF, 127)),
                     cdw12=rng.choice((0, 5000)))
            op, n = 0x7F, len(data)
            data = data if rng.random() < 0.8 else mutate_bytes(rng, data)
        else:
            op, f, n = (_admin_sqe if stage == 2 else _io_sqe)(rng, cid)
            data = b""
            if op in (0x01, 0x09, 0x7F, 0x81, 0x0D, 0x11) or rng.random() < 0.1:
                if rng.random() < 0.5:
                    data = bytes(rng.getrandbits(8) for _ in range(
                        min(n, rng.choice((0, 8, 512, 4096, 8192)))))
        inline = bool(data) and rng.random() < 0.9
        sgl_len = len(data) if inline else rng.choice((n, 0, 512, n + 1, 1 << 24,
                                                        rng.getrandbits(32)))
        sqe = build_sqe(op, cid, sgl_len=sgl_len,
                        sgl_id=pdu.SGL_INLINE if inline else rng.choice(
                            (pdu.SGL_TRANSPORT, pdu.SGL_TRANSPORT, 0x00, 0x01, 0x5B, 0xFF)),
                        flags=rng.choice((0x40, 0x40, 0x00, 0x41, 0x80)), **f)
        if rng.random() < 0.3:
            sqe = mutate_bytes(rng, sqe, [(o - 8, s) for o, s in CMD_FIELDS if o >= 8])
            sqe = (sqe + bytes(64))[:64]
        raw = pdu.capsule_cmd(sqe, data if inline else b"", hd, dd)
        return mutate_bytes(rng, raw, CMD_FIELDS) if rng.random() < 0.35 else raw

    def run_session(self, budget):
        """One connection: a stage prefix done properly, then up to budget
        fuzz PDUs.  Returns how many were sent."""
        rng = self.rng
        stage = rng.choice((0, 1, 2, 2, 3, 3, 3))
        dg = (False, False)
        n = 0
        self.sessions += 1
        try:
            if stage == 3:
                _, cntlid = self._controller()
            if stage >= 1:
                dg = rng.choice(((False, False), (False, False), (True, True), (True, False)))
                h = Host(_RawTransport(self._sock()), hdgst=dg[0], ddgst=dg[1])
                h.icreq()
                if stage == 2:
                    h.connect(FUZZ_NQN, FUZZ_HOSTNQN, kato=0)
                    if rng.random() < 0.7:
                        h.enable()
                elif stage == 3:
                    h.connect(FUZZ_NQN, FUZZ_HOSTNQN, qid=1, cntlid=cntlid, sqsize=127, kato=0)
                s = h.t.sock
            else:
                s = self._sock()
        except Exception:
            if os.environ.get("FUZZ_DEBUG"):
                import traceback
                traceback.print_exc()
            if stage == 3:
                self.drop_controller()          # maybe gone: a fresh one next time
            return 0
        try:
            for i in range(min(budget, rng.randint(1, self.session))):
                raw = self._pdu(rng, stage, 0x100 + i, dg)
                n += 1
                s.sendall(raw)
                if not _drain(s):
                    self.closed_by_server += 1
                    break
        except (OSError, socket.timeout):
            self.closed_by_server += 1
        finally:
            if rng.random() < 0.5:              # leave with a RST half the time
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            s.close()
            self.sent += n
        return n


class _RawTransport(SocketTransport):
    def __init__(self, sock):
        self.sock = sock


def _drain(s):
    """Read what the server has said so far; False once it closed."""
    s.setblocking(False)            # (with a timeout, recv would wait for data first)
    try:
        while True:
            d = s.recv(1 << 20)
            if not d:
                return False
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False
    finally:
        s.settimeout(SESSION_TIMEOUT)


# ---- NBD -------------------------------------------------------------------------------------
REQ = struct.Struct(">IHHQQI")
NBD_SIZE = 1 * MiB
OPTIONS = [C.OPT_EXPORT_NAME, C.OPT_ABORT, C.OPT_LIST, 4, C.OPT_STARTTLS, C.OPT_INFO, C.OPT_GO,
           C.OPT_STRUCTURED_REPLY, C.OPT_LIST_META_CONTEXT, C.OPT_SET_META_CONTEXT,
           11, 12, 0xFFFFFFFF, 0x80000000]


def _recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        d = s.recv(n - len(buf))
        if not d:
            raise EOFError("closed")
        buf += d
    return bytes(buf)


def _opt_replies(s, opt):
    """Read option replies up to the final one (ACK or error); the last type."""
    while True:
        magic, o, typ, ln = struct.unpack(">QIII", _recv_exact(s, 20))
        if magic != C.REPLY_MAGIC:
            raise EOFError("bad option reply magic")
        _recv_exact(s, ln)
        if typ == C.REP_ACK or typ & 0x80000000:
            return typ


def _meta_payload(export, names):
    b = struct.pack(">I", len(export)) + export + struct.pack(">I", len(names))
    for n in names:
        b += struct.pack(">I", len(n)) + n
    return b


class NbdFuzzer(object):
    def __init__(self, rng, port, src="127.0.0.2", session=32):
        self.rng = rng
        self.port = port
        self.src = src
        self.session = session
        self.sent = 0
        self.sessions = 0
        self.closed_by_server = 0

    def _sock(self):
        s = socket.socket()
        s.settimeout(SESSION_TIMEOUT)
        s.bind((self.src, 0))
        s.connect(("127.0.0.1", self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _option(self, rng):
        opt = rng.choice(OPTIONS)
        name = rng.choice((b"fz", b"ro", b"", b"nope", b"x" * 300))
        if opt in (C.OPT_SET_META_CONTEXT, C.OPT_LIST_META_CONTEXT):
            data = _meta_payload(name, [rng.choice((b"base:allocation", b"base:",
                                                    b"qemu:dirty-bitmap:x", b""))
                                        for _ in range(rng.randint(0, 3))])
        elif opt in (C.OPT_INFO, C.OPT_GO):
            infos = [rng.choice((0, 1, 2, 3, 0xFFFF)) for _ in range(rng.randint(0, 3))]
            data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos)) + \
                b"".join(struct.pack(">H", i) for i in infos)
        else:
            data = name
        raw = struct.pack(">QII", C.IHAVEOPT, opt, len(data)) + data
        return mutate_bytes(rng, raw, [(0, 8), (8, 4), (12, 4), (16, 4), (20, 2)]) \
            if rng.random() < 0.5 else raw

    def _request(self, rng, structured):
        t = rng.choice((C.CMD_READ, C.CMD_WRITE, C.CMD_WRITE, C.CMD_FLUSH, C.CMD_TRIM,
                        C.CMD_CACHE, C.CMD_WRITE_ZEROES, C.CMD_BLOCK_STATUS, C.CMD_READ,
                        C.CMD_DISC if rng.random() < 0.2 else C.CMD_READ, 8, 11, 0xFFFF))
        flags = rng.choice((0, 0, 0, C.CMD_FLAG_FUA, C.CMD_FLAG_NO_HOLE, C.CMD_FLAG_DF,
                            C.CMD_FLAG_REQ_ONE, C.CMD_FLAG_FAST_ZERO, rng.getrandbits(16)))
        off = rng.choice((0, 512, 4096, NBD_SIZE - 512, NBD_SIZE, NBD_SIZE + 1,
                          rng.randrange(NBD_SIZE), rng.getrandbits(64)))
        ln = rng.choice((0, 1, 512, 4096, 65536, NBD_SIZE, rng.randrange(70000),
                         rng.getrandbits(32), 32 << 20))
        payload = b""
        if t == C.CMD_WRITE or rng.random() < 0.05:
            k = ln if ln <= 65536 else rng.choice((0, 4096))
            if rng.random() < 0.2:
                k = rng.randrange(k + 1)                  # short: the next bytes are "payload"
            payload = os.urandom(k) if k > 4096 else bytes(rng.getrandbits(8) for _ in range(k))
        raw = REQ.pack(rng.choice((C.REQUEST_MAGIC,) * 9 + (0x12345678,)), flags, t,
                       rng.getrandbits(64), off, ln) + payload
        if rng.random() < 0.25:
            raw = mutate_bytes(rng, raw, [(0, 4), (4, 2), (6, 2), (8, 8), (16, 8), (24, 4)],
                               max_len=len(raw) + 600)
        return raw

    def run_session(self, budget):
        rng = self.rng
        self.sessions += 1
        n = 0
        mode = rng.choice(("options", "export_name", "export_name", "go", "go"))
        structured = False
        try:
            s = self._sock()
            _recv_exact(s, 18)
            if mode == "options":
                cflags = rng.choice((C.FLAG_C_FIXED_NEWSTYLE, C.FLAG_C_FIXED_NEWSTYLE |
                                     C.FLAG_C_NO_ZEROES, 0, rng.getrandbits(32)))
                s.sendall(struct.pack(">I", cflags))
            elif mode == "export_name":
                s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
                name = rng.choice((b"fz", b"fz", b"ro"))
                s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_EXPORT_NAME, len(name)) + name)
                _recv_exact(s, 10)
            else:
                s.sendall(struct.pack(">I", C.FLAG_C_FIXED_NEWSTYLE | C.FLAG_C_NO_ZEROES))
                name = rng.choice((b"fz", b"fz", b"ro"))
                structured = rng.random() < 0.8
                if structured:
                    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_STRUCTURED_REPLY, 0))
                    _opt_replies(s, C.OPT_STRUCTURED_REPLY)
                    data = _meta_payload(name, [b"base:allocation"])
                    s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_SET_META_CONTEXT,
                                          len(data)) + data)
                    _opt_replies(s, C.OPT_SET_META_CONTEXT)
                data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
                s.sendall(struct.pack(">QII", C.IHAVEOPT, C.OPT_GO, len(data)) + data)
                if _opt_replies(s, C.OPT_GO) != C.REP_ACK:
                    raise EOFError("GO refused")
        except (OSError, EOFError, struct.error):
            try:
                s.close()
            except (OSError, UnboundLocalError):
                pass
            return 0
        try:
            for _ in range(min(budget, rng.randint(1, self.session))):
                raw = self._option(rng) if mode == "options" else self._request(rng, structured)
                n += 1
                s.sendall(raw)
                if not _drain(s):
                    self.closed_by_server += 1
                    break
        except (OSError, socket.timeout):
            self.closed_by_server += 1
        finally:
            if rng.random() < 0.5:
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            s.close()
            self.sent += n
        return n


# ---- servers, legitimate clients, bookkeeping -----------------------------------------------
def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS")


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class NvmeServer(object):
    """`zfs-ng target serve` (tests/host/nvme_peer.TargetProcess) with
    a fuzz volume and a legitimate one, both sparse files."""

    def __init__(self, workdir):
        import pathlib
        from nvme_peer import TargetProcess
        self.dir = pathlib.Path(workdir)
        self.fuzz_img = str(self.dir / "fuzz.img")
        self.legit_img = str(self.dir / "legit.img")
        for p in (self.fuzz_img, self.legit_img):
            with open(p, "wb") as f:
                f.truncate(16 * MiB)
        self.t = TargetProcess(self.dir, ["--connect-timeout", "5"])

    def start(self):
        from nvmeof_target.control import Client
        self.t.start()
        c = Client(self.t.sock)
        have = {v["nqn"] for v in c.list()} if hasattr(c, "list") else set()
        if FUZZ_NQN not in have:
            c.add(FUZZ_NQN, self.fuzz_img, str(uuid.uuid4()), allowed_hosts=[FUZZ_HOSTNQN])
        if LEGIT_NQN not in have:
            c.add(LEGIT_NQN, self.legit_img, str(uuid.uuid4()), allowed_hosts=[HOSTNQN])
        return self

    @property
    def pid(self):
        return self.t.proc.pid

    @property
    def port(self):
        return self.t.port

    def alive(self):
        return self.t.proc.poll() is None

    def log_tail(self):
        return self.t.output()[-3000:]

    def stop(self):
        if self.t.proc and self.t.proc.poll() is None:
            self.t.proc.kill()
            self.t.proc.wait()

    def legit(self, rng):
        """A host from 127.0.0.1 on its own volume: write 64 KiB, read it back."""
        from nvme_peer import controller
        admin, cntlid = controller(self.port, LEGIT_NQN)
        try:
            admin.set_features(0x07, 0)
            io = Host(SocketTransport(("127.0.0.1", self.port)))
            try:
                io.icreq()
                io.connect(LEGIT_NQN, qid=1, cntlid=cntlid, sqsize=31, kato=0)
                data = os.urandom(64 << 10)
                slba = rng.randrange(0, (16 * MiB - len(data)) // 512)
                io.write(slba, data)
                assert io.read(slba, len(data) // 512) == data, "read back differs"
            finally:
                io.t.close()
        finally:
            admin.t.close()

    def check_files(self):
        for p in (self.fuzz_img, self.legit_img):
            assert os.path.getsize(p) == 16 * MiB, "%s grew to %d" % (p, os.path.getsize(p))


class NbdServer(object):
    """The NBD server as the datapaths start it, on TCP: exports fz (rw, the
    fuzzer's), ro (read-only, same image) and rw (the legitimate client's)."""

    def __init__(self, workdir):
        self.dir = workdir
        self.fuzz_img = os.path.join(workdir, "nbd-fuzz.img")
        self.legit_img = os.path.join(workdir, "nbd-legit.img")
        for p in (self.fuzz_img, self.legit_img):
            with open(p, "wb") as f:
                f.truncate(NBD_SIZE)
        self.pid = None
        self.port = None

    def start(self):
        from conftest import free_port
        from nbd_server import run
        self.port = free_port()
        self.pid = run.start([{"name": "fz", "path": self.fuzz_img},
                              {"name": "ro", "path": self.fuzz_img, "readonly": True},
                              {"name": "rw", "path": self.legit_img}],
                             tcp=("127.0.0.1", self.port),
                             log_path=os.path.join(self.dir, "nbd.log"), verbose=0,
                             request_timeout=10, handshake_timeout=10)
        return self

    def alive(self):
        return alive(self.pid)

    def log_tail(self):
        with open(os.path.join(self.dir, "nbd.log"), errors="replace") as f:
            return f.read()[-3000:]

    def stop(self):
        from nbd_server import run
        if self.pid:
            run.stop(self.pid)
            try:
                os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def legit(self, rng):
        from nbd_peer import xo_connect
        s, size, _ = xo_connect(("127.0.0.1", self.port), "rw")
        try:
            assert size == NBD_SIZE
            data = os.urandom(64 << 10)
            off = rng.randrange(0, NBD_SIZE - len(data))
            s.sendall(REQ.pack(C.REQUEST_MAGIC, 0, C.CMD_WRITE, 1, off, len(data)) + data)
            magic, err, cookie = struct.unpack(">IIQ", _recv_exact(s, 16))
            assert (magic, err, cookie) == (C.SIMPLE_REPLY_MAGIC, 0, 1), (magic, err, cookie)
            s.sendall(REQ.pack(C.REQUEST_MAGIC, 0, C.CMD_READ, 2, off, len(data)))
            magic, err, cookie = struct.unpack(">IIQ", _recv_exact(s, 16))
            assert (magic, err, cookie) == (C.SIMPLE_REPLY_MAGIC, 0, 2), (magic, err, cookie)
            assert _recv_exact(s, len(data)) == data, "read back differs"
            s.sendall(REQ.pack(C.REQUEST_MAGIC, 0, C.CMD_DISC, 3, 0, 0))
        finally:
            s.close()

    def check_files(self):
        for p in (self.fuzz_img, self.legit_img):
            assert os.path.getsize(p) == NBD_SIZE, "%s grew to %d" % (p, os.path.getsize(p))


class Campaign(object):
    """One protocol's campaign: rounds of `per_round` fuzz units, then the
    checks (server alive, legitimate client served, files not grown, RSS)."""

    def __init__(self, name, server, fuzzer_cls, seed, per_round=1000, session=32, out=None):
        self.name = name
        self.server = server
        self.fuzzer_cls = fuzzer_cls
        self.rng = random.Random("%s-%d" % (name, seed))
        self.per_round = per_round
        self.session = session
        self.out = out or sys.stdout
        self.sent = 0
        self.sessions = 0
        self.closed_by_server = 0
        self.rounds = 0
        self.crashes = []               # (round, log tail)
        self.legit_failures = []        # (round, error)
        self.rss = []                   # server RSS after each round
        self.elapsed = 0.0
        self.fuzzer = None

    def _new_fuzzer(self):
        self.fuzzer = self.fuzzer_cls(self.rng, self.server.port, session=self.session)

    def start(self):
        self.server.start()
        self._new_fuzzer()
        self.rss.append(rss(self.server.pid))

    def round(self, remaining):
        t0 = time.time()
        f = self.fuzzer
        before = f.sent
        goal = min(self.per_round, remaining)
        while f.sent - before < goal:
            f.run_session(goal - (f.sent - before))
            if not self.server.alive():
                break
        self.sent += f.sent - before
        self.rounds += 1
        if not self.server.alive():
            self.crashes.append((self.rounds, self.server.log_tail()))
            self.out.write("%s: SERVER DIED in round %d:\n%s\n" % (
                self.name, self.rounds, self.crashes[-1][1]))
            if hasattr(f, "drop_controller"):
                f.admin = None
            self.server.stop()
            self.start()
        else:
            try:
                self.server.legit(self.rng)
                self.server.check_files()
            except Exception as e:                          # noqa: BLE001 (reported)
                self.legit_failures.append((self.rounds, "%s: %s" % (type(e).__name__, e)))
                self.out.write("%s: legitimate client failed in round %d: %s\n" % (
                    self.name, self.rounds, self.legit_failures[-1][1]))
            self.rss.append(rss(self.server.pid))
        self.elapsed += time.time() - t0

    def stop(self):
        if self.fuzzer:
            self.sessions += self.fuzzer.sessions
            self.closed_by_server += self.fuzzer.closed_by_server
            if hasattr(self.fuzzer, "drop_controller"):
                self.fuzzer.drop_controller()
        self.server.stop()

    def line(self):
        rate = self.sent / self.elapsed if self.elapsed else 0
        return ("%s: %d sent in %d rounds, %.0f/s, crashes %d, legit failures %d, "
                "RSS min %.1f max %.1f last %.1f MiB" % (
                    self.name, self.sent, self.rounds, rate, len(self.crashes),
                    len(self.legit_failures), min(self.rss) / MiB, max(self.rss) / MiB,
                    self.rss[-1] / MiB))

    def summary(self):
        return {"protocol": self.name, "sent": self.sent, "rounds": self.rounds,
                "seconds": round(self.elapsed, 1),
                "rate": round(self.sent / self.elapsed, 1) if self.elapsed else 0,
                "sessions": self.sessions, "closed_by_server": self.closed_by_server,
                "crashes": len(self.crashes), "legit_failures": len(self.legit_failures),
                "rss_min": min(self.rss), "rss_max": max(self.rss), "rss_first": self.rss[0],
                "rss_last": self.rss[-1]}


def run_campaign(nvme=0, nbd=0, seed=1, duration=None, per_round=1000, session=32,
                 workdir=None, out=None, report_every=30.0):
    """Alternate rounds of both protocols until each reached its count (or
    the duration ran out: then counts are unbounded).  Returns the summaries."""
    out = out or sys.stdout
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="zfsng-fuzz-")
    old_dirs = os.environ.get(FILE_DIRS_ENV)
    os.environ[FILE_DIRS_ENV] = os.pathsep.join(p for p in (workdir, old_dirs) if p)
    campaigns = []
    if nvme or duration:
        d = os.path.join(workdir, "nvme")
        os.makedirs(d, exist_ok=True)
        campaigns.append((Campaign("nvme", NvmeServer(d), NvmeFuzzer, seed, per_round, session,
                                   out), nvme))
    if nbd or duration:
        d = os.path.join(workdir, "nbd")
        os.makedirs(d, exist_ok=True)
        campaigns.append((Campaign("nbd", NbdServer(d), NbdFuzzer, seed, per_round, session,
                                   out), nbd))
    out.write("fuzz campaign: seed %d, %s, rounds of %d, workdir %s\n" % (
        seed, ", ".join("%s %s" % (c.name, n or "unbounded") for c, n in campaigns),
        per_round, workdir))
    t0 = last = time.time()
    try:
        for c, _ in campaigns:
            c.start()
        while True:
            busy = False
            for c, n in campaigns:
                if duration and time.time() - t0 >= duration:
                    continue
                remaining = (n - c.sent) if n else per_round
                if remaining <= 0:
                    continue
                busy = True
                c.round(remaining)
            if not busy:
                break
            if time.time() - last >= report_every:
                last = time.time()
                for c, _ in campaigns:
                    out.write("[%5.0f s] %s\n" % (last - t0, c.line()))
                out.flush()
    finally:
        for c, _ in campaigns:
            c.stop()
        if old_dirs is None:
            os.environ.pop(FILE_DIRS_ENV, None)
        else:
            os.environ[FILE_DIRS_ENV] = old_dirs
        if own:
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    for c, _ in campaigns:
        out.write("done: %s\n" % c.line())
    out.flush()
    return [c.summary() for c, _ in campaigns]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nvme", type=int, default=0, help="mutated NVMe/TCP PDUs to send")
    p.add_argument("--nbd", type=int, default=0, help="mutated NBD requests/options to send")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds; without counts: both protocols for that long")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--round", type=int, default=1000, dest="per_round",
                   help="fuzz units between two checks (legit client, liveness, RSS)")
    p.add_argument("--session", type=int, default=32, help="at most this many units a connection")
    p.add_argument("--report-every", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print the summaries as JSON at the end")
    a = p.parse_args(argv)
    if not (a.nvme or a.nbd or a.duration):
        p.error("give --nvme N and/or --nbd N, or --duration S")
    res = run_campaign(a.nvme, a.nbd, a.seed, a.duration, a.per_round, a.session,
                       report_every=a.report_every)
    if a.json:
        import json
        print(json.dumps(res, indent=1))
    return 1 if any(r["crashes"] or r["legit_failures"] for r in res) else 0


if __name__ == "__main__":
    sys.exit(main())
