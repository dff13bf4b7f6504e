"""Identify data structures (4096 bytes each).  Offsets follow the Linux/libnvme
struct nvme_id_ctrl / nvme_id_ns (include/linux/nvme.h); tests/host/test_nvme_protocol.py
reads the fields back at those offsets, and tests/e2e/test_nvmeof.py through the
kernel host's `nvme id-ctrl` / `nvme id-ns`."""

import struct

from . import controller as C
from .nqn import DISCOVERY_NQN

MDTS = 8                        # 2^8 * 4 KiB = 1 MiB per command
MAX_TRANSFER = 4096 << MDTS
INLINE_DATA = 8192              # in-capsule bytes on I/O queues (admin: always 8 KiB)
IOCCSZ = (64 + INLINE_DATA) // 16
MODEL = "zfs-ng"
FIRMWARE = "0.1.0"

ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
CTRATT_TBKAS = 1 << 6


def _ascii(buf, off, size, text):
    raw = text.encode("ascii", "replace")[:size]
    buf[off:off + size] = raw + b" " * (size - len(raw))


def _nqn(buf, off, nqn):
    raw = nqn.encode("ascii")[:255]
    buf[off:off + len(raw)] = raw


def serial_for(uuid_hex):
    """A stable serial number per subsystem: derived from the volume UUID."""
    return uuid_hex.replace("-", "")[:20]


def controller(ctrl, subnqn, serial):
    b = bytearray(4096)
    _ascii(b, 4, 20, serial)
    _ascii(b, 24, 40, MODEL)
    _ascii(b, 64, 8, FIRMWARE)
    b[72] = 6                               # RAB
    b[76] = 0 if ctrl.discovery else 0x03   # CMIC: multi-port, multi-controller
    b[77] = MDTS
    struct.pack_into("<HI", b, 78, ctrl.cntlid, C.VS)
    struct.pack_into("<I", b, 92, ctrl.aen_supported())      # OAES
    struct.pack_into("<I", b, 96, CTRATT_TBKAS if ctrl.tbkas else 0)   # CTRATT
    b[111] = 2 if ctrl.discovery else 1                      # CNTRLTYPE
    b[258] = 3                              # ACL
    b[259] = C.AER_LIMIT - 1                # AERL
    b[260] = 0x03                           # FRMW: slot 1 read-only, 1 slot
    b[261] = 0x04 if ctrl.discovery else 0x06   # LPA: effects log, extended get log
    struct.pack_into("<H", b, 320, C.KAS)
    b[512] = 0x66                           # SQES
    b[513] = 0x44                           # CQES
    struct.pack_into("<HI", b, 514, C.MQES + 1, 0 if ctrl.discovery else 1)   # MAXCMD, NN
    if not ctrl.discovery:
        struct.pack_into("<H", b, 520, ONCS_DSM | ONCS_WRITE_ZEROES)
        b[525] = 1                          # VWC: Flush and FUA reach the zvol
    struct.pack_into("<I", b, 536, 0x00100001)   # SGLS: supported, address as offset
    _nqn(b, 768, DISCOVERY_NQN if ctrl.discovery else subnqn)
    struct.pack_into("<IIH", b, 1792, IOCCSZ, 1, 0)    # IOCCSZ, IORCSZ, ICDOFF
    b[1803] = 1                             # MSDBD
    struct.pack_into("<HII", b, 2048, 0x9C4, 0x10, 0x4)  # power state 0
    return b


def namespace(nsze, lbads, nguid, readonly, dlfeat=0x09):
    b = bytearray(4096)
    struct.pack_into("<QQQ", b, 0, nsze, nsze, nsze)
    b[24] = 0                 # NSFEAT
    b[25] = 0                 # NLBAF: one format
    b[26] = 0                 # FLBAS
    b[30] = 1                 # NMIC: shared (multipath needs it)
    b[33] = dlfeat            # deallocated blocks read as zeros; WZ may deallocate
    b[99] = 1 if readonly else 0    # NSATTR write protected
    b[104:120] = nguid
    b[130] = lbads
    return b


def ns_descriptors(uuid_bytes, nguid):
    b = bytearray(4096)
    off = 0
    for nidt, value in ((3, uuid_bytes), (2, nguid), (4, b"\0")):
        struct.pack_into("<BBH", b, off, nidt, len(value), 0)
        b[off + 4:off + 4 + len(value)] = value
        off += 4 + len(value)
    return b


def active_ns_list(start_nsid, nsids=(1,)):
    b = bytearray(4096)
    ids = [n for n in nsids if n > start_nsid][:1024]
    struct.pack_into("<%dI" % len(ids), b, 0, *ids)
    return b
