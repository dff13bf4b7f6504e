"""The NVMe/TCP peers of the host tests (not shipped, not a test module).

- Host: a tiny NVMe/TCP host: ICReq, Connect, properties, Identify,
  Read/Write with in-capsule data or R2T + H2CData.  It runs over any byte
  transport: a real socket (SocketTransport), or the sans-IO Queue directly
  (QueueTransport).  Strict: it checks what the Linux host checks (hlen,
  digests, cid echo).  controller(port, subnqn): an enabled admin queue.
- TargetProcess: `zfs-ng target serve` as a real process on a free loopback
  port (the `target` fixture of tests/host/conftest.py is one);
  wait_for_target(proc, sock): until its control socket answers.
- sparse(tmp_path): an image file; fill(path, size): random bytes written.
- io_queue(target, path): NQN added for any host, admin + one I/O queue;
  command(...) a pipelined command capsule, collect(io, cids) the responses.
"""

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

from nvmeof_target import pdu
from nvmeof_target.command import build_sqe
from nvmeof_target.control import Client, ControlError
from conftest import ROOT, free_port

CONNECT_DATA = struct.Struct("<16sH238x256s256s256x")
HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555"


class QueueTransport(object):
    """Bytes straight into a nvmeof_target.queue.Queue, and back out."""

    def __init__(self, queue):
        self.queue = queue

    def send(self, data):
        self.queue.data_received(data)

    def recv(self):
        out = b"".join(bytes(b) for b in self.queue.out)
        del self.queue.out[:]
        if not out:
            raise EOFError("queue has nothing to say")
        return out


