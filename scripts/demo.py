#!/usr/bin/env python3
"""The zfs-ng demo: what xapi does when an admin runs `xe sr-create type=zfs-ng`,
`xe vdi-create`, `xe vdi-snapshot` and `xe vdi-clone`, done by calling the
plugin executables exactly as xapi-storage-script does (argv `--json`, one JSON
line on stdin), then shown with the `zfs-ng` admin CLI and ZFS itself.

Runs as root on a host with ZFS (`./run-demo` picks this host or the test VM).
In the test VM it builds a mirror of two virtio disks; elsewhere it uses two
sparse files under /var/tmp, never a real disk.  Everything it made is
destroyed at the end unless --keep is given.
"""

import json
import os
import subprocess
import sys
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKOUT = os.path.dirname(HERE)
PLUGIN = os.path.join(CHECKOUT, "plugins", "volume", "org.xen.xapi.storage.zfs-ng")
GiB = 1 << 30
LOG = "/tmp/zfs-ng-demo.log"


def call(method, **params):
    """One SMAPIv3 call; prints it the way an admin reads SMlog."""
    params.setdefault("dbg", "demo")
    p = subprocess.run([os.path.join(PLUGIN, method), "--json"],
                       input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    with open(LOG, "a") as f:  # the plugin's own log lines, as SMlog would keep them
        f.write(p.stderr)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    if p.returncode != 0:
        sys.exit("demo: %s failed: %s (plugin log: %s)" % (method, json.dumps(out), LOG))
    return out


def step(text):
    print("\n== " + text, flush=True)


def show(*argv):
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(list(argv), check=False)


def devices():
    if os.environ.get("ZFSNG_IN_VM") == "1":
        return ["/dev/disk/by-id/virtio-zfsng-d0", "/dev/disk/by-id/virtio-zfsng-d1"]
    d = "/var/tmp/zfs-ng-demo"
    os.makedirs(d, exist_ok=True)
    paths = []
    for i in range(2):
        path = os.path.join(d, "disk%d" % i)
        with open(path, "wb") as f:
            f.truncate(2 * GiB)
        paths.append(path)
    return paths


def main():
    keep = "--keep" in sys.argv[1:]
    cli = [sys.executable, "-m", "sr_tools"]
    os.environ["PYTHONPATH"] = CHECKOUT + os.pathsep + os.environ.get("PYTHONPATH", "")

    step("Plugin.Query")
    q = call("Plugin.Query")
    print("%s %s (SMAPIv3 %s): %s" % (q["plugin"], q["version"], q["required_api_version"],
                                      ", ".join(q["features"])))

    step("SR.create: a mirror of two disks, lz4")
    sr_uuid = str(uuid.uuid4())
    config = call("SR.create", uuid=sr_uuid, name="demo SR", description="made by run-demo",
                  configuration={"device": ",".join(devices()), "vdev": "mirror"})
    print(json.dumps(config, sort_keys=True))
    sr = call("SR.attach", configuration=config)
    try:
        st = call("SR.stat", sr=sr)
        print("SR %s: %s, %.1f GiB free of %.1f GiB" % (
            sr, st["health"][0], st["free_space"] / GiB, st["total_space"] / GiB))

        step("Volume.create: a 1 GiB sparse VDI, with data written to it")
        vol = call("Volume.create", sr=sr, name="demo disk", description="a VDI",
                   size=GiB, sharable=False)
        from plugins.volume import volume as volume_mod
        dev = volume_mod.activate_device(sr, vol["key"])["device"]
        pattern = b"zfs-ng demo block\n" * 227 + b"\n" * 10
        with open(dev, "r+b", buffering=0) as f:
            for i in range(64):
                f.seek(i * (1 << 20))
                f.write(pattern)
            os.fsync(f.fileno())

        step("Volume.snapshot + Volume.set (as xapi does for VDI.snapshot)")
        snap = call("Volume.snapshot", sr=sr, key=vol["key"])
        for k, v in (("is_a_snapshot", "true"), ("snapshot_of", vol["key"])):
            call("Volume.set", sr=sr, key=snap["key"], k=k, v=v)

        step("Volume.clone of the live volume, and its data")
        clone = call("Volume.clone", sr=sr, key=vol["key"])
        cdev = volume_mod.activate_device(sr, clone["key"])["device"]
        with open(cdev, "rb") as f:
            f.seek(5 << 20)
            same = f.read(len(pattern)) == pattern
        print("clone %s reads the same data as its source: %s" % (clone["key"], same))

        step("SR.ls, then the admin CLI and ZFS")
        for v in call("SR.ls", sr=sr):
            print("%-38s %-12s rw=%-5s virtual=%d physical=%d uri=%s" % (
                v["key"], v["name"], v["read_write"], v["virtual_size"],
                v["physical_utilisation"], v["uri"][0]))
        show(*(cli + ["sr", "ls"]))
        show(*(cli + ["vol", "ls", sr]))
        show("zfs", "list", "-r", "-t", "all", "-o", "name,volsize,used,refer,compression", sr)
        show("zpool", "status", sr)
    finally:
        if not keep:
            step("cleanup: SR.destroy")
            call("SR.destroy", sr=sr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
