"""nbd+tls: a zvol of a storage node, attached on this host with the kernel NBD
client over TCP and TLS client certificates (XCP-ng 8.3's dom0 kernel has no
nvme-tcp, but has nbd).

attach:     the node grants our client identity (the CN of our certificate) the
            volume on its NBD-over-TLS endpoint (node_nbd.nbd_grant, through
            node.call like nvme+tcp); then one kernel NBD device per host and
            volume, shared by its attachments: a relay process opens the
            export over TLS (nbd_relay.py: it reconnects when the node
            restarts, and replays what the node acknowledged since the last
            FLUSH) and `nbd-client -unix` hands the kernel its socket
            (nbd_client.connect).  Returns XenDisk(vbd) + BlockDevice
            /dev/nbdN for blkback.  Snapshots come read-only (the node serves
            them so).
activate:   the node records the activation: read-write on one host excludes
            every other host, nvme+tcp ones included (Activated_on_another_host);
            read-only is shared.
deactivate: the node drops it once no local domain is active any more.
detach:     the last local attachment disconnects the device (the relay ends
            with it) and the node revokes the grant (never fails).
No nbd-client, no nbd module or no credentials: Nbd_client_unavailable (before
anything is asked of the node).

Credentials: the directory $ZFSNG_NBD_CLIENT_DIR (default
/etc/zfs-ng/nbd-client/) holds ca-cert.pem (the CA that signed the node's
certificate), client-cert.pem and client-key.pem (this host's, signed by the
CA the node trusts), as libnbd's tls-certificates and qemu's tls-creds-x509
directories; so `nbdinfo 'nbds://NODE/SR/KEY?tls-certificates=DIR'` works with
it too.  The node's certificate must name the URI's host (DNS or IP SAN).
"""

import os
import subprocess

from plugins import smapi, state, uri
from plugins.datapath import core, nbd_client, nbd_relay, node, node_nbd

DEFAULT_CLIENT_DIR = "/etc/zfs-ng/nbd-client"
CA, CERT, KEY = "ca-cert.pem", "client-cert.pem", "client-key.pem"


def client_dir():
    return os.environ.get("ZFSNG_NBD_CLIENT_DIR") or DEFAULT_CLIENT_DIR


def _unavailable(u, why):
    return smapi.BackendError(
        "Nbd_client_unavailable", "%s: this host cannot attach a volume over NBD with TLS "
        "(%s)" % (u.volume_id, why))


def credentials(u):
    """{ca, cert, key} paths of this host's TLS credentials."""
    d = client_dir()
    out = {"ca": os.path.join(d, CA), "cert": os.path.join(d, CERT), "key": os.path.join(d, KEY)}
    for p in out.values():
        if not os.path.isfile(p):
            raise _unavailable(u, "%s is missing" % p)
    return out


def _subject_cn(cert_path):
    """The CN of a PEM certificate's subject (None when it has none)."""
    try:
        import _ssl
        decoded = _ssl._test_decode_cert(cert_path)
    except Exception:
        decoded = None
    if decoded is not None:
        for rdn in decoded.get("subject", ()):
            for name, value in rdn:
                if name == "commonName":
                    return value
        return None
    # no _test_decode_cert: openssl prints e.g. "subject=O=ZfsNg, CN=h2"
    try:
        p = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "multiline",
                            "-in", cert_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in p.stdout.splitlines():
        k, sep, v = line.strip().partition("=")
        if sep and k.strip() == "commonName":
            return v.strip()
    return None


def identity(u, creds):
    cn = _subject_cn(creds["cert"])
    if cn is None:
        raise _unavailable(u, "%s has no subject CN" % creds["cert"])
    try:
        return node_nbd.check_identity(cn)
    except smapi.SmapiError as e:
        raise _unavailable(u, e.message)


