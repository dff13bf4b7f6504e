"""The volume plugin on real ZFS, every Volume method through its executable
as xapi-storage-script runs it, checked against the contract and the ZFS state
behind it."""

import subprocess
import uuid

import pytest

from conftest import run
from volume_calls import call, check_volume, fails, zfs_names, zget

MiB = 1 << 20


def by_key(vols):
    return {v["key"]: v for v in vols}


def test_volume_lifecycle(sr):
    pool = sr
    root = pool + "/zfs-ng"
    weird = "disk 'one' / \"two\" \u00e9\u00e8 \t\n end"
    v = check_volume(call("Volume.create", sr=pool, name=weird, description="d\u00e9",
                          size=10 * MiB + 1, sharable=False))
    key = v["key"]
    ds = "%s/%s" % (root, key)
    assert v["name"] == weird and v["description"] == "d\u00e9"
    assert v["read_write"] is True
    assert v["virtual_size"] == 10 * MiB + 16384  # rounded up to volblocksize
    assert int(zget(ds, "volsize")) == v["virtual_size"]
    assert zget(ds, "refreservation") == "0"  # sparse
    assert zget(ds, "volmode") == "none"  # idle: no minor
    assert v["uri"] == ["zfsng-raw://%s/%s" % (pool, key), "zfsng-nbd://%s/%s" % (pool, key)]

    # size 0 rounds up to one block; negative size is an error
    z = call("Volume.create", sr=pool, name="z", description="", size=0, sharable=True)
    assert z["virtual_size"] == 16384 and z["sharable"] is True
    e = fails("Volume.create", sr=pool, name="n", description="", size=-1, sharable=False)
    assert e["params"][0] == "Invalid_parameters"

    # write data so snapshots and clones can be told apart
    call("SR.stat", sr=pool)
    run("zfs", "set", "volmode=dev", ds)
    run("udevadm", "settle")
    dev = "/dev/zvol/" + ds
    run("dd", "if=/dev/urandom", "of=/tmp/a", "bs=1M", "count=2")
    run("dd", "if=/tmp/a", "of=" + dev, "bs=1M", "oflag=direct", "conv=fsync")

    # keys, names
    call("Volume.set", sr=pool, key=key, k="vdi-type", v="user")
    call("Volume.set", sr=pool, key=key, k="q\"uote", v="\u2603")
    call("Volume.unset", sr=pool, key=key, k="vdi-type")
    call("Volume.set_name", sr=pool, key=key, new_name="renamed")
    call("Volume.set_description", sr=pool, key=key, new_description="desc2")
    st = check_volume(call("Volume.stat", sr=pool, key=key))
    assert st["keys"] == {"q\"uote": "\u2603"}
    assert st["name"] == "renamed" and st["description"] == "desc2"
    assert st["physical_utilisation"] >= 2 * MiB

    # snapshot: read-only, copies name/description, not keys
    s = check_volume(call("Volume.snapshot", sr=pool, key=key))
    assert s["read_write"] is False and s["name"] == "renamed" and s["keys"] == {}
    assert "%s@%s" % (ds, s["key"]) in zfs_names(pool, "snapshot")
    call("Volume.set", sr=pool, key=s["key"], k="snapshot_of", v=key)

    # change the live volume after the snapshot
    run("dd", "if=/dev/zero", "of=" + dev, "bs=1M", "count=2", "oflag=direct", "conv=fsync")

    # snapshot of a snapshot = the snapshot's data, not the volume's
    ss = check_volume(call("Volume.snapshot", sr=pool, key=s["key"]))
    assert ss["read_write"] is False
    # clone of the snapshot-of-snapshot and of the live volume
    c1 = check_volume(call("Volume.clone", sr=pool, key=ss["key"]))
    c2 = check_volume(call("Volume.clone", sr=pool, key=key))
    assert c1["read_write"] and c2["read_write"]
    for c, expect in ((c1, "/tmp/a"), (c2, None)):
        cds = "%s/%s" % (root, c["key"])
        run("zfs", "set", "volmode=dev", cds)
        run("udevadm", "settle")
        out = subprocess.run(["cmp", "-n", str(2 * MiB), "/dev/zvol/" + cds,
                              expect or "/dev/zero"], stdout=subprocess.PIPE)
        assert out.returncode == 0, (c, expect)
        run("zfs", "inherit", "volmode", cds)

    # resize: grow ok, shrink refused, snapshot refused
    call("Volume.resize", sr=pool, key=key, new_size=20 * MiB)
    assert int(zget(ds, "volsize")) == 20 * MiB
    e = fails("Volume.resize", sr=pool, key=key, new_size=MiB)
    assert e["params"][0] == "Shrink_refused"
    assert int(zget(ds, "volsize")) == 20 * MiB
    fails("Volume.resize", sr=pool, key=s["key"], new_size=40 * MiB)

    # revert to the snapshot: data back, keys/name kept, other snapshots kept
    run("zfs", "inherit", "volmode", ds)
    call("Volume.revert", sr=pool, snapshot=s["key"], key=key)
    r = call("Volume.stat", sr=pool, key=key)
    assert r["name"] == "renamed" and r["keys"] == {"q\"uote": "\u2603"}
    assert r["virtual_size"] == 10 * MiB + 16384
    run("zfs", "set", "volmode=dev", ds)
    run("udevadm", "settle")
    assert subprocess.run(["cmp", "-n", str(2 * MiB), dev, "/tmp/a"]).returncode == 0
    run("zfs", "inherit", "volmode", ds)

    # compare reads both devices (activating idle ones for the time of the call)
    assert call("Volume.compare", sr=pool, key=key, key2=c2["key"]) == {
        "blocksize": 65536, "ranges": [[0, 2 * MiB]]}
    assert call("Volume.compare", sr=pool, key=key, key2=s["key"])["ranges"] == []
    assert zget(ds, "volmode") == "none"
    assert "%s/ro-%s" % (root, s["key"]) not in zfs_names(pool, "volume")

    vols = by_key(call("SR.ls", sr=pool))
    assert set(vols) == {key, z["key"], s["key"], ss["key"], c1["key"], c2["key"]}
    for x in vols.values():
        check_volume(x)
    assert vols[s["key"]]["keys"] == {"snapshot_of": key}

    sim = call("Volume.similar_content", sr=pool, key=key)
    assert s["key"] in sim and c2["key"] in sim and key not in sim

    # destroy everything in an order that exercises hidden datasets
    call("Volume.destroy", sr=pool, key=key)         # has snapshot s -> hidden
    call("Volume.destroy", sr=pool, key=s["key"])    # has clone chain via ss -> deferred
    call("Volume.destroy", sr=pool, key=ss["key"])   # has clone c1 -> deferred
    e = fails("Volume.stat", sr=pool, key=key)
    assert e["params"] == ["Volume_does_not_exist", key]
    assert set(by_key(call("SR.ls", sr=pool))) == {z["key"], c1["key"], c2["key"]}
    call("Volume.destroy", sr=pool, key=c1["key"])
    call("Volume.destroy", sr=pool, key=c2["key"])
    call("Volume.destroy", sr=pool, key=z["key"])
    assert call("SR.ls", sr=pool) == []
    # nothing leaked: no hidden dataset or snapshot is left behind
    assert zfs_names(pool) == set()
    call("Volume.destroy", sr=pool, key=key)   # a repeated destroy succeeds (idempotent)
    e = fails("Volume.stat", sr=pool, key=key)
    assert e["params"] == ["Volume_does_not_exist", key]


