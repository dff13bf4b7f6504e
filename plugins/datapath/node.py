"""The storage node's side of nvme+tcp attachments.

A host that attaches nvme+tcp://NODE:PORT/SUBNQN asks the node to
  grant(subnqn, hostnqn)     serve the volume (activate_device, add the subsystem
                             to the NVMe/TCP target) and allow that host NQN;
                             returns the namespace UUID to look for
  claim(subnqn, hostnqn, mode)  record an activation; read-write on one host
                             excludes every other host: Activated_on_another_host
  unclaim(subnqn, hostnqn)   drop the activation
  revoke(subnqn, hostnqn)    deny the host; with the last host gone, remove the
                             subsystem and deactivate the device (never fails)
The node keeps who is granted/active per volume in its own state directory
(state.node_state_dir), under the volume's lock, so calls from many hosts may
run at once.  The target itself is driven through nvmeof_target.control.

The claims follow records.claim_in, on the volume's one record
(records.volume_lock), shared with nbd+tls (node_nbd.py) and the node's own
local datapaths (claim_local).  OPS holds both transports' ops; call() runs
one where the node is (plugins/nodes.py: in-process when the node is this
machine, else ZFSNG_NODE_COMMAND or ssh running `python3 -m plugins.node_ops
OP`, whose table is these ops and the shared SR's).
"""

from plugins import nodes, records, smapi, uri as urimod
from plugins.datapath import devices, node_nbd
from plugins.records import RO, RW

NODE_USER = "nvme-target"


def _sr():
    # imported when needed: a host that only attaches from afar never reads a pool
    from plugins.volume import sr
    return sr


def _auth_required(pool):
    """Does the SR require DH-HMAC-CHAP of nvme+tcp hosts (nvme-auth=required)?"""
    return (_sr().read_root_props(pool) or {}).get("nvme-auth") == "required"


def _client():
    from nvmeof_target.control import Client
    return Client()


def _target_error(e):
    return smapi.BackendError("NVMe_target_error", str(e))


def grant(subnqn, hostnqn):
    from nvmeof_target.control import ControlError
    sr_uuid, key = urimod.split_subnqn(subnqn)
    urimod.check_nqn(hostnqn)
    with records.volume_lock(subnqn) as st:
        pool = st.shared.get("pool") or _sr().attached_pool(sr_uuid)
        st.shared["pool"] = pool
        hosts = st.shared.setdefault("hosts", [])
        loc = devices.acquire(pool, key, NODE_USER, link=False)   # for the target
        try:
            required = _auth_required(pool)
            with _client() as c:
                try:
                    sub = c.get(subnqn)
                except ControlError:
                    sub = None
                if sub is None:
                    c.add(subnqn, loc["device"], loc["uuid"], readonly=loc["readonly"],
                          allowed_hosts=[hostnqn], require_auth=required)
                else:
                    if hostnqn not in sub.get("allowed_hosts", []):
                        c.allow(subnqn, hostnqn)
                    if required and not sub.get("require_auth"):
                        c.set_auth_required(subnqn, True)
        except ControlError as e:
            if not hosts:
                devices.release(pool, key, NODE_USER)
            raise _target_error(e)
        if hostnqn not in hosts:
            hosts.append(hostnqn)
        return {"uuid": loc["uuid"], "readonly": loc["readonly"], "size": loc["size"]}


def claim(subnqn, hostnqn, mode):
    urimod.split_subnqn(subnqn)
    urimod.check_nqn(hostnqn)
    if mode not in (RO, RW):
        raise smapi.InvalidParameters("mode must be ro or rw")
    with records.volume_lock(subnqn) as st:
        if hostnqn not in st.shared.get("hosts", []):
            raise smapi.BackendError("Not_attached", "%s is not granted %s" % (hostnqn, subnqn))
        records.claim_in(st, hostnqn, mode)
    return None


# This host's own activations through the local datapaths (zfsng-raw, zfsng-nbd)
# count in the same record: on a shared SR the node is one host among those
# that use its volumes, and read-write here excludes every other host too.
LOCAL = "local:"


def claim_local(subnqn, mode):
    """Record this host's local activation of the volume of subnqn (mode ro/rw);
    Activated_on_another_host when another host has it read-write (or, for
    rw, active at all)."""
    urimod.split_subnqn(subnqn)
    if mode not in (RO, RW):
        raise smapi.InvalidParameters("mode must be ro or rw")
    with records.volume_lock(subnqn) as st:
        records.claim_in(st, LOCAL + nodes.identity(), mode)


def unclaim_local(subnqn):
    with records.volume_lock(subnqn) as st:
        st.active.pop(LOCAL + nodes.identity(), None)


def unclaim(subnqn, hostnqn):
    with records.volume_lock(subnqn) as st:
        st.active.pop(hostnqn, None)
    return None


def revoke(subnqn, hostnqn):
    """Never fails: what cannot be undone is logged and retried by the next revoke."""
    from nvmeof_target.control import ControlError
    with records.volume_lock(subnqn) as st:
        st.active.pop(hostnqn, None)
        hosts = st.shared.get("hosts", [])
        try:
            with _client() as c:
                if hosts == [hostnqn] or not hosts:
                    try:
                        c.remove(subnqn)
                    except ControlError as e:
                        if "no subsystem" not in str(e):
                            raise
                else:
                    c.deny(subnqn, hostnqn)
        except ControlError as e:
            smapi.log.error("revoke %s from %s: %s", hostnqn, subnqn, e)
            return None
        if hostnqn in hosts:
            hosts.remove(hostnqn)
        if not hosts:
            pool = st.shared.get("pool")
            if pool:
                try:
                    devices.release(pool, urimod.split_subnqn(subnqn)[1], NODE_USER)
                except smapi.SmapiError as e:
                    smapi.log.error("revoke %s: %s", subnqn, e.message)
                    return None
            st.shared.clear()
    return None


OPS = {"grant": grant, "claim": claim, "unclaim": unclaim, "revoke": revoke}
OPS.update(node_nbd.OPS)


def call(op, node=None, **args):
    """Run node op `op` (one of OPS) where the node is: in-process when it is
    this machine (node None and no ZFSNG_NODE_COMMAND, or node naming a local
    address), else through plugins/nodes.py; SMAPI errors cross as such."""
    return nodes.call(node, op, args, OPS[op])
