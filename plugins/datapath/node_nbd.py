"""The storage node's side of nbd+tls attachments (the node ops and the export
source of its one NBD-over-TLS endpoint).

A host that attaches nbd+tls://NODE:PORT/SR_UUID/KEY asks the node (node.call,
the same transport as nvme+tcp) to
  nbd_grant(sr_uuid, key, client, mode)   activate the volume's device and let
                         the client identity `client` (the CN of the host's
                         TLS client certificate) open it on the node's NBD
                         endpoint; read-only when mode is "ro" or the volume is
                         a snapshot.  Returns {"export", "readonly", "size"}.
  nbd_claim(sr_uuid, key, client, mode)   record an activation; read-write on
                         one host excludes every other host, nvme+tcp hosts
                         included (records.claim_in on the volume's one record):
                         Activated_on_another_host
  nbd_unclaim(sr_uuid, key, client)       drop it
  nbd_revoke(sr_uuid, key, client)        forget the grant and the claim; with
                         the last client gone, release the device (never fails:
                         what cannot be undone is logged, the next revoke
                         retries it)
Every op is idempotent.  Records, all on the node (state.node_state_dir):
  * per volume, under the lock "nbd:<sr>/<key>": {"pool", "clients": {CN: mode}};
  * the claims in the volume's one node record (records.volume_lock(subnqn));
  * one grant file per (client, export): <node dir>/nbd-grants/<CN>/<hash>.json,
    {"client", "export", "device", "readonly"}, written atomically.  The NBD
    server (`zfs-ng nbd serve-node`) reads these per NBD_OPT_GO/INFO/LIST
    (lookup(), names()): one listener for every volume, no process per volume.

The server serves an export only to the identity it was granted to (the CN of
a certificate its CA signed, checked by TLS), read-only when the grant is.  A
connection still open when its grant is revoked is cut before its next request
(within a second: nbd_server.exports.DynamicExports.still_granted); so a host
that was fenced (its grant revoked from elsewhere: `zfs-ng` recovery of a dead
host, another host's takeover) loses its access, and its relay, refused on
reconnecting, ends.
"""

import errno
import json
import os
import re

from plugins import records, smapi, state, uri as urimod
from plugins.datapath import devices
from plugins.records import RO, RW

NBD_USER = "nbd-node"         # devices.py user: independent of the NVMe/TCP target's
# A client identity: the CN of its certificate, a host name.  No ':' (never a
# host NQN, which shares the claim records), no '/', no leading '.' or '-'.
_IDENTITY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def check_identity(client):
    if not isinstance(client, str) or not _IDENTITY.match(client):
        raise smapi.InvalidParameters("invalid NBD client identity %r (a certificate CN: "
                                      "letters, digits, '.', '_', '-')" % (client,))
    return client


def _check(sr_uuid, key, client, mode=RW):
    try:
        export = urimod.nbd_tls_export(sr_uuid, key)
    except urimod.BadUri as e:
        raise smapi.InvalidParameters(str(e))
    check_identity(client)
    if mode not in (RO, RW):
        raise smapi.InvalidParameters("mode must be ro or rw")
    return export, urimod.subnqn_for(sr_uuid, key)


def _lock(export):
    return state.locked("nbd:" + export, state.node_state_dir())


def clients(sr_uuid, key):
    """{client identity: mode} granted the volume on this node."""
    with _lock(urimod.nbd_tls_export(sr_uuid, key)) as st:
        return dict(st.shared.get("clients") or {})


# -- grant files ------------------------------------------------------------------

def grants_dir():
    return os.path.join(state.node_state_dir(), "nbd-grants")


def _grant_path(client, export):
    import hashlib   # here: it loads OpenSSL, which most calls never need
    h = hashlib.sha256(export.encode("utf-8")).hexdigest()[:32]
    return os.path.join(grants_dir(), client, h + ".json")