class NbdTlsDatapath(core.Datapath):
    scheme = uri.NBD_TLS

    def _attach(self, u, st, domain, rec):
        sh = st.shared
        if not sh.get("device"):
            creds = credentials(u)
            client = identity(u, creds)
            if nbd_client.find() is None:
                raise _unavailable(u, "nbd-client not found (XCP-ng: the nbd package)")
            sh["client"] = client
            sh["granted"] = True  # recorded first: _release revokes even after a failure
            try:
                got = node.call("nbd_grant", node=u.host, sr_uuid=u.sr, key=u.key,
                                client=client, mode=core.RW)
            except smapi.SmapiError as e:
                if e.name == "Node_unreachable":
                    # a revoke would wait as long again for the same node: an
                    # unknown grant stays there until revoked on the node
                    sh.pop("granted", None)
                raise
            if got.get("export") != uri.nbd_tls_export(u.sr, u.key):
                raise smapi.BackendError("NBD_client_failed", "the node granted %r for %s"
                                         % (got.get("export"), u.volume_id))
            sh["readonly"] = bool(got.get("readonly"))
            # (a unix socket path has at most 107 bytes: the state's id, shortened)
            sock = os.path.join(state.run_dir(), "relay-%s.sock"
                                % os.path.basename(st.path).split(".")[0][:16])
            try:
                sh["relay"] = nbd_relay.start(sock, u.host, u.port, got["export"], creds["cert"],
                                              creds["key"], creds["ca"])["pid"]
                sh["relay_socket"] = sock
            except nbd_relay.RelayFailed as e:
                raise smapi.BackendError("NBD_client_failed", "%s: %s" % (u.volume_id, e))
            try:
                sh["device"] = nbd_client.connect(sock, got["export"], state.run_dir())
            except nbd_client.Unavailable as e:
                raise _unavailable(u, str(e))
            except nbd_client.NbdClientError as e:
                raise smapi.BackendError("NBD_client_failed", "%s: %s" % (u.volume_id, e))
        rec["device"] = sh["device"]
        return [["XenDisk", {"backend_type": "vbd", "params": sh["device"], "extra": {}}],
                ["BlockDevice", {"path": sh["device"]}]]

    def _still_attached(self, u, st, domain, rec):
        dev = st.shared.get("device")
        if not dev or dev != rec.get("device"):
            return False
        if not nbd_relay.alive(st.shared.get("relay"), st.shared.get("relay_socket", "")):
            return False
        try:
            return nbd_client.connected(dev)
        except nbd_client.NbdClientError:
            return False

    def _writable(self, u, st):
        return not st.shared.get("readonly", False)

    def _activate(self, u, st, domain, rec, mode):
        # the local rules passed; now the node's, across hosts
        modes = set(st.active.values()) | {mode}
        node.call("nbd_claim", node=u.host, sr_uuid=u.sr, key=u.key, client=st.shared["client"],
                  mode=core.RW if core.RW in modes else core.RO)

    def _reactivate(self, u, st, domain, rec, mode):
        if not self._still_attached(u, st, domain, rec):
            raise smapi.BackendError("NBD_client_failed", "%s: %s is no longer connected; "
                                     "detach and attach again" % (u.volume_id, rec.get("device")))
        self._activate(u, st, domain, rec, mode)

    def _deactivate(self, u, st, domain, rec):
        if not [d for d in st.active if d != domain]:
            node.call("nbd_unclaim", node=u.host, sr_uuid=u.sr, key=u.key,
                      client=st.shared["client"])

    def _release(self, u, st):
        sh = st.shared
        try:
            if sh.get("device") and not nbd_client.disconnect(sh["device"]):
                smapi.log.error("detach %s: %s is still connected", u.uri, sh["device"])
            if sh.get("relay"):
                nbd_relay.stop(sh["relay"], sh["relay_socket"])
        finally:
            if sh.get("granted"):
                try:
                    node.call("nbd_revoke", node=u.host, sr_uuid=u.sr, key=u.key,
                              client=sh["client"])
                except smapi.SmapiError as e:
                    # the node keeps the grant (and any claim) until revoked
                    # there; detach itself never fails
                    smapi.log.error("detach %s: node revoke failed: %s", u.uri, e.message)
            sh.clear()


def methods():
    return core.methods(NbdTlsDatapath(), "zvols of a storage node over NBD with TLS client "
                        "certificates (kernel NBD client)")
