"""The controller state machine driven through the sans-IO Queue, with the test
initiator: Connect, properties, Identify, log pages, features, AEN, I/O on a
sparse file, and the error statuses the Linux host relies on."""

import os
import struct
import uuid

import pytest

from nvmeof_target import pdu
from nvmeof_target import status as st
from nvmeof_target.nqn import DISCOVERY_NQN
from nvmeof_target.queue import Queue
from nvmeof_target.registry import Registry
from nvmeof_target.target import Target
from nvme_peer import CONNECT_DATA, HOSTNQN, Host, NvmeStatus, QueueTransport

SUBNQN = "nqn.2014-08.org.zfs-ng:sr1:vol1"
VOL_UUID = "0f4a3b3e-9c7c-4d3a-8d8e-1a2b3c4d5e6f"
SIZE = 64 << 20


class Clock(object):
    t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def env(tmp_path):
    path = str(tmp_path / "vol.img")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    reg = Registry(":memory:")
    clock = Clock()
    target = Target(reg, clock=clock)
    target.add(SUBNQN, path, VOL_UUID, allowed_hosts=[HOSTNQN])
    return target, path, clock


def admin(target, subnqn=SUBNQN, hostnqn=HOSTNQN, **kw):
    q = Queue(target)
    h = Host(QueueTransport(q), **kw)
    h.icreq()
    cntlid = h.connect(subnqn, hostnqn)
    h.enable()
    return h, q, cntlid


def io_queue(target, cntlid, qid=1, **kw):
    q = Queue(target)
    h = Host(QueueTransport(q), **kw)
    h.icreq()
    assert h.connect(SUBNQN, qid=qid, cntlid=cntlid, sqsize=127, kato=0) == cntlid
    return h, q


def test_connect_properties_identify(env):
    target, _, _ = env
    h, q, cntlid = admin(target)
    cap = h.prop_get(0x00, size8=True)
    assert cap & 0xFFFF == 127 and cap & (1 << 16) and cap & (1 << 37) and not cap & (1 << 43)
    assert h.prop_get(0x08) == 0x00010300
    idc = h.identify(1)
    assert struct.unpack_from("<H", idc, 78)[0] == cntlid
    assert struct.unpack_from("<H", idc, 320)[0] != 0                       # KAS
    ioccsz, iorcsz, icdoff = struct.unpack_from("<IIH", idc, 1792)
    assert ioccsz >= 4 and iorcsz == 1 and icdoff == 0
    assert struct.unpack_from("<I", idc, 536)[0] & 3                        # SGLS
    assert idc[768:768 + len(SUBNQN) + 1] == SUBNQN.encode() + b"\0"
    assert idc[111] == 1 and idc[525] == 1 and idc[512] == 0x66 and idc[513] == 0x44
    assert struct.unpack_from("<I", idc, 96)[0] & (1 << 6)                  # TBKAS
    ns = h.identify(0, nsid=1)
    nsze, ncap = struct.unpack_from("<QQ", ns, 0)
    assert nsze == ncap == SIZE // 512 and ns[130] == 9
    assert ns[104:120] == uuid.UUID(VOL_UUID).bytes
    assert struct.unpack_from("<2I", h.identify(2), 0) == (1, 0)
    desc = h.identify(3, nsid=1)
    assert desc[:4] == bytes([3, 16, 0, 0]) and desc[4:20] == uuid.UUID(VOL_UUID).bytes
    assert h.identify(0, nsid=7) == bytes(4096)           # inactive NSID: zeros
    with pytest.raises(NvmeStatus) as e:
        h.identify(0x1F)
    assert e.value.status == st.INVALID_FIELD | st.DNR


def test_shutdown_handshake_and_disable(env):
    target, _, _ = env
    h, _, _ = admin(target)
    cc = h.prop_get(0x14)
    h.prop_set(0x14, cc | (1 << 14))
    assert h.prop_get(0x1C) & 0xC == 0x8                 # SHST complete, synchronously
    h.prop_set(0x14, 0)
    assert h.prop_get(0x1C) & 1 == 0


