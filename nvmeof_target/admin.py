"""Admin commands (NVMe base spec §5; modelled on drivers/nvme/target/admin-cmd.c
and discovery.c).  Handlers take the queue (for the controller, the target and
the connection's address) and the command, and return a Result or DEFERRED."""

import struct

from . import controller as C
from . import discovery, identify, logpages
from . import status as st
from .command import DEFERRED, Result

GET_LOG_PAGE, IDENTIFY, ABORT, SET_FEATURES, GET_FEATURES = 0x02, 0x06, 0x08, 0x09, 0x0A
ASYNC_EVENT, KEEP_ALIVE = 0x0C, 0x18

FID_TEMP_THRESH, FID_VWC, FID_NUM_QUEUES, FID_ASYNC, FID_KATO = 0x04, 0x06, 0x07, 0x0B, 0x0F

NSID_ALL = 0xFFFFFFFF


def execute(queue, cmd):
    ctrl = queue.ctrl
    handler = (_DISCOVERY if ctrl.discovery else _ADMIN).get(cmd.opcode)
    if handler is None:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)
    if not ctrl.ready:
        raise st.NvmeError((st.INVALID_OPCODE if ctrl.discovery else st.CMD_SEQ_ERROR) | st.DNR)
    return handler(queue, ctrl, cmd)


def check_data_out(queue, cmd):
    """Before an R2T is granted: no admin or discovery command here takes data
    from the host, so none gets one (the status execute() would answer)."""
    ctrl = queue.ctrl
    if (_DISCOVERY if ctrl.discovery else _ADMIN).get(cmd.opcode) is None:
        raise st.NvmeError(st.INVALID_OPCODE | st.DNR)
    if not ctrl.ready:
        raise st.NvmeError((st.INVALID_OPCODE if ctrl.discovery else st.CMD_SEQ_ERROR) | st.DNR)
    raise st.NvmeError(st.INVALID_FIELD | st.DNR)


def _need_len(cmd, n):
    if cmd.sgl_len != n:
        raise st.NvmeError(st.SGL_INVALID_DATA | st.DNR)


# ---- Identify ---------------------------------------------------------------------------
def _identify(queue, ctrl, cmd):
    _need_len(cmd, 4096)
    cns, csi = cmd.cdw10 & 0xFF, cmd.cdw11 >> 24
    sub = ctrl.subsys
    if cns == 0x01:
        if ctrl.discovery:
            return Result(data=identify.controller(ctrl, None, "discovery"))
        return Result(data=identify.controller(ctrl, sub.nqn, identify.serial_for(sub.uuid)))
    if ctrl.discovery:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    if cns == 0x00:
        if cmd.nsid == NSID_ALL:
            raise st.NvmeError(st.INVALID_NS | st.DNR)
        if cmd.nsid != 1:
            return Result(data=bytearray(4096))    # inactive NSID: zeros (nvmet)
        sub.refresh()
        return Result(data=identify.namespace(sub.nsze(), sub.lbads, sub.nguid, sub.readonly))
    if cns == 0x02:
        if cmd.nsid >= 0xFFFFFFFE:
            raise st.NvmeError(st.INVALID_NS | st.DNR)
        return Result(data=identify.active_ns_list(cmd.nsid))
    if cns == 0x03:
        if cmd.nsid != 1:
            raise st.NvmeError(st.INVALID_NS | st.DNR)
        return Result(data=identify.ns_descriptors(sub.uuid_bytes, sub.nguid))
    if cns in (0x05, 0x06) and csi == 0:
        return Result(data=bytearray(4096))        # NVM command set: no extra limits
    raise st.NvmeError(st.INVALID_FIELD | st.DNR)


# ---- Get Log Page --------------------------------------------------------------------------
def _log_args(cmd):
    lid = cmd.cdw10 & 0xFF
    rae = bool(cmd.cdw10 & (1 << 15))
    numd = ((cmd.cdw11 & 0xFFFF) << 16 | cmd.cdw10 >> 16) + 1
    offset = cmd.cdw12 | (cmd.cdw13 << 32)
    length = numd * 4
    _need_len(cmd, length)
    if offset & 3:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    return lid, rae, offset, length


