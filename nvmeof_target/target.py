"""The target: volumes from the registry, the live subsystems (a volume with at
least one controller: its Backend is open) and the controllers.  The protocol
layer calls it at Connect and when a queue goes away; the control socket calls
it to add, remove, allow, deny and resize volumes while hosts are connected."""

import logging
import time
import uuid as uuidlib

from blockio.backend import Backend

from . import controller as C
from . import status as st
from .command import Result
from .controller import Controller
from .fabrics import ipo_data
from .nqn import DISCOVERY_NQN

log = logging.getLogger("nvmeof_target")

CNTLID_MIN, CNTLID_MAX = 1, 0xFFEF


class LiveSubsystem(object):
    """A volume some host is connected to."""
    __slots__ = ("nqn", "uuid", "uuid_bytes", "nguid", "readonly", "lbads", "backend",
                 "stats", "controllers")

    def __init__(self, vol, backend):
        self.nqn = vol.nqn
        self.uuid = vol.uuid
        self.uuid_bytes = uuidlib.UUID(vol.uuid).bytes
        self.nguid = self.uuid_bytes          # stable: the volume's own UUID
        self.readonly = vol.readonly
        self.lbads = vol.block_size.bit_length() - 1
        self.backend = backend
        self.stats = {"reads": 0, "writes": 0, "read_bytes": 0, "write_bytes": 0}
        self.controllers = set()

    def nsze(self):
        return self.backend.size >> self.lbads