class SocketTransport(object):
    def __init__(self, addr, timeout=10.0):
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, data):
        self.sock.sendall(data)

    def recv(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise EOFError("connection closed by the target")
        return data

    def close(self):
        self.sock.close()


class NvmeStatus(Exception):
    def __init__(self, status, dw0=0):
        Exception.__init__(self, "NVMe status %#x (dw0 %#x)" % (status, dw0))
        self.status = status
        self.dw0 = dw0


class Host(object):
    def __init__(self, transport, hdgst=False, ddgst=False, inline=8192):
        self.t = transport
        self.hdgst, self.ddgst = hdgst, ddgst
        self.inline = inline
        self.buf = bytearray()
        self.cid = 0
        self.pdus = []
        self.maxh2cdata = None

    # -- framing ----------------------------------------------------------------------
    def next_pdu(self):
        while not self.pdus:
            self.buf += self.t.recv()
            self.pdus.extend(pdu.parse_stream_host(self.buf, self.hdgst, self.ddgst))
        return self.pdus.pop(0)

    def icreq(self, **kw):
        self.t.send(pdu.icreq(dgst=(1 if self.hdgst else 0) | (2 if self.ddgst else 0), **kw))
        ptype, flags, header, _ = self.next_pdu()
        assert ptype == pdu.ICRESP, "expected ICResp, got type %d" % ptype
        _, _, hlen, _, plen, pfv, cpda, dgst, maxh2c = pdu.IC.unpack(header)
        assert (hlen, plen, pfv, cpda) == (128, 128, 0, 0)
        assert dgst == (1 if self.hdgst else 0) | (2 if self.ddgst else 0)
        assert maxh2c % 4 == 0 and maxh2c >= 4096
        self.maxh2cdata = maxh2c
        return header

    def submit(self, sqe_fields, data=None, read_len=0):
        """Send one command; returns (status, dw0, dw1, data read)."""
        self.cid = (self.cid + 1) & 0xFFFF
        cid = self.cid
        data = bytes(data) if data is not None else None
        if data is not None and len(data) <= self.inline:
            sqe = build_sqe(cid=cid, sgl_len=len(data), sgl_id=pdu.SGL_INLINE, **sqe_fields)
            self.t.send(pdu.capsule_cmd(sqe, data, self.hdgst, self.ddgst))
        else:
            n = len(data) if data is not None else read_len
            sqe = build_sqe(cid=cid, sgl_len=n, sgl_id=pdu.SGL_TRANSPORT, **sqe_fields)
            self.t.send(pdu.capsule_cmd(sqe, b"", self.hdgst, self.ddgst))
        got = bytearray()
        while True:
            ptype, flags, header, payload = self.next_pdu()
            if ptype == pdu.R2T:
                cccid, ttag, r2to, r2tl = pdu.DATA_HDR.unpack(header)[5:9]
                assert cccid == cid and r2to == 0 and r2tl == len(data)
                chunk = self.maxh2cdata
                for off in range(0, r2tl, chunk):
                    part = data[off:off + chunk]
                    self.t.send(pdu.h2c_data(cid, ttag, part, off, off + chunk >= r2tl,
                                             self.hdgst, self.ddgst))
            elif ptype == pdu.C2H_DATA:
                cccid, _, datao, datal = pdu.DATA_HDR.unpack(header)[5:9]
                assert cccid == cid and datao == len(got) and datal == len(payload)
                got += payload
            elif ptype == pdu.RSP:
                dw0, dw1, sqhd, sqid, rcid, status = struct.unpack_from("<IIHHHH", header, 8)
                assert rcid == cid, "cid %d echoed as %d" % (cid, rcid)
                return status >> 1, dw0, dw1, bytes(got)
            elif ptype == pdu.C2H_TERM:
                fes, fei = struct.unpack_from("<HI", header, 8)
                raise EOFError("C2HTermReq fes=%d fei=%d" % (fes, fei))
            else:
                raise AssertionError("unexpected PDU type %d" % ptype)

    def ok(self, sqe_fields, data=None, read_len=0):
        status, dw0, dw1, got = self.submit(sqe_fields, data, read_len)
        if status:
            raise NvmeStatus(status, dw0)
        return dw0, dw1, got

    # -- fabrics ------------------------------------------------------------------------
    def connect(self, subnqn, hostnqn=HOSTNQN, qid=0, cntlid=0xFFFF, sqsize=31, kato=5000,
                hostid=b"\x01" * 16):
        data = CONNECT_DATA.pack(hostid, cntlid, subnqn.encode(), hostnqn.encode())
        cdw10 = qid << 16            # recfmt 0 | qid
        cdw11 = sqsize               # sqsize | cattr << 16
        dw0, _, _ = self.ok(dict(opcode=0x7F, nsid=0x01, cdw10=cdw10, cdw11=cdw11,
                                 cdw12=kato), data)
        return dw0 & 0xFFFF

    def prop_get(self, offset, size8=False):
        dw0, dw1, _ = self.ok(dict(opcode=0x7F, nsid=0x04, cdw10=1 if size8 else 0,
                                   cdw11=offset))
        return dw0 | (dw1 << 32) if size8 else dw0

    def prop_set(self, offset, value):
        self.ok(dict(opcode=0x7F, nsid=0x00, cdw10=0, cdw11=offset, cdw12=value))

    def enable(self):
        cc = (6 << 16) | (4 << 20)
        self.prop_set(0x14, cc)
        self.prop_set(0x14, cc | 1)
        assert self.prop_get(0x1C) & 1

    def identify(self, cns, nsid=0):
        return self.ok(dict(opcode=0x06, nsid=nsid, cdw10=cns), read_len=4096)[2]

    def get_log(self, lid, length, offset=0, nsid=0xFFFFFFFF, rae=False):
        numd = length // 4 - 1
        cdw10 = lid | (0x8000 if rae else 0) | ((numd & 0xFFFF) << 16)
        return self.ok(dict(opcode=0x02, nsid=nsid, cdw10=cdw10, cdw11=numd >> 16,
                            cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32), read_len=length)[2]

    def set_features(self, fid, value):
        return self.ok(dict(opcode=0x09, cdw10=fid, cdw11=value))[0]

    # -- I/O ------------------------------------------------------------------------------
    def read(self, slba, nblocks, bs=512):
        return self.ok(dict(opcode=0x02, nsid=1, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw12=nblocks - 1), read_len=nblocks * bs)[2]

    def write(self, slba, data, bs=512, fua=False):
        return self.ok(dict(opcode=0x01, nsid=1, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                            cdw12=(len(data) // bs - 1) | ((1 << 30) if fua else 0)), data)



NQN = "nqn.2014-08.org.zfs-ng:sr1:vol-a"


def wait_for_target(proc, sock, timeout=10.0, output=None):
    """Until the target process proc answers on its control socket sock;
    fails (with output(), if given) when it exits or the timeout passes."""
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError("target exited: %s" % (output() if output else proc.returncode))
        try:
            Client(sock).stats()
            return
        except ControlError:
            if time.time() > deadline:
                raise AssertionError("target did not start: %s" % (output() if output else ""))
            time.sleep(0.05)


class TargetProcess(object):
    """`zfs-ng target serve` on a free port; args: more options; launcher:
    what runs the CLI (conftest.GC_OFF: with the cycle collector off).  Its
    log goes to a file (a busy target would fill a pipe nobody reads)."""

    def __init__(self, tmp, args=(), launcher=(sys.executable, "-m", "sr_tools")):
        self.state = str(tmp / "target.db")
        self.sock = str(tmp / "target.sock")
        self.log = str(tmp / "target.log")
        self.port = free_port()
        self.args = list(args)
        self.launcher = list(launcher)
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                self.launcher + ["target", "serve", "--listen", "127.0.0.1:%d" % self.port,
                                 "--state", self.state, "--socket", self.sock, "-v"] + self.args,
                cwd=ROOT, env=env, stderr=log)
        wait_for_target(self.proc, self.sock, output=self.output)
        return self

    def output(self):
        with open(self.log) as f:
            return f.read()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(10)
        return rc, self.output()


def sparse(tmp_path, name="vol.img", size=32 << 20):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.truncate(size)
    return p


def fill(path, size):
    """size random bytes written at the start of path; returns them."""
    data = os.urandom(size)
    with open(path, "r+b") as f:
        f.write(data)
    return data


def controller(port, subnqn, hostnqn=HOSTNQN):
    h = Host(SocketTransport(("127.0.0.1", port)))
    h.icreq()
    cntlid = h.connect(subnqn, hostnqn)
    h.enable()
    return h, cntlid


def io_queue(t, path):
    """path served as NQN (any host) by the TargetProcess t: (admin, io) hosts."""
    Client(t.sock).add(NQN, path, str(uuid.uuid4()), allow_any_host=True)
    admin, cntlid = controller(t.port, NQN)
    io = Host(SocketTransport(("127.0.0.1", t.port)))
    io.icreq()
    io.connect(NQN, qid=1, cntlid=cntlid, sqsize=127, kato=0)
    return admin, io


def command(opcode, cid, slba=0, nbytes=0, data=b"", cdw12_extra=0):
    """The capsule of an I/O command: a write's data in-capsule, a read's
    length in a transport SGL."""
    inline = opcode == 0x01
    sqe = build_sqe(opcode=opcode, cid=cid, nsid=1, cdw10=slba,
                    cdw12=(max(nbytes, len(data)) // 512 - 1 if opcode in (1, 2) else 0)
                    | cdw12_extra, sgl_len=len(data) if inline else nbytes,
                    sgl_id=pdu.SGL_INLINE if inline else pdu.SGL_TRANSPORT)
    return pdu.capsule_cmd(sqe, data)


def collect(io, cids):
    """Responses, in any order (NVMe orders none) -> {cid: (status, data)}."""
    got, res = {}, {}
    while len(res) < len(cids):
        ptype, flags, header, payload = io.next_pdu()
        if ptype == pdu.C2H_DATA:
            got[pdu.DATA_HDR.unpack(header)[5]] = payload
        else:
            assert ptype == pdu.RSP, ptype
            rcid, status = pdu.RSP_HDR.unpack(header)[9:11]
            assert rcid in cids and rcid not in res
            res[rcid] = (status >> 1, got.pop(rcid, b""))
    return res
