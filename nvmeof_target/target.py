"""The target: volumes from the registry, the live subsystems (a volume with at
least one controller: its Backend is open) and the controllers.  The protocol
layer calls it at Connect and when a queue goes away; the control socket calls
it to add, remove, allow, deny and resize volumes while hosts are connected."""

import logging
import time
import uuid as uuidlib

from blockio.backend import Backend

from . import controller as C
from blockio import volpath

from . import fabrics
from . import status as st
from .command import Result
from .controller import Controller
from .fabrics import ipo_data
from .nqn import DISCOVERY_NQN
from .registry import ALL

log = logging.getLogger("nvmeof_target")

CNTLID_MIN, CNTLID_MAX = 1, 0xFFEF


class LiveSubsystem(object):
    """A volume some host is connected to."""
    __slots__ = ("nqn", "uuid", "uuid_bytes", "nguid", "readonly", "lbads", "backend",
                 "stats", "controllers", "_nsze")

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
        self._nsze = None

    def nsze(self):
        """Namespace size in blocks; cached for the I/O path, refreshed by
        refresh() on resize notices and Identify Namespace."""
        if self._nsze is None:
            self._nsze = self.backend.size >> self.lbads
        return self._nsze

    def refresh(self):
        self._nsze = None


class Target(object):
    def __init__(self, registry, clock=time.monotonic, open_backend=Backend, worker=0,
                 nworkers=1, shared=None, on_change=None, file_dirs=None):
        """file_dirs: directories whose regular files may be served besides
        block devices (volpath.py); None: $ZFSNG_TARGET_FILE_DIRS."""
        self.registry = registry
        self.file_dirs = volpath.normalize_dirs(
            volpath.file_dirs_from_env() if file_dirs is None else file_dirs)
        self.now = clock
        self.open_backend = open_backend
        self.io_stats = None            # the server's I/O counters (a callable -> dict)
        self.live = {}              # nqn -> LiveSubsystem
        self.controllers = {}       # cntlid -> Controller (owned here)
        self.remote = {}            # cntlid -> Controller stand-in for I/O queues of a
        #                             controller owned by another worker
        self.worker, self.nworkers = worker, nworkers
        self.shared = shared        # workers.SharedControllers when nworkers > 1
        self.on_change = on_change  # parent of workers: forwards registry changes
        # this worker's cntlids: (cntlid - 1) % nworkers == worker
        self._next_cntlid = CNTLID_MIN + max(worker, 0)
        self.genctr = 1

    # ---- controllers ---------------------------------------------------------------------
    def create_controller(self, subnqn, hostnqn, hostid, kato_ms):
        if subnqn == DISCOVERY_NQN:
            # Never authenticated: the Linux host cannot (libnvme passes no
            # DH-HMAC-CHAP secret to a discovery controller), nvmet does not
            # ask either; the log shows names, every volume asks for the key.
            host_auth = None
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
            host_auth = self._host_auth(subnqn, hostnqn)
            sub = self._sub_for(vol)
            ctrl = Controller(self._alloc_cntlid(), sub, hostnqn, hostid, kato_ms, self.now())
            sub.controllers.add(ctrl)
        ctrl.auth = host_auth
        # With several workers, I/O may flow on queues this process never sees,
        # so the host must keep sending Keep Alives to the admin queue.
        ctrl.tbkas = self.shared is None
        self.controllers[ctrl.cntlid] = ctrl
        self.publish(ctrl)
        log.info("controller %d: %s for %s", ctrl.cntlid, subnqn, hostnqn)
        return ctrl

    def _host_auth(self, subnqn, hostnqn):
        """The host's DH-HMAC-CHAP key (auth.HostAuth): a host with one always
        authenticates.  A host without one: None, or refused where
        authentication is required (this subsystem, or all of them)."""
        host_auth = self.registry.host_auth(hostnqn)
        if host_auth is None and self.registry.auth_required(subnqn):
            log.warning("host %s refused for %s: it has no DH-HMAC-CHAP key", hostnqn, subnqn)
            raise st.NvmeError(st.CONNECT_INVALID_HOST | st.DNR, ipo_data(512))
        return host_auth

    def _sub_for(self, vol):
        sub = self.live.get(vol.nqn)
        if sub is None:
            try:
                backend = self.open_backend(vol.path, readonly=vol.readonly)
            except OSError as e:
                # Maybe a zvol still being imported: busy, no DNR, so the host retries.
                log.warning("cannot open %s for %s: %s", vol.path, vol.nqn, e)
                raise st.NvmeError(st.CONNECT_CTRL_BUSY)
            try:
                volpath.check_open(backend.fd, vol.path, self.file_dirs)
            except (ValueError, OSError) as e:     # the path changed since `add`
                backend.close()
                log.error("%s: %s", vol.nqn, e)
                raise st.NvmeError(st.CONNECT_INVALID_PARAM | st.DNR, ipo_data(256))
            sub = self.live[vol.nqn] = LiveSubsystem(vol, backend)
        return sub

    def _alloc_cntlid(self):
        step = self.nworkers
        for _ in range(CNTLID_MAX // step):
            c = self._next_cntlid
            nxt = c + step
            self._next_cntlid = nxt if nxt <= CNTLID_MAX else CNTLID_MIN + max(self.worker, 0)
            if c not in self.controllers:
                return c
        raise st.NvmeError(st.CONNECT_CTRL_BUSY)

    def publish(self, ctrl):
        """Let other workers accept I/O queues of ctrl (after Connect, Set Features)."""
        if self.shared is not None and not ctrl.discovery:
            self.shared.publish(ctrl.cntlid, ctrl.subsys.nqn, ctrl.hostnqn, ctrl.max_qid)

    def find_controller(self, subnqn, hostnqn, cntlid):
        """The controller an I/O queue Connect names, or None."""
        ctrl = self.controllers.get(cntlid) or self.remote.get(cntlid)
        if ctrl is None and self.shared is not None and self._owner(cntlid) != self.worker:
            ctrl = self._remote_controller(subnqn, hostnqn, cntlid)
        if ctrl is None or ctrl.dead or ctrl.hostnqn != hostnqn or ctrl.discovery:
            return None
        return ctrl if ctrl.subsys.nqn == subnqn else None

    def _owner(self, cntlid):
        return (cntlid - CNTLID_MIN) % self.nworkers

    def _remote_controller(self, subnqn, hostnqn, cntlid):
        """A stand-in for a controller another worker owns: it carries the
        namespace for I/O queues here; its admin side lives with the owner."""
        max_qid = self.shared.lookup(cntlid, subnqn, hostnqn)
        if max_qid is None:
            return None
        vol = self.registry.get(subnqn)
        if vol is None or not self.registry.host_allowed(vol, hostnqn):
            return None
        try:
            host_auth = self._host_auth(subnqn, hostnqn)
        except st.NvmeError:
            return None
        sub = self._sub_for(vol)
        ctrl = Controller(cntlid, sub, hostnqn, None, 0, self.now())
        ctrl.auth = host_auth
        ctrl.remote = True
        ctrl.max_qid = max_qid
        ctrl.csts = C.CSTS_RDY          # the owner enabled it before any I/O queue
        sub.controllers.add(ctrl)
        self.remote[cntlid] = ctrl
        log.info("controller %d (worker %d): I/O queues here", cntlid, self._owner(cntlid))
        return ctrl

    def queue_closed(self, queue):
        ctrl = queue.ctrl
        if ctrl is None or ctrl.dead:
            return
        if queue.qid == 0:
            self.destroy_controller(ctrl)
        elif ctrl.io_queues.get(queue.qid) is queue:
            del ctrl.io_queues[queue.qid]
            if ctrl.remote and not ctrl.io_queues:
                self.destroy_controller(ctrl, "last I/O queue here closed")

    def destroy_controller(self, ctrl, why="admin queue closed"):
        if ctrl.dead:
            return
        ctrl.dead = True
        log.info("controller %d gone: %s", ctrl.cntlid, why)
        if ctrl.remote:
            self.remote.pop(ctrl.cntlid, None)
        else:
            self.controllers.pop(ctrl.cntlid, None)
            if self.shared is not None:
                self.shared.clear(ctrl.cntlid)
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
        for ctrl in list(self.remote.values()):
            if self.shared.lookup(ctrl.cntlid, ctrl.subsys.nqn, ctrl.hostnqn) is None:
                self.destroy_controller(ctrl, "owner worker dropped it")
        for ctrl in list(self.controllers.values()) + list(self.remote.values()):
            if ctrl.auth is None or ctrl.dead:
                continue
            for q in [ctrl.admin] + list(ctrl.io_queues.values()):
                if q is not None and q.auth is not None and q.auth.expired(now):
                    log.warning("%s: controller %d qid %s: no DH-HMAC-CHAP within %d s",
                                q.peer, ctrl.cntlid, q.qid, fabrics.AUTH_TIMEOUT)
                    q.abort()

    # ---- volumes (control socket) ---------------------------------------------------------
    # Each change is a registry write plus its effect on live controllers; the
    # parent of several workers writes the registry and forwards the change.
    def add(self, nqn, path, uuid, readonly=False, allowed_hosts=(), allow_any_host=False,
            block_size=512, require_auth=False):
        if self.registry.get(nqn) is None:     # else "already exists" says more
            volpath.check_path(path, self.file_dirs)
        vol = self.registry.add(nqn, path, uuid, readonly, allowed_hosts, allow_any_host,
                                block_size, require_auth)
        self._changed("add", nqn)
        return vol

    def remove(self, nqn):
        self.registry.remove(nqn)
        self._changed("remove", nqn)

    def allow(self, nqn, hostnqn):
        self.registry.allow(nqn, hostnqn)
        self._changed("allow", nqn)

    def deny(self, nqn, hostnqn):
        self.registry.deny(nqn, hostnqn)
        self._changed("deny", nqn)

    def set_allow_any(self, nqn, value):
        self.registry.set_allow_any(nqn, value)
        self._changed("set_allow_any", nqn)

    def set_host_key(self, hostnqn, secret, ctrl_secret=None, hash_name="sha256",
                     dhgroup="ffdhe2048"):
        self.registry.set_host_key(hostnqn, secret, ctrl_secret, hash_name, dhgroup)
        self._host_changed(hostnqn)

    def remove_host_key(self, hostnqn):
        self.registry.remove_host_key(hostnqn)
        self._host_changed(hostnqn)

    def set_auth_required(self, nqn, value):
        self.registry.set_auth_required(nqn, value)
        self._changed("set_auth_required", nqn)

    def _host_changed(self, hostnqn):
        if self.on_change is not None:
            self.on_change("host_key", {"hostnqn": hostnqn})
        self.apply_change("host_key", {"hostnqn": hostnqn})

    def notify(self, nqn):
        """The volume changed size: tell connected hosts (NS attribute AEN)."""
        if self.registry.get(nqn) is None:
            raise KeyError("no subsystem %s" % nqn)
        return self._changed("notify", nqn)

    def _changed(self, op, nqn):
        if self.on_change is not None:
            self.on_change(op, {"nqn": nqn})
        return self.apply_change(op, {"nqn": nqn})

    def apply_change(self, op, args):
        """The effect of a registry change on this process's controllers."""
        if op == "host_key":
            # A new, changed or removed key: the host's controllers go and its
            # reconnects authenticate (or not) with what is configured now.
            for ctrl in list(self.controllers.values()) + list(self.remote.values()):
                if ctrl.hostnqn == args["hostnqn"]:
                    self.destroy_controller(ctrl, "DH-HMAC-CHAP key changed")
            return None
        nqn = args["nqn"]
        if op == "notify":
            return self._notify(nqn)
        subs = list(self.live.values()) if nqn == ALL else [self.live.get(nqn)]
        for sub in subs:
            if sub is None:
                continue
            vol = self.registry.get(sub.nqn)
            for ctrl in list(sub.controllers):
                if vol is None:
                    self.destroy_controller(ctrl, "volume removed")
                elif not self.registry.host_allowed(vol, ctrl.hostnqn):
                    self.destroy_controller(ctrl, "host no longer allowed")
                elif ctrl.auth is None and self.registry.auth_required(sub.nqn):
                    self.destroy_controller(ctrl, "authentication now required")
        self._discovery_changed()

    def _notify(self, nqn):
        sub = self.live.get(nqn)
        if sub is None:
            return 0
        sub.refresh()
        n = 0
        for ctrl in sub.controllers:
            if ctrl.remote:
                continue
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
                "queues": sum(len(c.io_queues) + 1 for c in self.controllers.values()),
                **(self.io_stats() if self.io_stats else {})}

    def close(self):
        for ctrl in list(self.controllers.values()) + list(self.remote.values()):
            self.destroy_controller(ctrl, "target stopping")
