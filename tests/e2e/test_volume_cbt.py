"""VDI_CONFIG_CBT through the volume plugin's executables, as xapi-storage-script
calls them, on real ZFS: enable/disable (idempotent, refused on snapshots),
cbt_enabled on volumes and snapshots, list_changed_blocks bit for bit against
the writes made through the zvol and against the snapshots' contents,
data_destroy + Volume.set(vdi-type=cbt_metadata) keeping the volume listed
and usable as a base, across zpool export/import, then Volume.destroy."""

import base64
import hashlib
import json
import os
import random
import subprocess
import uuid

import pytest

from conftest import run
from volume_calls import PLUGIN_DIR, call, fails
from plugins import smapi
from plugins.volume import volume as volumes

K = 1024
K64 = 64 * K
MiB = 1 << 20
SIZE = 40 * MiB + K64          # 641 bits: 81 bytes, padded to 84


def call_env(env, method, **params):
    params.setdefault("dbg", "test")
    p = subprocess.run([os.path.join(PLUGIN_DIR, method), "--json"],
                       input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=env)
    assert p.returncode == 0, (method, p.stdout, p.stderr)
    return json.loads(p.stdout)


def blocks_of(extents):
    return set(b for o, n in extents for b in range(o // K64, -(-(o + n) // K64)))


def changed(pool, a, b, offset=0, length=-1, env=None):
    """Set bits of list_changed_blocks, its shape checked."""
    args = dict(sr=pool, key=a, key2=b, offset=offset, length=length)
    r = call_env(env, "Volume.list_changed_blocks", **args) if env else \
        call("Volume.list_changed_blocks", **args)
    assert set(r) == {"granularity", "bitmap"} and r["granularity"] == 65536
    raw = base64.b64decode(r["bitmap"])
    end = SIZE if length < 0 else min(SIZE, offset + length)
    nbits = -(-(end - offset) // K64)
    assert len(raw) % 4 == 0 and len(raw) == -(-(-(-nbits // 8)) // 4) * 4
    return set(i * 8 + k for i, byte in enumerate(bytearray(raw))
               for k in range(8) if byte & (0x80 >> k))


def block_hashes(pool, key):
    loc = volumes.activate_device(pool, key)
    try:
        with open(loc["device"], "rb") as f:
            return [hashlib.sha1(f.read(K64)).digest() for _ in range(-(-SIZE // K64))]
    finally:
        volumes.deactivate_device(pool, key)


def zfs_list(t, root):
    return set(run("zfs", "list", "-H", "-o", "name", "-t", t, "-r", root).stdout.split())


def by_key(vols):
    return dict((v["key"], v) for v in vols)


def test_cbt_through_the_plugin(sr, sr_vdev):
    pool, devs = sr, [sr_vdev]
    root = pool + "/zfs-ng"
    assert "VDI_CONFIG_CBT" in call("Plugin.Query")["features"]
    v = call("Volume.create", sr=pool, name="disk", description="d", size=SIZE, sharable=False)
    key, ds = v["key"], "%s/%s" % (root, v["key"])
    assert v["cbt_enabled"] is False and v["virtual_size"] == SIZE
    call("Volume.enable_cbt", sr=pool, key=key)
    call("Volume.enable_cbt", sr=pool, key=key)                     # idempotent
    assert by_key(call("SR.ls", sr=pool))[key]["cbt_enabled"] is True

    rnd = random.Random(7)
    dev = os.open(volumes.activate_device(pool, key)["device"], os.O_RDWR)

    def write(off, data):
        assert os.pwrite(dev, data, off) == len(data)

    def discard(off, n):
        os.fsync(dev)
        run("blkdiscard", "-o", str(off), "-l", str(n), "/dev/zvol/" + ds)

    for off, n in [(0, MiB), (4 * MiB, K64), (10 * MiB, K64), (16 * MiB - 16 * K, 32 * K)]:
        write(off, rnd.randbytes(n))
    os.fsync(dev)
    s1 = call("Volume.snapshot", sr=pool, key=key)
    assert s1["read_write"] is False and s1["cbt_enabled"] is True
    e = fails("Volume.enable_cbt", sr=pool, key=s1["key"])
    assert e["params"][0] == "Volume_is_a_snapshot"

    want = set()
    for off, n, data, is_change in [
            (20 * MiB + 8 * K, 100 * K, True, True),    # new data crossing 64K boundaries
            (512 * K - 4 * K, 8 * K, True, True),       # overwrite across a 64K boundary
            (100 * K, 4 * K, False, True),              # zeros inside data
            (4 * MiB, K64, False, True),                # a whole block of zeros over data
            (30 * MiB, K64, False, False),              # zeros over never-written space
            (SIZE - 4 * K, 4 * K, True, True)]:         # the last block
        write(off, rnd.randbytes(n) if data else bytes(n))
        if is_change:
            want |= blocks_of([(off, n)])
    discard(10 * MiB + 16 * K, 32 * K)                  # over data: changed
    want |= blocks_of([(10 * MiB + 16 * K, 32 * K)])
    discard(36 * MiB, MiB)                              # never written: unchanged
    os.fsync(dev)
    s2 = call("Volume.snapshot", sr=pool, key=key)
    assert s2["cbt_enabled"] is True

    got = changed(pool, s1["key"], s2["key"])
    assert got == want, (sorted(got - want), sorted(want - got))
    h1, h2 = block_hashes(pool, s1["key"]), block_hashes(pool, s2["key"])
    assert set(i for i in range(len(h1)) if h1[i] != h2[i]) == want
    win = changed(pool, s1["key"], s2["key"], 16 * MiB, 8 * MiB)
    assert win == set(b - 256 for b in want if 256 <= b < 384)
    # to the live volume (a temporary snapshot)
    write(33 * MiB, rnd.randbytes(K64))
    os.fsync(dev)
    assert changed(pool, s2["key"], key) == {33 * 16}
    os.close(dev)
    volumes.deactivate_device(pool, key)

    # --- data_destroy of the base, then what xapi does: vdi-type=cbt_metadata
    base = s1["key"]
    call("Volume.data_destroy", sr=pool, key=base)
    call("Volume.data_destroy", sr=pool, key=base)                  # idempotent
    call("Volume.set", sr=pool, key=base, k="vdi-type", v="cbt_metadata")
    assert "%s@%s" % (ds, base) not in zfs_list("snapshot", root)
    assert "%s#%s" % (ds, base) in zfs_list("bookmark", root)
    listed = by_key(call("SR.ls", sr=pool))[base]
    assert listed["read_write"] is False and listed["physical_utilisation"] == 0
    assert listed["cbt_enabled"] is True and listed["virtual_size"] == SIZE
    assert listed["keys"] == {"vdi-type": "cbt_metadata"} and listed["name"] == "disk"
    assert call("Volume.stat", sr=pool, key=base) == listed
    assert changed(pool, base, s2["key"]) == want
    assert fails("Volume.snapshot", sr=pool, key=base)["params"][0] == "Volume_data_destroyed"
    with pytest.raises(smapi.BackendError) as ei:
        volumes.activate_device(pool, base)
    assert ei.value.name == "Volume_data_destroyed"

    # --- another host: zpool export, import with a fresh index and no cache
    before = call("SR.ls", sr=pool)
    call("SR.detach", sr=pool)
    env = dict(os.environ, ZFSNG_STATE_DIR=os.path.join(os.path.dirname(devs[0]),
                                                        "other-" + uuid.uuid4().hex[:6]))
    call_env(env, "SR.attach", configuration={"pool": pool, "device": devs[0]})
    after = call_env(env, "SR.ls", sr=pool)
    strip = lambda vs: sorted((dict(x, physical_utilisation=0) for x in vs),  # noqa: E731
                              key=lambda x: x["key"])
    assert strip(after) == strip(before)
    assert changed(pool, base, s2["key"], env=env) == want

    # --- disable: the volume stops tracking, its snapshot can be untracked too
    call_env(env, "Volume.disable_cbt", sr=pool, key=key)
    call_env(env, "Volume.disable_cbt", sr=pool, key=key)          # idempotent
    call_env(env, "Volume.disable_cbt", sr=pool, key=s2["key"])
    # --- destroy: the data-destroyed snapshot goes with its metadata
    call_env(env, "Volume.destroy", sr=pool, key=base)
    got = by_key(call_env(env, "SR.ls", sr=pool))
    assert got[key]["cbt_enabled"] is False and got[s2["key"]]["cbt_enabled"] is False
    assert base not in got
    assert "%s#%s" % (ds, base) not in zfs_list("bookmark", root)
    local = run("zfs", "get", "-H", "-s", "local", "-o", "property", "all", ds).stdout
    assert ("bm.%s." % base) not in local

    # a volume whose only remaining snapshot was data-destroyed keeps it listed
    call_env(env, "Volume.data_destroy", sr=pool, key=s2["key"])
    call_env(env, "Volume.destroy", sr=pool, key=key)
    left = by_key(call_env(env, "SR.ls", sr=pool))
    assert list(left) == [s2["key"]] and left[s2["key"]]["virtual_size"] == SIZE
    assert [n for n in zfs_list("bookmark", root) if n.endswith("#" + s2["key"])]
    call_env(env, "Volume.destroy", sr=pool, key=s2["key"])         # and the hidden parent
    assert zfs_list("volume,snapshot,bookmark", root) == set()
