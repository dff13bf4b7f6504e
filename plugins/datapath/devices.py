"""Who uses a zvol's block device on this machine, so that it is deactivated
only when nobody does.

The volume plugin's activate_device/deactivate_device count nobody: one
deactivate removes the device (volmode back to none, or the snapshot's clone
destroyed).  A volume can be used at once by local attachments (raw, NBD) and
by the NVMe/TCP target for remote hosts, so both go through here:
acquire(pool, key, user) activates with the first user, release() deactivates
with the last.  Users are recorded under the device's lock in the node state
directory (the machine that owns the pool).
"""

from plugins import state


def _device_id(pool, key):
    return "device:%s/%s" % (pool, key)


def _lock(pool, key):
    return state.locked(_device_id(pool, key), state.node_state_dir())


def recorded_keys(pool):
    """Keys of POOL that a datapath on this host records: device users (here)
    and attachments (state.py, ids POOL/KEY as uri.VolumeUri.volume_id).
    Read without locks: a snapshot in time, for the crash reset at SR.attach."""
    keys = set()
    for d, prefix in ((state.node_state_dir(), _device_id(pool, "")),
                      (state.state_dir(), "%s/" % pool)):
        for st in state.list_states(d):
            vid = st.get("volume", "")
            if vid.startswith(prefix):
                keys.add(vid[len(prefix):])
    return keys


def acquire(pool, key, user):
    """activate_device, recording user; returns volumes.locate()'s dict."""
    from plugins.volume import volume as volumes
    with _lock(pool, key) as st:
        users = st.shared.setdefault("users", [])
        if user not in users:
            users.append(user)  # before activating: a failed activation is released
        try:
            return volumes.activate_device(pool, key)
        except BaseException:
            if users == [user]:
                st.shared.clear()
            raise


def release(pool, key, user):
    with _lock(pool, key) as st:
        users = st.shared.get("users", [])
        if user in users:
            users.remove(user)
        if not users:
            from plugins.volume import volume as volumes
            volumes.deactivate_device(pool, key)
            st.shared.clear()
