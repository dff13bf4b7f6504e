"""The 64-byte submission queue entry (NVMe base spec; Linux struct nvme_common_command)
and the result of executing one."""

import struct

# opcode flags cid nsid cdw2 cdw3 mptr | sgl: addr len (3 reserved) id | cdw10..15
_SQE = struct.Struct("<BBHIIIQQI3xB6I")

FABRICS = 0x7F


class Command(object):
    __slots__ = ("raw", "opcode", "flags", "cid", "nsid", "sgl_addr", "sgl_len", "sgl_id",
                 "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15")

    def __init__(self, raw):
        self.raw = bytes(raw)
        (self.opcode, self.flags, self.cid, self.nsid, _, _, _, self.sgl_addr, self.sgl_len,
         self.sgl_id, self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14,
         self.cdw15) = _SQE.unpack(self.raw)

    @property
    def fctype(self):
        return self.raw[4]

    @property
    def is_write(self):
        """Host-to-controller data (nvme_is_write): opcode bit 0, fctype bit 0."""
        if self.opcode == FABRICS:
            return bool(self.raw[4] & 1)
        return bool(self.opcode & 1)

    def __repr__(self):
        return "Command(opc=%#x cid=%d nsid=%d len=%d)" % (self.opcode, self.cid, self.nsid,
                                                         self.sgl_len)


def build_sqe(opcode, cid, nsid=0, cdw10=0, cdw11=0, cdw12=0, cdw13=0, cdw14=0, cdw15=0,
              sgl_len=0, sgl_id=0x5A, flags=0x40, sgl_addr=0):
    """A 64-byte SQE (host side: tests and the loopback initiator)."""
    return _SQE.pack(opcode, flags, cid, nsid, 0, 0, 0, sgl_addr, sgl_len, sgl_id,
                     cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)


class Result(object):
    """What a command handler returns: status, CQE dwords, data for the host."""
    __slots__ = ("status", "dw0", "dw1", "data")

    def __init__(self, status=0, dw0=0, dw1=0, data=None):
        self.status = status
        self.dw0 = dw0
        self.dw1 = dw1
        self.data = data


# A handler returns DEFERRED when it completes later (Asynchronous Event Request).
DEFERRED = object()
