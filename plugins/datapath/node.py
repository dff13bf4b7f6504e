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

Transport (plugins/nodes.py): in-process when the node is this machine (the
URI's host is one of its addresses), else ZFSNG_NODE_COMMAND (a JSON argv
prefix) or ssh root@HOST; `python3 -m plugins.datapath.node OP` reads one JSON
line of arguments on stdin and prints one JSON line of result or error.
"""

import json
import sys

from plugins import nodes, smapi, state, uri as urimod
from plugins.datapath import devices

NODE_USER = "nvme-target"
RO = "ro"
RW = "rw"


def _pool_of(sr_uuid):
    from plugins.volume import sr as srmod
    for pool in srmod.attached():
        props = srmod.read_root_props(pool) or {}
        if props.get("sr-uuid") == sr_uuid:
            return pool
    raise smapi.SrNotAttached(sr_uuid)


def _auth_required(pool):
    """Does the SR require DH-HMAC-CHAP of nvme+tcp hosts (nvme-auth=required)?"""
    from plugins.volume import sr as srmod
    return (srmod.read_root_props(pool) or {}).get("nvme-auth") == "required"


def _client():
    from nvmeof_target.control import Client
    return Client()


def _target_error(e):
    return smapi.BackendError("NVMe_target_error", str(e))


def _lock(subnqn):
    return state.locked("nvme:" + subnqn, state.node_state_dir())


def served_keys(sr_uuid):
    """Keys of SR sr_uuid that the NVMe/TCP target's registry (persistent,
    unlike /run) will serve again after a reboot: remote hosts reconnect to
    them (ctrl_loss_tmo) and need the device back."""
    from nvmeof_target import registry
    keys = set()
    for nqn in registry.served_nqns():
        try:
            sr, key = urimod.split_subnqn(nqn)
        except urimod.BadUri:
            continue
        if sr == sr_uuid:
            keys.add(key)
    return keys


def grant(subnqn, hostnqn):
    from nvmeof_target.control import ControlError
    sr_uuid, key = urimod.split_subnqn(subnqn)
    urimod.check_nqn(hostnqn)
    with _lock(subnqn) as st:
        pool = st.shared.get("pool") or _pool_of(sr_uuid)
        st.shared["pool"] = pool
        hosts = st.shared.setdefault("hosts", [])
        loc = devices.acquire(pool, key, NODE_USER)
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
    with _lock(subnqn) as st:
        if hostnqn not in st.shared.get("hosts", []):
            raise smapi.BackendError("Not_attached", "%s is not granted %s" % (hostnqn, subnqn))
        claim_in(st, hostnqn, mode)
    return None


def claim_in(st, who, mode):
    """The cross-host rule on a volume's record (under _lock), whoever `who`
    is (a host NQN, an nbd+tls client identity: node_nbd.py): read-write on
    one host excludes every other host."""
    active = st.active
    others = {h: m for h, m in active.items() if h != who}
    if mode == RW and others:
        raise smapi.ActivatedOnAnotherHost(sorted(others)[0])
    rw = [h for h, m in others.items() if m == RW]
    if rw:
        raise smapi.ActivatedOnAnotherHost(rw[0])
    if active.get(who) == RW and mode == RO:
        return  # a host downgrading keeps its claim until unclaim
    active[who] = mode


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
    with _lock(subnqn) as st:
        claim_in(st, LOCAL + nodes.identity(), mode)


def unclaim_local(subnqn):
    with _lock(subnqn) as st:
        st.active.pop(LOCAL + nodes.identity(), None)


def unclaim(subnqn, hostnqn):
    with _lock(subnqn) as st:
        st.active.pop(hostnqn, None)
    return None


def revoke(subnqn, hostnqn):
    """Never fails: what cannot be undone is logged and retried by the next revoke."""
    from nvmeof_target.control import ControlError
    with _lock(subnqn) as st:
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


def _shared_sr_op(name):
    """An op of a shared SR's node (plugins/volume/remote.py: SR and Volume
    calls of the other hosts), imported only when called."""
    def op(**args):
        from plugins.volume import remote
        return getattr(remote, "op_" + name)(**args)
    op.__name__ = name
    return op


OPS = {"grant": grant, "claim": claim, "unclaim": unclaim, "revoke": revoke,
       "volume": _shared_sr_op("volume"), "sr_attach": _shared_sr_op("sr_attach"),
       "sr_detach": _shared_sr_op("sr_detach")}
from plugins.datapath import node_nbd  # noqa: E402 (the nbd+tls ops; imports node lazily)
OPS.update(node_nbd.OPS)


# -- transport (plugins/nodes.py) ------------------------------------------------

def call(op, node=None, **args):
    """Run node op `op` where the node is: in-process when it is this machine
    (node None and no ZFSNG_NODE_COMMAND, or node naming a local address),
    else through nodes.command(node); SMAPI errors cross as such."""
    argv = nodes.command(node)
    if argv is None:
        return OPS[op](**args)
    return nodes.run(argv, op, args)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in OPS:
        sys.stderr.write("usage: python3 -m plugins.datapath.node {%s} < ARGS.json\n"
                         % ",".join(sorted(OPS)))
        return 2
    try:
        args = json.loads(sys.stdin.readline())
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        out = {"result": OPS[argv[0]](**args)}
    except smapi.SmapiError as e:
        out = {"error": [e.name, e.message]}
    except (ValueError, TypeError, urimod.BadUri) as e:
        out = {"error": ["Invalid_parameters", str(e)]}
    except Exception as e:      # the host gets an error, never a traceback
        smapi.log.exception("node op %s failed", argv[0])
        out = {"error": ["Internal_error", "%s: %s" % (type(e).__name__, e)]}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if "result" in out else 1


if __name__ == "__main__":
    sys.exit(main())