def test_commands_before_enable_are_sequence_errors(env):
    target, _, _ = env
    q = Queue(target)
    h = Host(QueueTransport(q))
    h.icreq()
    h.connect(SUBNQN)
    status, _, _, _ = h.submit(dict(opcode=0x06, cdw10=1), read_len=4096)
    assert status == st.CMD_SEQ_ERROR | st.DNR


def test_first_capsule_must_be_connect(env):
    target, _, _ = env
    h = Host(QueueTransport(Queue(target)))
    h.icreq()
    status, _, _, _ = h.submit(dict(opcode=0x06, cdw10=1), read_len=4096)
    assert status == st.INVALID_OPCODE | st.DNR


def test_connect_refusals(env):
    target, _, _ = env
    for subnqn, hostnqn, want, ipo in (
            ("nqn.2014-08.org.zfs-ng:nope", HOSTNQN, st.CONNECT_INVALID_PARAM, 256),
            (SUBNQN, "nqn.2014-08.org.example:intruder", st.CONNECT_INVALID_HOST, 512)):
        h = Host(QueueTransport(Queue(target)))
        h.icreq()
        with pytest.raises(NvmeStatus) as e:
            h.connect(subnqn, hostnqn)
        assert e.value.status == want | st.DNR and e.value.dw0 == (1 << 16) | ipo
    assert target.live == {}                      # nothing was opened for them


def test_io_queue_read_write_inline_and_r2t(env):
    target, path, _ = env
    h, _, cntlid = admin(target)
    assert h.set_features(0x07, (3 << 16) | 3) == (3 << 16) | 3
    io, _ = io_queue(target, cntlid, qid=1)
    small = os.urandom(4096)
    io.write(8, small)                                  # in-capsule
    big = os.urandom(128 << 10)
    io.write(1000, big, fua=True)                       # R2T + H2CData
    assert io.read(8, 8) == small
    assert io.read(1000, 256) == big
    with open(path, "rb") as f:
        f.seek(1000 * 512)
        assert f.read(len(big)) == big
    # a second I/O queue of the same controller sees the same namespace
    io2, _ = io_queue(target, cntlid, qid=2)
    assert io2.read(8, 8) == small


def test_io_errors(env):
    target, _, _ = env
    h, _, cntlid = admin(target)
    h.set_features(0x07, 0)
    io, _ = io_queue(target, cntlid)
    last = SIZE // 512
    with pytest.raises(NvmeStatus) as e:
        io.read(last - 1, 2)
    assert e.value.status == st.LBA_RANGE | st.DNR
    with pytest.raises(NvmeStatus) as e:
        io.ok(dict(opcode=0x7E, nsid=1))
    assert e.value.status == st.INVALID_OPCODE | st.DNR
    with pytest.raises(NvmeStatus) as e:
        io.ok(dict(opcode=0x02, nsid=2, cdw12=0), read_len=512)
    assert e.value.status == st.INVALID_NS | st.DNR
    # transfer length must match NLB
    with pytest.raises(NvmeStatus) as e:
        io.ok(dict(opcode=0x02, nsid=1, cdw12=1), read_len=512)
    assert e.value.status == st.SGL_INVALID_DATA | st.DNR
    # an I/O queue beyond what Set Features granted
    q = Queue(target)
    extra = Host(QueueTransport(q))
    extra.icreq()
    with pytest.raises(NvmeStatus):
        extra.connect(SUBNQN, qid=2, cntlid=cntlid)


