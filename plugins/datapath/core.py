"""What every zfs-ng datapath shares: the SMAPIv3 Datapath calls on top of the
per-volume state, with the rules xapi relies on.

  * attach/activate/deactivate/detach/open/close are idempotent: xapi repeats
    calls after failures and restarts;
  * one volume may be active read-only under many domains at once (backups,
    xapi-nbd plug a dom0 VBD per connection), or read-write under exactly one,
    never both;
  * detach never fails: it tears down what it can, logs the rest, and forgets;
  * a failed call leaves nothing half-done (each step undoes itself).

A scheme (raw, nbd, nvme+tcp) subclasses Datapath and supplies the hooks
_attach/_activate/_deactivate/_detach/_open/_close/_release.
"""

import re

from plugins import smapi, state, uri as urimod

log = smapi.log

# xapi passes a guest's domid ("3"); for dom0 users "u0_" + the datapath id with
# '-' and '/' turned into '_' (xapi-storage-script main.ml, domain_of, since
# xapi v24.40.0; "0" before).
_DOMAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/+-]{0,127}\Z")

RW = "rw"
RO = "ro"


def check_domain(domain):
    if not isinstance(domain, str) or not _DOMAIN.match(domain):
        raise smapi.InvalidParameters("invalid domain %r" % (domain,))
    return domain


def parse_uri(uri, scheme):
    try:
        u = urimod.parse(uri)
    except urimod.BadUri as e:
        raise smapi.InvalidParameters(str(e))
    if u.scheme != scheme:
        raise smapi.InvalidParameters("the %s datapath cannot handle %r" % (scheme, uri))
    return u


class Datapath(object):
    scheme = None
    # What Plugin.Query declares.  xapi-storage-script reads two datapath
    # features (main.ml, Datapath_plugins.supports_feature): NONPERSISTENT makes
    # it call Datapath.open(uri, persistent) at every VM start (epoch_begin) and
    # Datapath.close at every stop (epoch_end), and prefer this scheme for
    # on-boot=reset disks (choose_datapath); without it xapi resets such disks
    # itself (Volume.clone + the clone-on-boot key).  VDI_MIRROR_IN: not ours.
    features = ()

    # -- the SMAPIv3 calls ---------------------------------------------------------

    def open(self, uri, persistent):
        u = parse_uri(uri, self.scheme)
        with state.locked(u.volume_id) as st:
            cur = st.data.get("open")
            if persistent:
                if cur and not cur.get("persistent", True) and st.attached:
                    raise smapi.BackendError(
                        "Volume_in_use", "%s is attached non-persistent; detach it first" % uri)
                if cur and not cur.get("persistent", True):
                    self._close(u, st)
                st.data.pop("open", None)
                return None
            if cur and not cur.get("persistent", True):
                return None  # already open non-persistent
            if st.attached:
                raise smapi.BackendError(
                    "Volume_in_use", "cannot make %s non-persistent while attached" % uri)
            st.data["open"] = {"persistent": False}
            try:
                self._open(u, st, st.data["open"])
            except BaseException:
                st.data.pop("open", None)
                raise
        return None

    def close(self, uri):
        u = parse_uri(uri, self.scheme)
        with state.locked(u.volume_id) as st:
            cur = st.data.get("open")
            if not cur:
                return None
            if st.attached:
                raise smapi.BackendError(
                    "Volume_in_use", "%s is still attached under %s; detach before close"
                    % (uri, ", ".join(sorted(st.attached))))
            if not cur.get("persistent", True):
                self._close(u, st)
            st.data.pop("open", None)
        return None

    def attach(self, uri, domain):
        u = parse_uri(uri, self.scheme)
        check_domain(domain)
        with state.locked(u.volume_id) as st:
            rec = st.attached.get(domain)
            if rec is not None:
                if rec.get("scheme") != self.scheme:
                    raise smapi.BackendError(
                        "Volume_in_use", "%s is attached to domain %s through %s"
                        % (u.volume_id, domain, rec.get("scheme")))
                if self._still_attached(u, st, domain, rec):
                    return {"implementations": rec["implementations"]}
                log.info("attach %s %s: previous attachment is gone, redoing it", uri, domain)
                self._detach_quietly(u, st, domain, rec)
            rec = {"scheme": self.scheme, "uri": uri}
            try:
                impls = self._attach(u, st, domain, rec)
            except BaseException:
                # whatever the hook recorded in rec before failing is undone here
                self._detach_quietly(u, st, domain, rec)
                if not self._attachments(st):
                    self._release_quietly(u, st)
                raise
            rec["implementations"] = impls
            st.attached[domain] = rec
            return {"implementations": impls}

    def activate(self, uri, domain):
        return self._activate_mode(uri, domain, RW)

    def activate_readonly(self, uri, domain):
        return self._activate_mode(uri, domain, RO)

    def deactivate(self, uri, domain):
        u = parse_uri(uri, self.scheme)
        check_domain(domain)
        with state.locked(u.volume_id) as st:
            if domain not in st.active:
                return None
            rec = st.attached.get(domain)
            if rec is not None:
                self._deactivate(u, st, domain, rec)
            del st.active[domain]
        return None

    def detach(self, uri, domain):
        """Never fails: xapi cannot do anything with a detach error."""
        try:
            u = parse_uri(uri, self.scheme)
        except smapi.SmapiError as e:
            log.error("detach %r %r: %s (nothing to do)", uri, domain, e)
            return None
        try:
            with state.locked(u.volume_id) as st:
                rec = st.attached.get(domain)
                if domain in st.active:
                    if rec is not None:
                        try:
                            self._deactivate(u, st, domain, rec)
                        except Exception as e:
                            log.error("detach %s %s: deactivate failed: %s", uri, domain, e)
                    del st.active[domain]
                if rec is not None:
                    self._detach_quietly(u, st, domain, rec)
                    st.attached.pop(domain, None)
                if not self._attachments(st):
                    self._release_quietly(u, st)
        except Exception as e:
            log.error("detach %s %s failed, state forgotten: %s", uri, domain, e)
        return None

    def check_writable(self, uri):
        """May this volume be activated read-write (not a snapshot)?"""
        u = parse_uri(uri, self.scheme)
        with state.locked(u.volume_id) as st:
            return self._writable(u, st)

    # -- rules -----------------------------------------------------------------------

    def _activate_mode(self, uri, domain, mode):
        u = parse_uri(uri, self.scheme)
        check_domain(domain)
        with state.locked(u.volume_id) as st:
            rec = st.attached.get(domain)
            if rec is None or rec.get("scheme") != self.scheme:
                raise smapi.BackendError(
                    "Not_attached", "%s is not attached to domain %s on this host" % (uri, domain))
            cur = st.active.get(domain)
            if cur == mode:
                self._reactivate(u, st, domain, rec, mode)
                return None
            if cur is not None:
                raise smapi.BackendError(
                    "Activation_mode_conflict", "%s is already active %s in domain %s; "
                    "deactivate it first" % (uri, _word(cur), domain))
            others = {d: m for d, m in st.active.items() if d != domain}
            if mode == RW:
                if not self._writable(u, st):
                    raise smapi.BackendError(
                        "Volume_read_only", "%s is read-only (a snapshot); use "
                        "activate_readonly" % uri)
                if others:
                    raise smapi.BackendError(
                        "Volume_in_use", "%s is already active (%s) in domain(s) %s"
                        % (uri, "/".join(sorted(set(_word(m) for m in others.values()))),
                           ", ".join(sorted(others))))
            elif any(m == RW for m in others.values()):
                raise smapi.BackendError(
                    "Volume_in_use", "%s is active read-write in domain %s; read-only "
                    "activation refused" % (uri, [d for d, m in others.items() if m == RW][0]))
            self._activate(u, st, domain, rec, mode)
            st.active[domain] = mode
        return None

    def _attachments(self, st):
        return [d for d, r in st.attached.items()]

    def _detach_quietly(self, u, st, domain, rec):
        try:
            self._detach(u, st, domain, rec)
        except Exception as e:
            log.error("detach %s %s: %s", u.uri, domain, e)

    def _release_quietly(self, u, st):
        try:
            self._release(u, st)
        except Exception as e:
            log.error("release of shared resources of %s: %s", u.uri, e)

    # -- hooks -----------------------------------------------------------------------

    def _open(self, u, st, rec):
        """Make the volume non-persistent (rec is st.data['open'])."""
        raise smapi.Unimplemented("Datapath.open(persistent=false) on %s" % self.scheme)

    def _close(self, u, st):
        """Discard what was written since _open."""

    def _attach(self, u, st, domain, rec):
        raise NotImplementedError

    def _still_attached(self, u, st, domain, rec):
        return True

    def _writable(self, u, st):
        return True

    def _activate(self, u, st, domain, rec, mode):
        pass

    def _reactivate(self, u, st, domain, rec, mode):
        """A repeated activate: make sure it really is active (e.g. after a crash)."""

    def _deactivate(self, u, st, domain, rec):
        pass

    def _detach(self, u, st, domain, rec):
        pass

    def _release(self, u, st):
        """The last attachment is gone: free what attachments shared."""


