"""Who uses a zvol's block device on this machine, so that it is deactivated
only when nobody does.

The volume plugin's activate_device/deactivate_device count nobody: one
deactivate removes the device (volmode back to none, or the snapshot's clone
destroyed).  A volume can be used at once by local attachments (raw, NBD) and
by the NVMe/TCP target for remote hosts, so both go through here:
acquire(pool, key, user) activates with the first user, release() deactivates
with the last.  Users are recorded under the device's lock in the node state
directory (the machine that owns the pool): plugins/records.py, which the
volume plugin reads at SR.attach.
"""

from plugins import records


def _volumes():
    # imported when needed: most datapath calls need no ZFS (see local.py)
    from plugins.volume import volume
    return volume


def acquire(pool, key, user, link=True):
    """activate_device, recording user; returns volumes.locate()'s dict.
    link=False: the device path goes only to our servers (the target, the
    NBD server), which open a zvol's minor before udev links it."""
    with records.device_lock(pool, key) as st:
        users = st.shared.setdefault("users", [])
        if user not in users:
            users.append(user)  # before activating: a failed activation is released
        try:
            return _volumes().activate_device(pool, key, link=link)
        except BaseException:
            if users == [user]:
                st.shared.clear()
            raise


def release(pool, key, user):
    with records.device_lock(pool, key) as st:
        users = st.shared.get("users", [])
        if user in users:
            users.remove(user)
        if not users:
            _volumes().deactivate_device(pool, key)
            st.shared.clear()