def test_write_zeroes_and_deallocate_punch_holes(env):
    target, path, _ = env
    h, _, cntlid = admin(target)
    h.set_features(0x07, 0)
    io, _ = io_queue(target, cntlid)
    data = os.urandom(1 << 20)
    io.write(0, data)
    blocks_before = os.stat(path).st_blocks
    ranges = struct.pack("<IIQ", 0, 1024, 0) + bytes(4096 - 16)     # Linux pads to 4 KiB
    io.ok(dict(opcode=0x09, nsid=1, cdw10=0, cdw11=1 << 2), ranges)
    assert io.read(0, 8) == bytes(4096)
    assert os.stat(path).st_blocks < blocks_before
    io.write(4096, data[:8192])
    io.ok(dict(opcode=0x08, nsid=1, cdw10=4096, cdw12=15 | (1 << 25)))
    assert io.read(4096, 16) == bytes(8192)
    io.ok(dict(opcode=0x00, nsid=1))                                    # flush


def test_readonly_volume_refuses_writes(env, tmp_path):
    target, path, _ = env
    nqn = SUBNQN + "-ro"
    target.add(nqn, path, str(uuid.uuid4()), readonly=True, allow_any_host=True)
    h, _, cntlid = admin(target, subnqn=nqn)
    h.set_features(0x07, 0)
    q = Queue(target)
    io = Host(QueueTransport(q))
    io.icreq()
    io.connect(nqn, qid=1, cntlid=cntlid)
    assert io.read(0, 1) == bytes(512)
    with pytest.raises(NvmeStatus) as e:
        io.write(0, b"x" * 512)
    assert e.value.status == st.NS_WRITE_PROTECTED | st.DNR
    assert h.identify(0, nsid=1)[99] == 1


def test_log_pages_and_features(env):
    target, _, _ = env
    h, _, _ = admin(target)
    smart = h.get_log(0x02, 512)
    assert struct.unpack_from("<H", smart, 1)[0] > 273 and smart[3] == 100
    effects = h.get_log(0x05, 4096, nsid=0)
    assert struct.unpack_from("<I", effects, 1024 + 4)[0] == 3          # write: CSUPP|LBCC
    assert h.get_log(0x05, 8, offset=1024 + 4, nsid=0) == struct.pack("<II", 3, 1)
    assert h.set_features(0x0B, 1 << 8) == 1 << 8
    with pytest.raises(NvmeStatus):
        h.set_features(0x0B, 1 << 31)          # not supported on an I/O controller
    h.set_features(0x0F, 15000)
    assert h.ok(dict(opcode=0x0A, cdw10=0x0F))[0] == 15000
    assert h.ok(dict(opcode=0x0A, cdw10=0x06))[0] == 1


def test_resize_sends_namespace_changed_aen(env):
    target, path, _ = env
    h, q, _ = admin(target)
    h.set_features(0x0B, 1 << 8)
    h.cid = 30
    aer_cid = 31
    h.t.send(pdu.capsule_cmd(__import__("nvmeof_target.command", fromlist=["x"]).build_sqe(
        0x0C, aer_cid)))
    assert q.out == []                           # outstanding, no answer yet
    with open(path, "r+b") as f:
        f.truncate(SIZE * 2)
    assert target.notify(SUBNQN) == 1
    ptype, _, header, _ = h.next_pdu()
    dw0, _, _, _, cid, status = struct.unpack_from("<IIHHHH", header, 8)
    assert (ptype, cid, status, dw0) == (pdu.RSP, aer_cid, 0, 0x040002)
    assert struct.unpack_from("<I", h.get_log(0x04, 4096), 0)[0] == 1
    assert h.get_log(0x04, 4096) == bytes(4096)           # read with RAE=0 cleared it
    assert struct.unpack_from("<Q", h.identify(0, nsid=1), 0)[0] == 2 * SIZE // 512


def test_keep_alive_timeout_tears_the_controller_down(env):
    target, _, clock = env
    h, q, cntlid = admin(target)
    h.set_features(0x07, 0)
    io, ioq = io_queue(target, cntlid)
    clock.t += 3
    h.ok(dict(opcode=0x18))                       # keep alive
    clock.t += 5.5
    target.expire()
    assert cntlid in target.controllers
    clock.t += 7
    target.expire()
    assert cntlid not in target.controllers and q.closing and ioq.closing
    assert target.live == {}                      # backend closed with the last controller


