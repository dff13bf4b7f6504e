"""Who uses a volume on this machine: the records both plugins read.

The datapath plugins write them; the volume plugin reads them at SR.attach
to reset only the devices nobody records (sr.reset_stale_devices).  They live
here, below both plugins, so neither plugin reaches into the other.

  device users     per zvol, on the machine that owns the pool, under
                   device_lock(pool, key): {"shared": {"users": [...]}}
                   (plugins/datapath/devices.py: acquire/release)
  attachments      this host's per-volume state (state.state_dir(), ids POOL/KEY
                   as uri.VolumeUri.volume_id; plugins/datapath/core.py)
  the volume's node record   under volume_lock(subnqn) in the node's state
                   directory: {"shared": {"pool", "hosts"}, "active": {who: mode}};
                   who is a host NQN (nvme+tcp), an NBD client identity (nbd+tls)
                   or a local datapath of the node; claim_in() is the cross-host
                   rule all of them follow (plugins/datapath/node.py, node_nbd.py)
  served           subsystems the NVMe/TCP target's registry will serve again
                   after a reboot (nvmeof_target/registry.py)
"""

from plugins import smapi, state, uri

RO = "ro"
RW = "rw"


# -- device users ---------------------------------------------------------------------

def device_lock(pool, key):
    """The lock and record of the users of zvol KEY of POOL (node state dir)."""
    return state.locked(_device_id(pool, key), state.node_state_dir())


def _device_id(pool, key):
    return "device:%s/%s" % (pool, key)


def recorded_keys(pool):
    """Keys of POOL that a datapath on this host records: device users and
    attachments.  Read without locks: a snapshot in time, for the crash reset
    at SR.attach."""
    keys = set()
    for d, prefix in ((state.node_state_dir(), _device_id(pool, "")),
                      (state.state_dir(), "%s/" % pool)):
        for st in state.list_states(d):
            vid = st.get("volume", "")
            if vid.startswith(prefix):
                keys.add(vid[len(prefix):])
    return keys


# -- the volume's node record -----------------------------------------------------------

def volume_lock(subnqn):
    """The lock and record of a volume on its node, whatever the transport."""
    return state.locked("nvme:" + subnqn, state.node_state_dir())


def claim_in(st, who, mode):
    """The cross-host rule on a volume's record (under volume_lock), whoever
    `who` is: read-write on one host excludes every other host."""
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


# -- served by the NVMe/TCP target ------------------------------------------------------

def served_keys(sr_uuid):
    """Keys of SR sr_uuid that the NVMe/TCP target's registry (persistent,
    unlike /run) will serve again after a reboot: remote hosts reconnect to
    them (ctrl_loss_tmo) and need the device back."""
    from nvmeof_target import registry      # sqlite: only at SR.attach
    keys = set()
    for nqn in registry.served_nqns():
        try:
            sr, key = uri.split_subnqn(nqn)
        except uri.BadUri:
            continue
        if sr == sr_uuid:
            keys.add(key)
    return keys
