"""SR methods of the volume plugin on real pools: virtio disks (mirror, raidz1,
stripe of mirrors) and file vdevs; real health; probe; detach/attach; bad input
creates nothing; adopting an existing pool."""

import subprocess
import uuid

import pytest

from conftest import VIRTIO_DISKS, run
from volume_calls import call, fails

GiB = 1 << 30


def pools():
    return set(run("zpool", "list", "-H", "-o", "name").stdout.split())


def create_sr(conf, name="sr", description="desc"):
    sr_uuid = str(uuid.uuid4())
    out = call("SR.create", uuid=sr_uuid, configuration=conf, name=name,
               description=description)
    assert all(isinstance(v, str) for v in out.values())
    assert out["sr_uuid"] == sr_uuid and "sr-uuid" not in out
    return sr_uuid, out


def check_stat(st, pool):
    assert set(st) == {"sr", "name", "uuid", "description", "free_space", "total_space",
                       "datasources", "clustered", "health"}
    assert st["sr"] == pool and st["datasources"] == [] and st["clustered"] is False
    assert 0 < st["free_space"] <= st["total_space"]
    assert st["health"][0] in ("Healthy", "Recovering", "Unreachable", "Unavailable")
    return st


@pytest.fixture
def blank_disks():
    """The virtio disks, wiped before and after."""
    def wipe():
        for d in VIRTIO_DISKS:
            subprocess.run(["zpool", "labelclear", "-f", d], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    wipe()
    yield VIRTIO_DISKS
    for p in pools():
        if p.startswith("zfsng-"):
            subprocess.run(["zpool", "destroy", "-f", p])
    wipe()


def test_mirrors_health_probe_detach_attach_destroy(blank_disks):
    d = blank_disks
    sr_uuid, conf = create_sr({"device": ",".join(d), "vdev": "mirror:2",
                               "compression": "zstd", "ashift": "12"})
    pool = conf["pool"]
    # its disks are now in use: another SR cannot take one
    e = fails("SR.create", uuid=str(uuid.uuid4()), configuration={"device": d[1]}, name="x",
              description="")
    assert e["params"][0] == "Device_in_use", e
    status = run("zpool", "status", "-P", pool).stdout
    assert "mirror-0" in status and "mirror-1" in status
    assert all(x.rsplit("/", 1)[1] in status for x in d)
    assert run("zpool", "get", "-H", "-o", "value", "ashift", pool).stdout.strip() == "12"
    assert call("SR.attach", configuration=conf) == pool
    assert call("SR.attach", configuration=conf) == pool  # idempotent
    root = pool + "/zfs-ng"
    assert run("zfs", "get", "-H", "-o", "value", "compression", root).stdout.strip() == "zstd"
    st = check_stat(call("SR.stat", sr=pool), pool)
    assert st["health"] == ["Healthy", ""] and st["uuid"] == sr_uuid
    assert st["name"] == "sr" and st["description"] == "desc"
    call("SR.set_name", sr=pool, new_name="n\u00e9w 'name'")
    call("SR.set_description", sr=pool, new_description="d2")
    st = call("SR.stat", sr=pool)
    assert st["name"] == "n\u00e9w 'name'" and st["description"] == "d2"
    assert pool in call("Plugin.ls")

    # real health: a mirror side offline is DEGRADED: still Healthy to xapi (which
    # fails sr-scan on anything else: main.ml sr_scan2_impl), with the reason
    run("zpool", "offline", pool, d[1])
    h = call("SR.stat", sr=pool)["health"]
    assert h[0] == "Healthy" and "DEGRADED" in h[1], h
    run("zpool", "online", pool, d[1])
    run("zpool", "wait", "-t", "resilver", pool)
    assert call("SR.stat", sr=pool)["health"] == ["Healthy", ""]

    v = call("Volume.create", sr=pool, name="kept", description="", size=GiB, sharable=False)
    probed = call("SR.probe", configuration={"device": d[0]})
    assert [p["configuration"]["sr_uuid"] for p in probed] == [sr_uuid]
    assert probed[0]["complete"] is True and probed[0]["sr"]["uuid"] == sr_uuid

    # detach exports the pool; probe finds it importable without importing it
    call("SR.detach", sr=pool)
    assert pool not in pools()
    call("SR.detach", sr=pool)  # idempotent
    assert fails("SR.stat", sr=pool)["params"][0] == "Sr_not_attached"
    probed = call("SR.probe", configuration={"device": ",".join(d)})
    assert len(probed) == 1 and probed[0]["configuration"]["pool"] == pool
    assert probed[0]["configuration"]["sr_uuid"] == sr_uuid
    assert probed[0]["extra_info"]["imported"] == "false" and "sr" not in probed[0]
    assert pool not in pools()
    assert call("SR.attach", configuration=conf) == pool
    assert [x["key"] for x in call("SR.ls", sr=pool)] == [v["key"]]

    call("SR.destroy", sr=pool)
    assert pool not in pools()
    assert pool not in call("Plugin.ls")
    assert fails("SR.stat", sr=pool)["params"][0] == "Sr_not_attached"


def test_raidz1(blank_disks):
    d = blank_disks
    _, conf = create_sr({"device": ",".join(d[:3]), "vdev": "raidz1", "autotrim": "off"})
    pool = conf["pool"]
    assert "raidz1-0" in run("zpool", "status", pool).stdout
    assert run("zpool", "get", "-H", "-o", "value", "autotrim", pool).stdout.strip() == "off"
    call("SR.attach", configuration=conf)
    check_stat(call("SR.stat", sr=pool), pool)
    call("SR.destroy", sr=pool)
    assert pool not in pools()


def test_create_rejects_bad_input_and_creates_nothing(blank_disks, file_vdevs, zpool):
    d = blank_disks
    before = pools()
    cases = [
        ({"device": "/dev/disk/by-id/nonexistent"}, "Device_not_found"),
        ({"device": d[0], "vdev": "mirror"}, "Invalid_parameters"),
        ({"device": ",".join(d[:2]), "vdev": "raidz9"}, "Invalid_parameters"),
        ({"device": "relative/path"}, "Invalid_parameters"),
        ({"device": d[0] + ",/dev/../etc/passwd"}, "Invalid_parameters"),
        ({"device": d[0], "compression": "gzip"}, "Invalid_parameters"),
        ({"device": d[0], "ashift": "99"}, "Invalid_parameters"),
        ({"device": d[0], "bogus": "1"}, "Invalid_parameters"),
        ({}, "Invalid_parameters"),
        ({"zpool": "nosuchpool"}, "Pool_not_found"),
        ({"zpool": zpool, "device": d[0]}, "Invalid_parameters"),
        ({"file-uri": "http://x/y"}, "Invalid_parameters"),
        ({"device": file_vdevs(1, 32 << 20)[0]}, "Device_too_small"),
    ]
    for conf, err in cases:
        e = fails("SR.create", uuid=str(uuid.uuid4()), configuration=conf, name="x",
                  description="")
        assert e["params"][0] == err, (conf, e)
    # a device that belongs to an imported pool, mid-list: still nothing made
    used = file_vdevs(1, 128 << 20)[0]
    run("zpool", "create", "busy" + uuid.uuid4().hex[:6], used)
    e = fails("SR.create", uuid=str(uuid.uuid4()), configuration={"device": d[2] + "," + used},
              name="x", description="")
    assert e["params"][0] == "Device_in_use", e
    assert {p for p in pools() if not p.startswith("busy")} == before
    for p in pools() - before:
        run("zpool", "destroy", "-f", p)
    assert fails("SR.create", uuid="not-a-uuid", configuration={"device": d[0]}, name="x",
                 description="")["params"][0] == "Invalid_parameters"


def test_adopt_existing_pool(zpool):
    sr_uuid, conf = create_sr({"zpool": zpool}, name="adopted")
    assert conf["pool"] == zpool
    # a retried create is fine, another SR on the same pool is not
    again = call("SR.create", uuid=sr_uuid, configuration={"zpool": zpool}, name="adopted",
                 description="")
    assert again["pool"] == zpool
    e = fails("SR.create", uuid=str(uuid.uuid4()), configuration={"zpool": zpool}, name="x",
              description="")
    assert e["params"][0] == "Pool_in_use"
    assert call("SR.attach", configuration=conf) == zpool
    call("Volume.create", sr=zpool, name="v", description="", size=1 << 20, sharable=False)
    call("SR.detach", sr=zpool)
    assert zpool in pools()  # not ours to export
    call("SR.destroy", sr=zpool)
    assert zpool in pools()  # adopted: only the SR dataset goes
    assert run("zfs", "list", "-H", "-o", "name", "-r", zpool).stdout.split() == [zpool]
