"""Base of the datapaths that serve a zvol of this host (raw and NBD): which
dataset an attachment uses, and the ZFS resources attachments share.

Shared state (st.shared), released with the last attachment:
    ro_clone   the read-only clone that exposes a snapshot
    volmode    a dataset we switched from volmode=none to dev, switched back
"""

import logging

from plugins.datapath import core, zvol

log = logging.getLogger("zfs-ng")


class LocalDatapath(core.Datapath):

    def source(self, u, st):
        """The Source of this volume's attachments, creating shared pieces once."""
        opened = st.data.get("open") or {}
        if opened.get("clone"):
            return zvol.Source(opened["clone"], True)
        kind, name = zvol.locate(u.sr, u.key)
        if kind == "volume":
            return zvol.Source(name, True)
        clone = st.shared.get("ro_clone")
        if clone is None or not zvol.exists(clone):
            # record before creating: a failure half-way is cleaned by _release
            st.shared["ro_clone"] = zvol.ro_clone_name(u.sr, u.key)
            clone = zvol.ro_clone(u.sr, u.key, name)
        return zvol.Source(clone, False, snapshot=name)

    def device(self, u, st):
        """(Source, device path), the device made to exist."""
        src = self.source(u, st)
        path, changed = zvol.wait_device(src.dataset)
        if changed:
            st.shared["volmode"] = src.dataset
        return src, path

    def _writable(self, u, st):
        opened = st.data.get("open") or {}
        if opened.get("clone"):
            return True
        return zvol.locate(u.sr, u.key)[0] == "volume"

    def _open(self, u, st, rec):
        kind, name = zvol.locate(u.sr, u.key)
        if kind != "volume":
            return  # a snapshot is read-only: nothing to discard at close
        rec.update(zvol.np_begin(u.sr, u.key, name))

    def _close(self, u, st):
        rec = st.data.get("open") or {}
        zvol.np_end(rec)

    def _release(self, u, st):
        shared = st.shared
        if shared.get("volmode"):
            ds = shared["volmode"]
            if zvol.exists(ds):
                zvol.zfs("inherit", "volmode", ds, check=False)
            shared.pop("volmode", None)
        if shared.get("ro_clone"):
            zvol.destroy(shared["ro_clone"])
            shared.pop("ro_clone", None)
