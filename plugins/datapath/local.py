"""Base of the datapaths that serve a zvol of this host (raw and NBD): which
device an attachment uses, and what all attachments of a volume share.

The volume plugin owns the devices (plugins.volume.volume): activate_device
gives a volume its minor (idle volumes have volmode=none) or a snapshot its
read-only clone (POOL/zfs-ng/ro-KEY), deactivate_device undoes it.  Local
attachments are one user of the device (plugins.datapath.devices), taken
with the first attachment through any local datapath, dropped with the last.
The device and whether it is writable are kept in the volume's state, so
later attachments and activations cost no ZFS call.

Non-persistent sessions (Datapath.open persistent=false) are ours: the
attachments use a clone made at open and destroyed at close (zvol.np_*).
"""

import os

from plugins.datapath import core, devices, node, zvol

USER = "local"


def _volumes():
    # imported when needed: every call is a fresh interpreter (xapi-storage-script),
    # and most calls (activate, deactivate, detach of one of many) need no ZFS
    from plugins.volume import volume
    return volume


class LocalDatapath(core.Datapath):
    # Non-persistent sessions are ours (Datapath.open persistent=false: a ZFS
    # clone discarded at close), as XCP-ng's tapdisk datapath declares them too.
    features = ("NONPERSISTENT",)

    def device(self, u, st):
        """(writable, device path) of this volume's attachments; the device exists."""
        sh = st.shared
        opened = st.data.get("open") or {}
        if opened.get("clone"):
            path, _ = zvol.wait_device(opened["clone"])
            return True, path
        if sh.get("device") and sh.get("path") and os.path.exists(sh["path"]):
            return sh["writable"], sh["path"]
        sh["device"] = True  # recorded first: released even if activation fails
        loc = devices.acquire(u.sr, u.key, USER)
        sh["subnqn"] = loc["subnqn"]
        sh["path"] = loc["device"]
        sh["writable"] = not loc["readonly"]
        return sh["writable"], sh["path"]

    # -- activations: this host's claim in the node's record (node.claim_local) ------
    # raw and nbd put what they do themselves in _activate_local/_deactivate_local

    def _subnqn(self, u, st):
        if not st.shared.get("subnqn"):
            st.shared["subnqn"] = _volumes().locate(u.sr, u.key)["subnqn"]
        return st.shared["subnqn"]

    def _claim(self, u, st, domain, mode):
        modes = set(m for d, m in st.active.items() if d != domain) | {mode}
        node.claim_local(self._subnqn(u, st), core.RW if core.RW in modes else core.RO)

    def _unclaim_if_idle(self, u, st, domain):
        if not [d for d in st.active if d != domain]:
            node.unclaim_local(self._subnqn(u, st))

    def _activate(self, u, st, domain, rec, mode):
        self._claim(u, st, domain, mode)
        try:
            self._activate_local(u, st, domain, rec, mode)
        except BaseException:
            self._unclaim_if_idle(u, st, domain)
            raise

    def _reactivate(self, u, st, domain, rec, mode):
        self._claim(u, st, domain, mode)
        self._reactivate_local(u, st, domain, rec, mode)

    def _deactivate(self, u, st, domain, rec):
        try:
            self._deactivate_local(u, st, domain, rec)
        finally:
            self._unclaim_if_idle(u, st, domain)

    def _activate_local(self, u, st, domain, rec, mode):
        pass

    def _reactivate_local(self, u, st, domain, rec, mode):
        pass

    def _deactivate_local(self, u, st, domain, rec):
        pass

    def _writable(self, u, st):
        opened = st.data.get("open") or {}
        if opened.get("clone"):
            return True
        if "writable" in st.shared:
            return st.shared["writable"]
        return not _volumes().locate(u.sr, u.key)["readonly"]

    def _open(self, u, st, rec):
        loc = _volumes().locate(u.sr, u.key)
        if loc["readonly"]:
            return  # a snapshot: nothing can be written, nothing to discard
        _volumes().note_session(u.sr, u.key)   # before its clone: a crash reset finds it
        rec.update(zvol.np_begin(u.sr, u.key, loc["dataset"]))

    def _close(self, u, st):
        zvol.np_end(st.data.get("open") or {})

    def _release(self, u, st):
        sh = st.shared
        if sh.pop("device", None):
            devices.release(u.sr, u.key, USER)
        for k in ("path", "writable", "subnqn"):
            sh.pop(k, None)