def _word(mode):
    return "read-write" if mode == RW else "read-only"


# -- the entry point shared by the three plugin directories ---------------------------

def plugin_query(scheme, description, features=()):
    def query():
        return {
            "plugin": scheme,
            "name": "zfs-ng %s datapath" % scheme,
            "description": description,
            "vendor": "zfs-ng",
            "copyright": "zfs-ng contributors, GPL-2.0-or-later",
            "version": "0.1.0",
            "required_api_version": smapi.API_VERSION,
            "features": list(features),
            "configuration": {},
            "required_cluster_stack": [],
        }
    return query


def methods(dp, description, extra_params=()):
    """The SMAPIv3 method table of a datapath instance."""
    P = smapi.Param
    U = P("uri", str, "a volume URI published by the zfs-ng volume plugin")
    D = P("domain", str, "the domain (a domid, or u0_<dp> for dom0)")
    M = smapi.Method
    x = list(extra_params)
    return [
        M("Plugin", "Query", plugin_query(dp.scheme, description, dp.features)),
        M("Plugin", "diagnostics", lambda: "zfs-ng %s datapath" % dp.scheme),
        M("Datapath", "open", dp.open, [U, P("persistent", bool, "false: discard writes at close")]),
        M("Datapath", "close", dp.close, [U]),
        M("Datapath", "attach", dp.attach, [U, D] + x),
        M("Datapath", "activate", dp.activate, [U, D]),
        M("Datapath", "activate_readonly", dp.activate_readonly, [U, D]),
        M("Datapath", "deactivate", dp.deactivate, [U, D]),
        M("Datapath", "detach", dp.detach, [U, D]),
    ]