class Target(object):
    def __init__(self, registry, clock=time.monotonic, open_backend=Backend):
        self.registry = registry
        self.now = clock
        self.open_backend = open_backend
        self.live = {}              # nqn -> LiveSubsystem
        self.controllers = {}       # cntlid -> Controller
        self._next_cntlid = CNTLID_MIN
        self.genctr = 1

    # ---- controllers ---------------------------------------------------------------------
    def create_controller(self, subnqn, hostnqn, hostid, kato_ms):
        if subnqn == DISCOVERY_NQN:
            ctrl = Controller(self._alloc_cntlid(), None, hostnqn, hostid, kato_ms, self.now(),
                              discovery=True)
        else:
            vol = self.registry.get(subnqn)
            if vol is None:
                raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(256),
                                   "unknown subsystem %s" % subnqn)
            if not self.registry.host_allowed(vol, hostnqn):
                log.warning("host %s refused for %s", hostnqn, subnqn)
                raise st.NvmeError(st.CONNECT_INVALID_HOST | st.DNR, ipo_data(512))
            sub = self.live.get(subnqn)
            if sub is None:
                try:
                    backend = self.open_backend(vol.path, readonly=vol.readonly)
                except OSError as e:
                    # Maybe a zvol still being imported: busy, no DNR, so the host retries.
                    log.warning("cannot open %s for %s: %s", vol.path, subnqn, e)
                    raise st.NvmeError(st.CONNECT_CTRL_BUSY)
                sub = self.live[subnqn] = LiveSubsystem(vol, backend)
            ctrl = Controller(self._alloc_cntlid(), sub, hostnqn, hostid, kato_ms, self.now())
            sub.controllers.add(ctrl)
        self.controllers[ctrl.cntlid] = ctrl
        log.info("controller %d: %s for %s", ctrl.cntlid, subnqn, hostnqn)
        return ctrl

    def _alloc_cntlid(self):
        for _ in range(CNTLID_MAX):
            c = self._next_cntlid
            self._next_cntlid = c + 1 if c < CNTLID_MAX else CNTLID_MIN
            if c not in self.controllers:
                return c
        raise st.NvmeError(st.CONNECT_CTRL_BUSY)

    def find_controller(self, subnqn, hostnqn, cntlid):
        ctrl = self.controllers.get(cntlid)
        if ctrl is None or ctrl.dead or ctrl.hostnqn != hostnqn:
            return None
        nqn = DISCOVERY_NQN if ctrl.discovery else ctrl.subsys.nqn
        return ctrl if nqn == subnqn and not ctrl.discovery else None

    def queue_closed(self, queue):
        ctrl = queue.ctrl
        if ctrl is None or ctrl.dead:
            return
        if queue.qid == 0:
            self.destroy_controller(ctrl)
        elif ctrl.io_queues.get(queue.qid) is queue:
            del ctrl.io_queues[queue.qid]

    def destroy_controller(self, ctrl, why="admin queue closed"):
        if ctrl.dead:
            return
        ctrl.dead = True
        log.info("controller %d gone: %s", ctrl.cntlid, why)
        self.controllers.pop(ctrl.cntlid, None)
        for q in list(ctrl.io_queues.values()):
            q.abort()
        ctrl.io_queues.clear()
        if ctrl.admin is not None:
            ctrl.admin.abort()
        sub = ctrl.subsys
        if sub is not None:
            sub.controllers.discard(ctrl)
            if not sub.controllers:
                del self.live[sub.nqn]
                sub.backend.close()

    def expire(self):
        """Keep-alive timeout: tear down controllers that went silent."""
        now = self.now()
        for ctrl in [c for c in self.controllers.values() if c.expired(now)]:
            self.destroy_controller(ctrl, "keep-alive timeout")

    # ---- volumes (control socket) ---------------------------------------------------------
    def add(self, nqn, path, uuid, readonly=False, allowed_hosts=(), allow_any_host=False,
            block_size=512):
        vol = self.registry.add(nqn, path, uuid, readonly, allowed_hosts, allow_any_host,
                                block_size)
        self._discovery_changed()
        return vol

    def remove(self, nqn):
        self.registry.remove(nqn)
        sub = self.live.get(nqn)
        if sub is not None:
            for ctrl in list(sub.controllers):
                self.destroy_controller(ctrl, "volume removed")
        self._discovery_changed()

    def allow(self, nqn, hostnqn):
        self.registry.allow(nqn, hostnqn)
        self._discovery_changed()

    def deny(self, nqn, hostnqn):
        self.registry.deny(nqn, hostnqn)
        self._drop_disallowed(nqn)
        self._discovery_changed()

    def set_allow_any(self, nqn, value):
        self.registry.set_allow_any(nqn, value)
        if not value:
            self._drop_disallowed(nqn)
        self._discovery_changed()

    def _drop_disallowed(self, nqn):
        sub = self.live.get(nqn)
        vol = self.registry.get(nqn)
        if sub is None or vol is None:
            return
        for ctrl in list(sub.controllers):
            if not self.registry.host_allowed(vol, ctrl.hostnqn):
                self.destroy_controller(ctrl, "host no longer allowed")

    def notify(self, nqn):
        """The volume changed size: tell connected hosts (NS attribute AEN)."""
        if self.registry.get(nqn) is None:
            raise KeyError("no subsystem %s" % nqn)
        sub = self.live.get(nqn)
        if sub is None:
            return 0
        n = 0
        for ctrl in sub.controllers:
            ctrl.ns_changed = True
            ready = ctrl.post_event(C.AEN_NS_CHANGED, C.AEN_NS_ATTR)
            if ready is not None and ctrl.admin is not None:
                ctrl.admin.complete(ready[0], Result(dw0=ready[1]))
                n += 1
        return n

    def _discovery_changed(self):
        self.genctr += 1
        for ctrl in self.controllers.values():
            if ctrl.discovery:
                ready = ctrl.post_event(C.AEN_DISC_CHANGED, C.AEN_DISC_CHANGE)
                if ready is not None and ctrl.admin is not None:
                    ctrl.admin.complete(ready[0], Result(dw0=ready[1]))

    def visible_subsystems(self, hostnqn):
        return self.registry.visible(hostnqn)

    def stats(self):
        return {"volumes": self.registry.count(), "live_subsystems": len(self.live),
                "controllers": len(self.controllers),
                "queues": sum(len(c.io_queues) + 1 for c in self.controllers.values())}

    def close(self):
        for ctrl in list(self.controllers.values()):
            self.destroy_controller(ctrl, "target stopping")
