"""The target core: what happens to one command between the transport that
received it and the transport that completes it (cf. Linux
drivers/nvme/target/core.c, nvmet_req_init + req->execute).

The transport (queue.py) calls, for each command capsule:
  init(queue, cmd, data)      the SQE's flags and its SGL against the data that
                              came in the capsule (nvmet_req_init); raises
                              status.NvmeError, else says whether the command
                              still waits for data from the host (an R2T);
  check_data_out(queue, cmd)  before the transport grants that data: would the
                              command run?  Raises status.NvmeError if not, so no
                              data moves for a command that fails anyway;
  execute(queue, cmd, data)   the command's handler for the queue it came on
                              (fabrics, admin or I/O) -> command.Result, or
                              command.DEFERRED when the handler completes later
                              (Asynchronous Event Request).  Never raises: an
                              error is a Result with its status.
The transport then only sends the completion (queue.complete).

`queue` is what the handlers see of the connection: ctrl, qid, auth and the
rest of queue.Queue's attributes named in fabrics.py, admin.py and io.py."""

import logging

from . import admin, fabrics, io
from . import status as st
from .command import DEFERRED, FABRICS, Result
from .identify import INLINE_DATA, MAX_TRANSFER
from .pdu import SGL_INLINE, SGL_TRANSPORT

log = logging.getLogger("nvmeof_target")

# statuses that hosts provoke on purpose (probing): not worth a debug line
_ROUTINE = (st.LBA_RANGE, st.INVALID_OPCODE, st.INVALID_FIELD)


def init(queue, cmd, data):
    """True when cmd moves data from the host that did not come in the
    capsule (the transport asks for it with an R2T, then calls execute)."""
    if cmd.flags & 0x03 or cmd.flags & 0xC0 != 0x40:    # fused, or not an SGL
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    if data is not None:
        if cmd.sgl_id != SGL_INLINE or not cmd.is_write:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        if cmd.sgl_addr != 0:
            raise st.NvmeError(st.SGL_INVALID_OFFSET | st.DNR)
        if len(data) != cmd.sgl_len:
            raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
        if queue.qid and cmd.opcode != FABRICS and len(data) > INLINE_DATA:
            raise st.NvmeError(st.SGL_INVALID_OFFSET | st.DNR)
        return False
    if cmd.sgl_len:
        if cmd.sgl_id != SGL_TRANSPORT or cmd.sgl_len > MAX_TRANSFER:
            raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
        return cmd.is_write
    return False


def check_data_out(queue, cmd):
    """All that can be known before the host sends cmd's data."""
    if queue.ctrl is None:
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    if queue.auth is not None and not queue.auth.authenticated:
        raise st.NvmeError(st.AUTH_REQUIRED | st.DNR)
    if cmd.opcode == FABRICS:
        fabrics.check_data_out(queue, cmd)
    elif queue.qid == 0:
        admin.check_data_out(queue, cmd)
    else:
        io.check_data_out(queue, cmd)


def execute(queue, cmd, data):
    """Run cmd (its data in hand) -> Result or DEFERRED; never raises."""
    try:
        res = _handler(queue, cmd, data)
    except st.NvmeError as e:
        if e.status & 0x7FF not in _ROUTINE:
            log.debug("%s: %r -> status %#x %s", queue.peer, cmd, e.status, e)
        return Result(e.status, e.dw0)
    except Exception:     # never let one command take the target down
        log.exception("%s: internal error on %r", queue.peer, cmd)
        return Result(st.INTERNAL | st.DNR)
    if res is not DEFERRED and res.data is not None and len(res.data) != cmd.sgl_len:
        return Result(st.INTERNAL | st.DNR)
    return res


def _handler(queue, cmd, data):
    if cmd.opcode == FABRICS:
        return fabrics.execute(queue, cmd, data)
    if queue.ctrl is None:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)    # Connect comes first
    if queue.auth is not None and not queue.auth.authenticated:
        raise st.NvmeError(st.AUTH_REQUIRED | st.DNR)     # DH-HMAC-CHAP first
    if queue.qid == 0:
        return admin.execute(queue, cmd)
    return io.execute(queue, cmd, data)