def _get_log(queue, ctrl, cmd):
    lid, rae, offset, length = _log_args(cmd)
    sub = ctrl.subsys
    if lid == 0x01:
        page = logpages.error_log()
    elif lid == 0x02:
        page = logpages.smart(sub.stats)
    elif lid == 0x03:
        page = logpages.firmware_slots(identify.FIRMWARE)
    elif lid == 0x04:
        page = logpages.changed_ns(ctrl.ns_changed)
        if not rae:
            ctrl.ns_changed = False
            ctrl.aen_masked &= ~C.AEN_NS_ATTR
    elif lid == 0x05:
        page = logpages.effects()
    else:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    return Result(data=logpages.window(page, offset, length))


def _disc_get_log(queue, ctrl, cmd):
    lid, rae, offset, length = _log_args(cmd)
    if lid != 0x70:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    target = queue.target
    cache = ctrl.disc_cache
    if cache is None or cache[0] != target.genctr:
        traddr, trsvcid = queue.local_addr[:2]
        page = discovery.log_page(target.genctr, target.visible_subsystems(ctrl.hostnqn),
                                  traddr, trsvcid)
        ctrl.disc_cache = cache = (target.genctr, page)
    if not rae:
        ctrl.aen_masked &= ~C.AEN_DISC_CHANGE
    return Result(data=logpages.window(cache[1], offset, length))


# ---- Features -----------------------------------------------------------------------------
def _set_features(queue, ctrl, cmd):
    if cmd.sgl_len:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    fid, value = cmd.cdw10 & 0xFF, cmd.cdw11
    if fid == FID_NUM_QUEUES:
        dw0 = ctrl.set_queue_count(value & 0xFFFF, value >> 16)
        queue.target.publish(ctrl)
        return Result(dw0=dw0)
    if fid == FID_ASYNC:
        if value & ~ctrl.aen_supported():
            raise st.NvmeError(st.INVALID_FIELD | st.DNR)
        ctrl.aen_enabled = value
        return Result(dw0=value)
    if fid == FID_KATO:
        ctrl.kato_ms = ((value + 999) // 1000) * 1000
        ctrl.touch(queue.target.now())
        return Result(dw0=ctrl.kato_ms // 1000)
    if fid == FID_TEMP_THRESH and not ctrl.discovery:
        return Result()
    raise st.NvmeError(st.INVALID_FIELD | st.DNR)


def _get_features(queue, ctrl, cmd):
    fid = cmd.cdw10 & 0xFF
    if cmd.sgl_len:
        raise st.NvmeError(st.INVALID_FIELD | st.DNR)
    if fid == FID_ASYNC:
        return Result(dw0=ctrl.aen_enabled)
    if fid == FID_KATO:
        return Result(dw0=ctrl.kato_ms)
    if not ctrl.discovery:
        if fid == FID_NUM_QUEUES:
            return Result(dw0=ctrl.queue_count())
        if fid == FID_VWC:
            return Result(dw0=1)
        if fid == FID_TEMP_THRESH:
            return Result(dw0=273 + 70)
        if fid in (0x01, 0x02, 0x08):       # arbitration, power management, coalescing
            return Result(dw0=0)
    raise st.NvmeError(st.INVALID_FIELD | st.DNR)


# ---- AER, Keep Alive, Abort ---------------------------------------------------------------
def _async_event(queue, ctrl, cmd):
    if len(ctrl.aers) >= C.AER_LIMIT:
        raise st.NvmeError(st.ASYNC_LIMIT | st.DNR)
    ctrl.aers.append(cmd.cid)
    ready = ctrl.pop_event()
    if ready is not None:
        cid, dw0 = ready
        if cid == cmd.cid:
            return Result(dw0=dw0)
        queue.complete(cid, Result(dw0=dw0))
    return DEFERRED


def _keep_alive(queue, ctrl, cmd):
    if not ctrl.kato_ms:
        raise st.NvmeError(st.KA_TIMEOUT_INVALID)
    return Result()


def _abort(queue, ctrl, cmd):
    return Result(dw0=1)    # not aborted: commands run to completion immediately


_ADMIN = {IDENTIFY: _identify, GET_LOG_PAGE: _get_log, SET_FEATURES: _set_features,
          GET_FEATURES: _get_features, ASYNC_EVENT: _async_event, KEEP_ALIVE: _keep_alive,
          ABORT: _abort}
_DISCOVERY = {IDENTIFY: _identify, GET_LOG_PAGE: _disc_get_log, SET_FEATURES: _set_features,
              GET_FEATURES: _get_features, ASYNC_EVENT: _async_event, KEEP_ALIVE: _keep_alive}

__all__ = ["execute", "struct"]