def _write_grant(client, rec):
    path = _grant_path(client, rec["export"])
    d = os.path.dirname(path)
    try:
        os.makedirs(d, 0o700)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(rec, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _remove_grant(client, export):
    try:
        os.unlink(_grant_path(client, export))
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise


def _read(path):
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, IOError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def lookup(identity, name):
    """What the NBD server serves `identity` under export `name`:
    {"path", "readonly", "description"}, or None (not granted, or either name
    is not one we make).  Reads one small file: no lock, no scan."""
    if not isinstance(identity, str) or not _IDENTITY.match(identity):
        return None
    try:
        urimod.split_nbd_tls_export(name)
    except urimod.BadUri:
        return None
    rec = _read(_grant_path(identity, name))
    if rec is None or rec.get("client") != identity or rec.get("export") != name:
        return None
    return {"path": rec["device"], "readonly": bool(rec.get("readonly", True)),
            "description": "zfs-ng %s" % name}


def names(identity):
    """The exports granted to `identity` (NBD_OPT_LIST)."""
    if not isinstance(identity, str) or not _IDENTITY.match(identity):
        return []
    d = os.path.join(grants_dir(), identity)
    try:
        files = sorted(os.listdir(d))
    except OSError:
        return []
    out = []
    for f in files:
        if f.endswith(".json"):
            rec = _read(os.path.join(d, f))
            if rec and rec.get("client") == identity and isinstance(rec.get("export"), str):
                out.append(rec["export"])
    return sorted(out)


# -- the ops ------------------------------------------------------------------------

def nbd_grant(sr_uuid, key, client, mode=RW):
    export, _ = _check(sr_uuid, key, client, mode)
    with _lock(export) as st:
        sh = st.shared
        if not sh.get("pool"):
            from plugins.volume import sr    # only here: most ops read no pool
            sh["pool"] = sr.attached_pool(sr_uuid)
        pool = sh["pool"]
        clients = sh.setdefault("clients", {})
        loc = devices.acquire(pool, key, NBD_USER, link=False)   # for the NBD server
        readonly = bool(loc["readonly"]) or mode == RO
        try:
            _write_grant(client, {"client": client, "export": export, "device": loc["device"],
                                  "readonly": readonly})
        except (OSError, IOError) as e:
            if not clients:
                devices.release(pool, key, NBD_USER)
                sh.clear()
            raise smapi.BackendError("NBD_grant_failed", "cannot record the grant of %s to "
                                     "%s: %s" % (export, client, e))
        clients[client] = RO if readonly else RW
    return {"export": export, "readonly": readonly, "size": loc["size"]}


def nbd_claim(sr_uuid, key, client, mode):
    export, subnqn = _check(sr_uuid, key, client, mode)
    with _lock(export) as st:          # always nbd lock, then the volume's record
        granted = st.shared.get("clients", {}).get(client)
        if granted is None:
            raise smapi.BackendError("Not_attached", "%s is not granted %s" % (client, export))
        if mode == RW and granted == RO:
            raise smapi.BackendError("Volume_read_only", "%s is granted %s read-only"
                                     % (client, export))
        with records.volume_lock(subnqn) as vol:
            records.claim_in(vol, client, mode)
    return None


def nbd_unclaim(sr_uuid, key, client):
    export, subnqn = _check(sr_uuid, key, client)
    with _lock(export):
        with records.volume_lock(subnqn) as vol:
            vol.active.pop(client, None)
    return None


def nbd_revoke(sr_uuid, key, client):
    """Never fails (but for invalid names): logs what it could not undo."""
    export, subnqn = _check(sr_uuid, key, client)
    with _lock(export) as st:
        try:
            with records.volume_lock(subnqn) as vol:
                vol.active.pop(client, None)
        except Exception as e:
            smapi.log.error("nbd_revoke %s %s: claim: %s", export, client, e)
        try:
            _remove_grant(client, export)
        except OSError as e:
            smapi.log.error("nbd_revoke %s %s: grant file: %s", export, client, e)
            return None
        clients = st.shared.get("clients", {})
        clients.pop(client, None)
        if not clients:
            pool = st.shared.get("pool")
            if pool:
                try:
                    devices.release(pool, key, NBD_USER)
                except Exception as e:
                    smapi.log.error("nbd_revoke %s: device: %s", export, e)
                    return None         # kept: the next revoke releases it
            st.shared.clear()
    return None


OPS = {"nbd_grant": nbd_grant, "nbd_claim": nbd_claim, "nbd_unclaim": nbd_unclaim,
       "nbd_revoke": nbd_revoke}