@pytest.mark.parametrize("params,err", [
    ({"sr": "nosuchpool", "key": "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d"}, "Sr_not_attached"),
    ({"sr": "bad/sr", "key": "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d"}, "SR_does_not_exist"),
])
def test_unknown_sr(params, err):
    assert fails("Volume.stat", **params)["params"][0] == err


def test_bad_keys_and_names(sr):
    pool = sr
    for key in ("../x", "a b", "x'y", "", "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d@s",
                "\u00e9", pool + "/zfs-ng"):
        e = fails("Volume.stat", sr=pool, key=key)
        assert e["params"][0] == "Invalid_parameters", (key, e)
    e = fails("Volume.destroy", sr=pool, key=str(uuid.uuid4()))
    assert e["params"][0] == "Volume_does_not_exist"
    e = fails("Volume.create", sr=pool, name="x" * 5000, description="", size=1,
              sharable=False)
    assert e["params"][0] == "Invalid_parameters"
    e = fails("Volume.create", sr=pool, name="n", description="", size="1", sharable=False)
    assert e["params"][0] == "Invalid_parameters"
    e = fails("Volume.create", sr=pool, name="n", size=1, sharable=False)
    assert "description" in e["params"][1]
    assert zfs_names(pool) == set()


def test_destroy_is_idempotent_and_takes_a_clone_on_boot_transient(sr):
    """xapi-storage-script's VDI.destroy (main.ml, vdi_destroy_impl) calls
    Volume.destroy on the original twice when the VDI still carries the
    clone-on-boot key (a reset-on-boot VM whose epoch_end never ran), and never
    on the transient it made in vdi_epoch_begin_impl (Volume.clone + Volume.set
    clone-on-boot).  Both calls must succeed and the transient must go too, or
    it shows up as a new VDI at the next SR.scan."""
    pool = sr
    v = call("Volume.create", sr=pool, name="reset-on-boot", description="", size=16 * MiB,
             sharable=False)
    t = call("Volume.clone", sr=pool, key=v["key"])                      # epoch_begin
    call("Volume.set", sr=pool, key=v["key"], k="clone-on-boot", v=t["key"])
    other = call("Volume.create", sr=pool, name="bystander", description="", size=MiB,
                 sharable=False)
    call("Volume.destroy", sr=pool, key=v["key"])                          # vdi_destroy_impl
    call("Volume.destroy", sr=pool, key=v["key"])                          # ... twice
    assert [x["key"] for x in call("SR.ls", sr=pool)] == [other["key"]]
    assert not [n for n in zfs_names(pool) if v["key"] in n or t["key"] in n]
    call("Volume.destroy", sr=pool, key=t["key"])    # the transient's key: destroyed already
    # a key never seen is still an error
    e = fails("Volume.destroy", sr=pool, key=str(uuid.uuid4()))
    assert e["params"][0] == "Volume_does_not_exist"

    # a clone-on-boot key naming a volume that is not this one's clone is left alone
    a = call("Volume.create", sr=pool, name="a", description="", size=MiB, sharable=False)
    call("Volume.set", sr=pool, key=a["key"], k="clone-on-boot", v=other["key"])
    call("Volume.destroy", sr=pool, key=a["key"])
    assert [x["key"] for x in call("SR.ls", sr=pool)] == [other["key"]]


