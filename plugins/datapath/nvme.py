"""nvme+tcp: a zvol of a storage node, attached on this host with the kernel's
NVMe/TCP initiator.

attach:     the node grants our host NQN (and serves the volume if nobody did);
            `nvme connect` (idempotent, one controller per host and volume);
            the namespace is found by the UUID the node announced, never by
            guessing /dev/nvmeXnY.  Returns BlockDevice + XenDisk(vbd).
activate:   the node records the activation: read-write on one host excludes
            every other host (Activated_on_another_host), read-only is shared.
deactivate: the node drops it once no local domain is active any more.
detach:     the last local attachment disconnects the controller and the node
            revokes the host NQN (never fails).

Host NQN: the attach parameter `hostnqn`, else $ZFSNG_HOSTNQN, else
/etc/nvme/hostnqn; recorded at attach and used by every later call.
"""

import os

from plugins import smapi, uri
from plugins.datapath import core, node, nvme_host


def _hostnqn(given=None):
    nqn = given or os.environ.get("ZFSNG_HOSTNQN")
    if not nqn:
        try:
            nqn = nvme_host.default_hostnqn()
        except nvme_host.NvmeError as e:
            raise smapi.BackendError("No_host_nqn", str(e))
    try:
        return uri.check_nqn(nqn)
    except uri.BadUri as e:
        raise smapi.InvalidParameters(str(e))


class NvmeDatapath(core.Datapath):
    scheme = uri.NVME_TCP

    def attach(self, uri, domain, hostnqn=None):
        self._given_hostnqn = hostnqn
        return core.Datapath.attach(self, uri, domain)

    def _attach(self, u, st, domain, rec):
        sh = st.shared
        if not sh.get("ctrl"):
            hostnqn = _hostnqn(getattr(self, "_given_hostnqn", None))
            sh["hostnqn"] = hostnqn
            sh["granted"] = True  # recorded first: _release revokes even after a failure
            got = node.call("grant", node=u.host, subnqn=u.subnqn, hostnqn=hostnqn)
            sh["ns_uuid"] = got["uuid"]
            sh["readonly"] = got["readonly"]
            try:
                sh["ctrl"] = nvme_host.connect(u.host, u.port, u.subnqn, hostnqn)
            except nvme_host.NvmeError as e:
                raise smapi.BackendError("NVMe_connect_failed", str(e))
        try:
            dev = nvme_host.wait_namespace(sh["ns_uuid"], sh["ctrl"])
        except nvme_host.NvmeError as e:
            raise smapi.BackendError("NVMe_namespace_missing", str(e))
        sh["device"] = dev
        rec["device"] = dev
        return [["XenDisk", {"backend_type": "vbd", "params": dev, "extra": {}}],
                ["BlockDevice", {"path": dev}]]

    def _still_attached(self, u, st, domain, rec):
        ctrl = st.shared.get("ctrl")
        return bool(ctrl) and nvme_host.find_namespace(st.shared["ns_uuid"], ctrl) == rec.get(
            "device")

    def _writable(self, u, st):
        return not st.shared.get("readonly", False)

    def _activate(self, u, st, domain, rec, mode):
        # the local rules passed; now the node's, across hosts
        modes = set(st.active.values()) | {mode}
        node.call("claim", node=u.host, subnqn=u.subnqn, hostnqn=st.shared["hostnqn"],
                  mode=core.RW if core.RW in modes else core.RO)

    def _reactivate(self, u, st, domain, rec, mode):
        self._activate(u, st, domain, rec, mode)

    def _deactivate(self, u, st, domain, rec):
        if not [d for d in st.active if d != domain]:
            node.call("unclaim", node=u.host, subnqn=u.subnqn, hostnqn=st.shared["hostnqn"])

    def _release(self, u, st):
        sh = st.shared
        if sh.get("ctrl"):
            if not nvme_host.disconnect(sh["ctrl"]):
                smapi.log.error("detach %s: controller %s still present", u.uri, sh["ctrl"])
        if sh.get("granted"):
            node.call("revoke", node=u.host, subnqn=u.subnqn, hostnqn=sh["hostnqn"])
        sh.clear()


def methods():
    dp = NvmeDatapath()
    return core.methods(dp, "zvols of a storage node over NVMe/TCP (kernel initiator)",
                        extra_params=[smapi.Param("hostnqn", str, "host NQN to connect as "
                                                  "(default: /etc/nvme/hostnqn)", optional=True)])
