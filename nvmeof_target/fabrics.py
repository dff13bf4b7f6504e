"""Fabrics commands (opcode 0x7F; drivers/nvme/target/fabrics-cmd.c): Connect
binds a queue to a controller, Property Get/Set reach its registers,
Authentication Send/Receive carry DH-HMAC-CHAP (auth.py) on a queue whose
Connect answered AUTHREQ.ATR; until it is done only those two are accepted."""

import logging
import struct

from . import auth
from . import controller as C
from . import status as st
from .command import DEFERRED, Result
from .nqn import cstr, valid_nqn

log = logging.getLogger("nvmeof_target")

PROP_SET, CONNECT, PROP_GET = 0x00, 0x01, 0x04
AUTH_SEND, AUTH_RECEIVE = auth.AUTH_SEND, auth.AUTH_RECEIVE
AUTH_TIMEOUT = 60.0          # seconds from Connect to the end of the transaction
_CONNECT_SQE = struct.Struct("<HHHBxI")           # at 40: recfmt qid sqsize cattr kato
_CONNECT_DATA = struct.Struct("<16sH238x256s256s256x")
CATTR_DISABLE_SQFLOW = 1 << 2


def check_data_out(queue, cmd):
    """Before an R2T is granted (the queue is connected): Connect again is a
    sequence error, and no fabrics command takes its data through an R2T
    (Connect's 1024 bytes and the authentication messages come in the capsule)."""
    if cmd.fctype == CONNECT:
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)


def ipo_data(offset):
    """Connect Invalid Parameter: DW0 names the bad byte inside the Connect data."""
    return (1 << 16) | offset


def execute(queue, cmd, data):
    fctype = cmd.fctype
    if queue.ctrl is None and fctype != CONNECT:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)
    if fctype == CONNECT:
        return _connect(queue, cmd, data)
    if fctype in (AUTH_SEND, AUTH_RECEIVE):
        return _authenticate(queue, cmd, data)
    if queue.auth is not None and not queue.auth.authenticated:
        raise st.NvmeError(st.AUTH_REQUIRED | st.DNR)
    if fctype == PROP_GET:
        size8 = cmd.raw[40] & 7 == 1
        offset = struct.unpack_from("<I", cmd.raw, 44)[0]
        value = queue.ctrl.prop_get(offset, size8)
        return Result(dw0=value & 0xFFFFFFFF, dw1=value >> 32)
    if fctype == PROP_SET:
        if queue.qid != 0:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        size8 = cmd.raw[40] & 7 == 1
        offset, value = struct.unpack_from("<IQ", cmd.raw, 44)
        queue.ctrl.prop_set(offset, value, size8)
        return Result()
    raise st.NvmeError(st.INVALID_OPCODE | st.DNR)


def _connect(queue, cmd, data):
    if queue.ctrl is not None:
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    if data is None or len(data) != 1024:
        raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
    recfmt, qid, sqsize, cattr, kato = _CONNECT_SQE.unpack_from(cmd.raw, 40)
    if recfmt != 0:
        raise st.NvmeError(st.CONNECT_FORMAT | st.DNR)
    hostid, cntlid, subnqn, hostnqn = _CONNECT_DATA.unpack(bytes(data))
    subnqn, hostnqn = cstr(subnqn), cstr(hostnqn)
    if not valid_nqn(subnqn):
        raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(256))
    if not valid_nqn(hostnqn):
        raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(512))
    if sqsize == 0 or sqsize > C.MQES:
        raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, 44)
    target = queue.target
    if qid == 0:
        if cntlid != 0xFFFF:
            raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(16))
        ctrl = target.create_controller(subnqn, hostnqn, hostid, kato)
        ctrl.admin = queue
    else:
        ctrl = target.find_controller(subnqn, hostnqn, cntlid)
        if ctrl is None or qid > ctrl.max_qid:
            raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(16))
        if qid in ctrl.io_queues:
            raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
        ctrl.io_queues[qid] = queue
    queue.bind(ctrl, qid, sqsize + 1, bool(cattr & CATTR_DISABLE_SQFLOW))
    if ctrl.auth is None:
        return Result(dw0=ctrl.cntlid)
    # The host has a key: this queue authenticates before anything else (I/O
    # queues too, or anyone naming the host and a guessed cntlid could add one).
    queue.auth = auth.Authenticator(ctrl.auth, subnqn, hostnqn,
                                    deadline=target.now() + AUTH_TIMEOUT)
    return Result(dw0=ctrl.cntlid | auth.CONNECT_ATR)


# Authentication Send/Receive SQE (struct nvmf_auth_send_command): SPSP0 @41,
# SPSP1 @42, SECP @43, TL/AL @44.
_AUTH_SQE = struct.Struct("<BBBI")


def _authenticate(queue, cmd, data):
    a = queue.auth
    if a is None:                   # no authentication asked of this queue
        raise st.NvmeError(st.CMD_SEQ_ERROR | st.DNR)
    spsp0, spsp1, secp, length = _AUTH_SQE.unpack_from(cmd.raw, 41)
    if secp != auth.SECP_DHCHAP or spsp0 != 1 or spsp1 != 1 or length == 0:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    if length != cmd.sgl_len:
        raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)
    before = a.step
    if cmd.fctype == AUTH_SEND:
        if length > auth.MAX_SEND or data is None:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        a.send(data)
        res = Result()
    else:
        if length > auth.MAX_RECEIVE:
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        msg = a.receive(length)
        res = Result(data=msg) if msg is not None else Result(st.INVALID_FIELD | st.DNR)
    if a.closing:
        log.warning("%s: qid %d: DH-HMAC-CHAP failed for %s (reason %d: %s)", queue.peer,
                    queue.qid, a.hostnqn, a.reason, a.why)
        queue.complete(cmd.cid, res)    # the host reads the Failure1 first
        queue.abort()
        return DEFERRED
    if a.step == auth.DONE and before != auth.DONE:
        log.info("%s: qid %d: %s authenticated (%s, %s)", queue.peer, queue.qid, a.hostnqn,
                 auth.HASHES[a.hash_id], auth.DHGROUP_NAMES[a.dhgroup_id])
    return res