def _zfs_destroys(ds):
    """PIDs of running `zfs destroy ... ds` processes."""
    import os
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if len(argv) > 2 and argv[0].endswith(b"zfs") and argv[1] == b"destroy" \
                and ds.encode() in argv:
            out.append(pid)
    return out


def test_destroy_waits_out_a_moments_hold_on_the_device(sr):
    """A deactivated volume's device node may still be open for a moment: udev
    probes a node after each event (an add, a close after writing), and ZFS
    keeps an open zvol's minor when volmode goes back to none.  xapi's
    VDI.destroy right after the detach (main.ml vdi_destroy_impl) must not fail
    on that: Volume.destroy waits a few seconds for the holder to let go.
    Here the holder is our own fd, closed once a first `zfs destroy` of the
    volume has run (and failed: busy) while it was open."""
    import os
    import threading
    import time
    from plugins.volume import volume
    pool = sr
    v = call("Volume.create", sr=pool, name="held", description="", size=MiB, sharable=False)
    ds = "%s/zfs-ng/%s" % (pool, v["key"])
    dev = volume.activate_device(pool, v["key"])["device"]
    fd = os.open(dev, os.O_RDONLY)
    seen = []

    def hold():
        deadline = time.time() + 60
        while not seen and time.time() < deadline:
            seen.extend(_zfs_destroys(ds))
            time.sleep(0.002)
        while _zfs_destroys(ds) and time.time() < deadline:   # that attempt ends
            time.sleep(0.002)
        os.close(fd)

    holder = threading.Thread(target=hold)
    volume.deactivate_device(pool, v["key"])
    assert os.path.exists(dev), "the minor went while open: nothing held it"
    holder.start()
    try:
        call("Volume.destroy", sr=pool, key=v["key"])
    finally:
        holder.join()
    assert seen, "no zfs destroy was seen while the device was held"
    assert not [n for n in zfs_names(pool) if v["key"] in n]
    assert call("SR.ls", sr=pool) == []
