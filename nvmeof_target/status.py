"""NVMe completion status values, kept unshifted as Linux does (SCT<<8 | SC,
DNR = 0x4000); on the wire a CQE carries status << 1 (bit 0 is the phase)."""

DNR = 0x4000

SUCCESS = 0x000
INVALID_OPCODE = 0x001
INVALID_FIELD = 0x002
CMD_SEQ_ERROR = 0x00C
DATA_XFER_ERROR = 0x004
INTERNAL = 0x006
INVALID_NS = 0x00B
SGL_INVALID_DATA = 0x00F
SGL_INVALID_OFFSET = 0x016
KA_TIMEOUT_INVALID = 0x01A
NS_WRITE_PROTECTED = 0x020
LBA_RANGE = 0x080
CAP_EXCEEDED = 0x081
ASYNC_LIMIT = 0x105
INVALID_LOG_PAGE = 0x109
CONNECT_FORMAT = 0x180
CONNECT_CTRL_BUSY = 0x181
CONNECT_INVALID_PARAM = 0x182
CONNECT_RESTART_DISC = 0x183
CONNECT_INVALID_HOST = 0x184
AUTH_REQUIRED = 0x191            # a queue that has not authenticated (DH-HMAC-CHAP)


class NvmeError(Exception):
    """A command failed with an NVMe status (and optionally a CQE DW0)."""

    def __init__(self, status, dw0=0, msg=""):
        Exception.__init__(self, msg or "NVMe status 0x%x" % status)
        self.status = status
        self.dw0 = dw0


def error_from_oserror(e, write=False):
    """Map a backend OSError to a status the way nvmet's bdev/file code does."""
    import errno
    if e.errno == errno.ENOSPC:
        return CAP_EXCEEDED | DNR
    if e.errno == errno.EROFS:
        return NS_WRITE_PROTECTED | DNR
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
        return INVALID_OPCODE | DNR
    if e.errno == errno.EIO:
        return 0x281 if write else 0x286  # write fault / access denied (media)
    return INTERNAL | DNR