def test_admin_queue_close_releases_everything(env):
    target, _, _ = env
    h, q, cntlid = admin(target)
    h.set_features(0x07, 0)
    _, ioq = io_queue(target, cntlid)
    assert SUBNQN in target.live
    q.connection_lost()
    assert ioq.closing and target.live == {} and target.controllers == {}


def test_remove_and_deny_disconnect_hosts(env):
    target, _, _ = env
    _, q, _ = admin(target)
    target.deny(SUBNQN, HOSTNQN)
    assert q.closing and target.live == {}
    target.allow(SUBNQN, HOSTNQN)
    _, q, _ = admin(target)
    target.remove(SUBNQN)
    assert q.closing and target.live == {}


def test_discovery_log_filtered_by_host(env, tmp_path):
    target, path, _ = env
    other = "nqn.2014-08.org.zfs-ng:sr1:hidden"
    target.add(other, path, str(uuid.uuid4()), allowed_hosts=["nqn.2014-08.org.example:x"])
    h, _, _ = admin(target, subnqn=DISCOVERY_NQN)
    idc = h.identify(1)
    assert idc[111] == 2 and idc[768:768 + len(DISCOVERY_NQN)] == DISCOVERY_NQN.encode()
    hdr = h.get_log(0x70, 20, nsid=0)
    genctr, numrec, recfmt = struct.unpack_from("<QQH", hdr)
    assert numrec == 1
    entry = h.get_log(0x70, 1024, offset=1024, nsid=0)
    assert entry[0] == 3 and entry[2] == 2
    assert entry[32:36] == b"4420" and entry[512:521] == b"127.0.0.1"
    assert entry[256:256 + len(SUBNQN) + 1] == SUBNQN.encode() + b"\0"


def test_digests_end_to_end(env):
    target, _, _ = env
    h, _, cntlid = admin(target, hdgst=True, ddgst=True)
    h.set_features(0x07, 0)
    io, _ = io_queue(target, cntlid, hdgst=True, ddgst=True)
    data = os.urandom(64 << 10)
    io.write(0, data)
    assert io.read(0, 128) == data


def test_bad_data_digest_fails_the_command_only(env):
    target, _, _ = env
    q = Queue(target)
    h = Host(QueueTransport(q), hdgst=True, ddgst=True)
    h.icreq()
    from nvmeof_target.command import build_sqe
    data = CONNECT_DATA.pack(b"\1" * 16, 0xFFFF, SUBNQN.encode(), HOSTNQN.encode())
    raw = bytearray(pdu.capsule_cmd(build_sqe(0x7F, 1, nsid=1, cdw11=31, sgl_len=1024,
                                              sgl_id=1), data, True, True))
    raw[-1] ^= 0xFF
    h.t.send(bytes(raw))
    ptype, _, header, _ = h.next_pdu()
    assert ptype == pdu.RSP and struct.unpack_from("<H", header, 22)[0] >> 1 == 0x22
    assert not q.closing


def test_discovery_log_change_completes_the_discovery_aer(env):
    target, path, _ = env
    h, q, _ = admin(target, subnqn=DISCOVERY_NQN)
    assert struct.unpack_from("<I", h.identify(1), 92)[0] == 1 << 31       # OAES
    h.set_features(0x0B, 1 << 31)
    gen0 = struct.unpack_from("<Q", h.get_log(0x70, 20, nsid=0))[0]
    from nvmeof_target.command import build_sqe
    h.t.send(pdu.capsule_cmd(build_sqe(0x0C, 31)))
    assert q.out == []
    target.add(SUBNQN + "-new", path, str(uuid.uuid4()), allowed_hosts=[HOSTNQN])
    ptype, _, header, _ = h.next_pdu()
    dw0, _, _, _, cid, status = struct.unpack_from("<IIHHHH", header, 8)
    assert (ptype, cid, status, dw0) == (pdu.RSP, 31, 0, 0x70F002)
    genctr, numrec = struct.unpack_from("<QQ", h.get_log(0x70, 20, nsid=0))
    assert genctr > gen0 and numrec == 2
