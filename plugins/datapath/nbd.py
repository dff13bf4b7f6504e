"""zfsng-nbd: a local zvol (or a snapshot's read-only clone) served over NBD on
a unix socket by the project's own server (nbd_server), one background
process per attached volume, shared by all its NBD attachments and stopped
with the last of them.

Each attachment gets its own kernel NBD device connected to that server
(nbd_client.py, as xapi's nbd_client_manager does), and attach returns
XenDisk(vbd) + BlockDevice naming it, for blkback, and the Nbd implementation
(`nbd:unix:<sock>:exportname=<key>`) for NBD users.  xenopsd hands the backend
the BlockDevice path (xenops_server_xen.ml, params_of_backend); XCP-ng 8.3 has
no qdisk backend for guests (qemuback is disabled in xcp-ng-xapi-storage's
spec), so a qdisk XenDisk or an Nbd alone would serve no VM and no dom0 plug.
A host without nbd-client or the nbd module gets Nbd_client_unavailable.

A snapshot's export carries its ZFS allocation map (allocmap.py), so NBD
block status shows where it was never written; live volumes report all data.
"""

import os

from plugins import smapi, state, uri
from plugins.datapath import allocmap, local, nbd_client


def socket_path(key):
    return os.path.join(state.run_dir(), "nbd", "%s.sock" % key)


def map_path(key):
    return os.path.join(state.run_dir(), "nbd", "%s.alloc.json" % key)


def nbd_uri(sock, name):
    return "nbd:unix:%s:exportname=%s" % (sock, name)


def _alive(pid):
    """Is pid still our NBD server (and not a recycled pid)?"""
    try:
        with open("/proc/%d/cmdline" % int(pid), "rb") as f:
            return b"nbd_server" in f.read()
    except (OSError, IOError, ValueError):
        return False


class NbdDatapath(local.LocalDatapath):
    scheme = uri.NBD

    def attach(self, uri, domain, kernel_device=True):
        """kernel_device=False (the admin CLI's `vol export`, not SMAPI): the
        server only, for NBD clients; no /dev/nbdN, no block implementations."""
        self._kernel_device = kernel_device
        return local.LocalDatapath.attach(self, uri, domain)

    def _server(self, u, st):
        """The running server of this volume, started if needed."""
        writable, dev = self.device(u, st)
        srv = st.shared.get("nbd")
        if srv is not None:
            if _alive(srv["pid"]) and os.path.exists(srv["sock"]) and srv["device"] == dev:
                return srv
            self._stop(st)
        sock = socket_path(u.key)
        d = os.path.dirname(sock)
        if not os.path.isdir(d):
            os.makedirs(d, 0o700)
        if os.path.exists(sock):
            os.unlink(sock)  # left by a server that died with its host process
        from nbd_server import run as nbd_run
        export = {"name": u.key, "path": dev, "readonly": not writable,
                  "description": "zfs-ng %s" % u.volume_id}
        if not writable and not (st.data.get("open") or {}).get("clone"):
            # a snapshot: its ZFS allocation map for base:allocation (allocmap.py
            # says why live volumes get none)
            amap = allocmap.for_export(u.sr, u.key, map_path(u.key))
            if amap:
                export["allocation"] = amap
        try:
            pid = nbd_run.start([export], unix_path=sock, log_path=sock[:-len(".sock")] + ".log")
        except (RuntimeError, OSError, ValueError) as e:
            if export.get("allocation"):
                os.unlink(export["allocation"])
            raise smapi.BackendError("NBD_server_failed", "cannot serve %s over NBD: %s"
                                     % (u.volume_id, e))
        srv = {"pid": pid, "sock": sock, "device": dev, "export": u.key,
               "readonly": not writable, "allocation": export.get("allocation")}
        st.shared["nbd"] = srv
        return srv

    def _stop(self, st):
        srv = st.shared.pop("nbd", None)
        if srv is not None and _alive(srv["pid"]):
            from nbd_server import run as nbd_run
            nbd_run.stop(srv["pid"])
        if srv is not None and srv.get("allocation"):
            try:
                os.unlink(srv["allocation"])
            except OSError:
                pass

    def _attach(self, u, st, domain, rec):
        srv = self._server(u, st)
        rec["sock"] = srv["sock"]
        link = nbd_uri(srv["sock"], srv["export"])
        if not getattr(self, "_kernel_device", True):
            return [["Nbd", {"uri": link}]]
        try:
            dev = nbd_client.connect(srv["sock"], srv["export"], state.run_dir())
        except nbd_client.Unavailable as e:
            raise smapi.BackendError(
                "Nbd_client_unavailable", "%s: this host cannot attach a volume over NBD "
                "(%s); use the zfsng-raw datapath (SR datapath=raw)" % (u.volume_id, e))
        except nbd_client.NbdClientError as e:
            raise smapi.BackendError("NBD_client_failed", "%s: %s" % (u.volume_id, e))
        rec["nbd_device"] = dev
        return [["XenDisk", {"backend_type": "vbd", "params": dev, "extra": {}}],
                ["BlockDevice", {"path": dev}],
                ["Nbd", {"uri": link}]]

    def _still_attached(self, u, st, domain, rec):
        srv = st.shared.get("nbd")
        if srv is None or not _alive(srv["pid"]) or not os.path.exists(srv["sock"]):
            return False
        dev = rec.get("nbd_device")
        if dev is None:
            return True   # a server-only attachment (vol export)
        try:
            return nbd_client.connected(dev)
        except nbd_client.NbdClientError:
            return False

    def _reactivate_local(self, u, st, domain, rec, mode):
        if not self._still_attached(u, st, domain, rec):
            raise smapi.BackendError("NBD_server_failed", "the NBD server of %s is gone; "
                                     "detach and attach again" % u.volume_id)

    def _detach(self, u, st, domain, rec):
        dev = rec.get("nbd_device")
        if dev is not None and not nbd_client.disconnect(dev):
            smapi.log.error("detach %s %s: %s is still connected", u.volume_id, domain, dev)
        # the server is shared by the NBD attachments only: raw ones may remain
        if not [d for d, r in st.attached.items()
                if d != domain and r.get("scheme") == self.scheme]:
            self._stop(st)

    def _release(self, u, st):
        try:
            self._stop(st)
        finally:
            local.LocalDatapath._release(self, u, st)


def methods():
    from plugins.datapath import core
    return core.methods(NbdDatapath(), "local zvols served over NBD (unix socket)")
