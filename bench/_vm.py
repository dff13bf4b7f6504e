"""What the ZFS benchmarks share in the test VM: commands, a scratch pool on
the VM's virtio disks, sparse zvols.  Benchmarks import it after putting the
checkout on sys.path (`from bench._vm import ...`)."""

import contextlib
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLUME_PLUGIN = os.path.join(ROOT, "plugins", "volume", "org.xen.xapi.storage.zfs-ng")
GiB = 1 << 30
DISKS = ["/dev/disk/by-id/virtio-zfsng-d%d" % i for i in range(4)]


def sh(*argv):
    return subprocess.run(list(argv), check=True, stdout=subprocess.PIPE,
                          universal_newlines=True).stdout


def plugin_call(method, env=None, profile_to=None, **params):
    """(result, seconds) of one volume plugin call, run as xapi runs it
    (`<method> --json` with the parameters on stdin); exits on an error.
    profile_to: run it under cProfile, its statistics written there."""
    params["dbg"] = "bench"
    argv = [os.path.join(VOLUME_PLUGIN, method), "--json"]
    if profile_to:
        argv = [sys.executable, "-m", "cProfile", "-o", profile_to] + argv
    t = time.time()
    p = subprocess.run(argv,
                       input=json.dumps(params).encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env)
    # the call and its output read as bytes (as xapi reads it), not our
    # decoding or parsing of it (46 MB of SR.ls at 100k: seconds in TCG)
    took = time.time() - t
    if p.returncode != 0:
        sys.exit("%s failed: %s %s" % (method, p.stdout[:2000], p.stderr[-2000:]))
    return json.loads(p.stdout.decode("utf-8")), took


def sr_on(env, device):
    """SR.create + SR.attach of a zfs-ng SR on device (a path, or a comma
    list of them): (configuration, pool).  The caller destroys the pool."""
    import uuid
    conf, _ = plugin_call("SR.create", env, uuid=str(uuid.uuid4()),
                          configuration={"device": device}, name="bench", description="")
    pool, _ = plugin_call("SR.attach", env, configuration=conf)
    return conf, pool


def file_sr(state, env, size):
    """sr_on a sparse file of size bytes in state."""
    vdev = os.path.join(state, "vdev")
    with open(vdev, "wb") as f:
        f.truncate(size)
    return sr_on(env, vdev)


def disks_sr(env):
    """sr_on the VM's four blank disks, striped.  For big SRs: a file SR
    lives in the guest's /tmp, which is RAM (100k snapshots starved an 8 GiB
    guest)."""
    return sr_on(env, ",".join(d for d in DISKS if os.path.exists(d)))


def wait(path, timeout=60):
    """A device node, once udev has made it."""
    t = time.time() + timeout
    while not os.path.exists(path):
        if time.time() > t:
            raise SystemExit("%s did not appear" % path)
        subprocess.run(["udevadm", "settle", "--timeout=5"])
        time.sleep(0.2)
    return path


@contextlib.contextmanager
def pool(name, script):
    """A striped lz4 pool (ashift 12) on the first two VM disks, destroyed
    afterwards; refuses to run outside the VM (it takes whole disks)."""
    if os.environ.get("ZFSNG_IN_VM") != "1":
        raise SystemExit("run it in the test VM: python3 tests/vm/vm.py run -- "
                         "python3 bench/%s" % script)
    disks = [d for d in DISKS[:2] if os.path.exists(d)]
    sh("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", name, *disks)
    try:
        yield name
    finally:
        subprocess.run(["zpool", "destroy", "-f", name])


def zvol(pool_name, name, size):
    """A sparse zvol (volblocksize 16K): (dataset, device)."""
    ds = "%s/%s" % (pool_name, name)
    sh("zfs", "create", "-s", "-V", str(size), "-o", "volblocksize=16K", ds)
    return ds, wait("/dev/zvol/" + ds)
