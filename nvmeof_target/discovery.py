"""The discovery controller's log page (LID 0x70; NVMe-oF spec §5.3, Linux
drivers/nvme/target/discovery.c).  Any host may connect to the well-known
discovery NQN, but it only sees the subsystems it is allowed to connect to:
with 100,000 volumes an unfiltered log would be ~100 MB and `connect-all`
would try every one."""

import struct

HEADER = 1024
ENTRY = 1024
TRTYPE_TCP = 3
ADRFAM_IPV4, ADRFAM_IPV6 = 1, 2
SUBTYPE_NVME = 2
TREQ_NOT_SPECIFIED = 0
SECTYPE_NONE = 0


def _put(buf, off, size, text):
    raw = text.encode("ascii")[:size]
    buf[off:off + len(raw)] = raw


def log_page(genctr, subnqns, traddr, trsvcid, portid=1):
    """The whole page for these subsystems, served at the address the host used
    (never a wildcard address)."""
    adrfam = ADRFAM_IPV6 if ":" in traddr else ADRFAM_IPV4
    b = bytearray(HEADER + ENTRY * len(subnqns))
    struct.pack_into("<QQH", b, 0, genctr, len(subnqns), 0)
    for i, nqn in enumerate(subnqns):
        off = HEADER + i * ENTRY
        struct.pack_into("<BBBBHHH", b, off, TRTYPE_TCP, adrfam, SUBTYPE_NVME,
                         TREQ_NOT_SPECIFIED, portid, 0xFFFF, 32)
        _put(b, off + 32, 32, str(trsvcid))
        _put(b, off + 256, 256, nqn)
        _put(b, off + 512, 256, traddr)
        b[off + 768] = SECTYPE_NONE
    return b
