#!/usr/bin/env python3
"""SR.ls at scale: N volumes+snapshots on a file-backed SR, SR.ls timed cold
(index rebuilt from the pool) and warm (index fresh), next to the raw zfs
listings it is built from.  Run in the test VM (needs ZFS and pyzfs):

    python3 tests/vm/vm.py run -- python3 bench/volume_ls.py -n 2000

Volumes are made fast: --zvols zvols with lzc_create, and the rest as
snapshots in atomic lzc_snapshot batches (one snapshot of every zvol per
txg), each with
its org.zfs-ng:name property, so the SR looks like one made by the plugin.
Prints figures; asserts nothing about time.

Measured in the TCG guest (2 vCPU, host load ~12 from other VMs, 2026-12-01),
N=2000 (200 zvols, 1800 snapshots): zfs list fast path 13.5 s, reconcile's
zfs get -r 59 s, SR.ls cold 74 s, warm 6-8 s (of which 2.3 s is the fixed
interpreter start of any call), Volume.create 6.1 s, SR.ls after it 4.7 s.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PLUGIN = os.path.join(ROOT, "plugins", "volume", "org.xen.xapi.storage.zfs-ng")


def script(method, env=None, **params):
    params["dbg"] = "bench"
    t = time.time()
    p = subprocess.run([os.path.join(PLUGIN, method), "--json"], input=json.dumps(params),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       env=env)
    if p.returncode != 0:
        sys.exit("%s failed: %s %s" % (method, p.stdout, p.stderr))
    return json.loads(p.stdout), time.time() - t


def timed(argv):
    t = time.time()
    out = subprocess.run(argv, stdout=subprocess.PIPE, check=True).stdout
    return time.time() - t, out.count(b"\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=10000, help="volumes + snapshots (default 10000)")
    ap.add_argument("--zvols", type=int, default=500, help="how many of them are zvols")
    ap.add_argument("--keep", action="store_true", help="keep the pool")
    args = ap.parse_args()
    import libzfs_core as lzc
    from plugins import zfs
    from plugins.volume import names

    state = tempfile.mkdtemp(prefix="zfsng-bench-")
    env = dict(os.environ, ZFSNG_STATE_DIR=state)
    vdev = os.path.join(state, "vdev")
    with open(vdev, "wb") as f:
        f.truncate(4 << 30)
    conf, _ = script("SR.create", env, uuid=str(uuid.uuid4()), configuration={"device": vdev},
                     name="bench", description="")
    pool, _ = script("SR.attach", env, configuration=conf)
    try:
        zvols = min(args.zvols, args.n)
        t = time.time()
        keys = []
        for i in range(zvols):
            k = names.new_key()
            ds = names.volume_dataset(pool, k).encode()
            lzc.lzc_create(ds, ds_type="zvol", props={
                b"volsize": 1 << 20, b"volblocksize": 16384,
                zfs.uprop("name").encode(): zfs.encode("bench %d" % i).encode()})
            keys.append(ds)
        t_zvols = time.time() - t
        t = time.time()
        left = args.n - zvols
        while left > 0:
            # one atomic batch (one txg) takes one snapshot of each zvol
            batch = min(left, len(keys))
            snaps = [ds + b"@" + names.new_key().encode() for ds in keys[:batch]]
            lzc.lzc_snapshot(snaps, {zfs.uprop("name").encode(): b'"bench snap"'})
            left -= batch
        t_snaps = time.time() - t
        # the pool changed behind the plugin's back: its generation tells it
        zfs.zfs("set", "%s=%d" % (zfs.uprop("generation"), 10 ** 6), names.sr_root(pool))
        root = names.sr_root(pool)
        t_list, n_list = timed(["zfs", "list", "-H", "-p", "-o", "name,guid,createtxg",
                                "-t", "volume,snapshot", "-r", root])
        t_get, n_get = timed(["zfs", "get", "-H", "-p", "-r", "-t", "volume,snapshot",
                              "-o", "name,property,value,source",
                              "volsize,referenced,origin,createtxg,volblocksize,"
                              "org.zfs-ng:name,org.zfs-ng:description,org.zfs-ng:keys,"
                              "org.zfs-ng:sharable", root])
        t_all, n_all = timed(["zfs", "get", "-H", "-p", "-r", "-s", "local",
                              "-o", "name,property,value", "all", root])
        vols, t_cold = script("SR.ls", env, sr=pool)
        assert len(vols) == args.n, (len(vols), args.n)
        _, t_warm = script("SR.ls", env, sr=pool)
        _, t_warm2 = script("SR.ls", env, sr=pool)
        _, t_query = script("Plugin.Query", env)
        _, t_create = script("Volume.create", env, sr=pool, name="x", description="",
                             size=1 << 20, sharable=False)
        _, t_after = script("SR.ls", env, sr=pool)
        print("N=%d (%d zvols, %d snapshots)" % (args.n, zvols, args.n - zvols))
        print("  make: lzc_create %.1f s, lzc_snapshot batches %.1f s" % (t_zvols, t_snaps))
        print("  zfs list -o name,guid,createtxg -r (fast path): %.2f s, %d rows"
              % (t_list, n_list))
        print("  zfs get -r 9 properties (reconcile's read):   %.2f s, %d rows" % (t_get, n_get))
        print("  zfs get -r -s local all:                       %.2f s, %d rows" % (t_all, n_all))
        print("  SR.ls cold (index rebuilt): %.2f s" % t_cold)
        print("  SR.ls warm: %.2f s, %.2f s   (Plugin.Query, the fixed cost: %.2f s)"
              % (t_warm, t_warm2, t_query))
        print("  Volume.create %.2f s, then SR.ls %.2f s (still warm)" % (t_create, t_after))
    finally:
        if not args.keep:
            subprocess.run(["zpool", "destroy", "-f", pool])
            subprocess.run(["rm", "-rf", state])


if __name__ == "__main__":
    main()
