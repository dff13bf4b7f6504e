"""An SR moved to another host (zpool export, then import with a fresh local
index) keeps every volume, name, key, snapshot relation and URI."""

import json
import os
import shutil
import subprocess
import uuid

from volume_calls import PLUGIN_DIR, call, check_volume


def pools():
    out = subprocess.run(["zpool", "list", "-H", "-o", "name"], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return set(out.split())


def test_export_import_keeps_everything(file_vdevs, tmp_path):
    """Another host (a fresh index directory) after zpool export/import sees the
    same volumes, names, keys, snapshot relations and URIs."""
    devs = file_vdevs(2, 512 << 20)
    sr_uuid = str(uuid.uuid4())
    conf = call("SR.create", uuid=sr_uuid, configuration={
        "device": ",".join(devs), "vdev": "mirror", "datapath": "nvme",
        "nvme-node": "192.0.2.1:4420"}, name="moved", description="")
    pool = conf["pool"]
    call("SR.attach", configuration=conf)
    v = call("Volume.create", sr=pool, name="vm disk \u00e9", description="boot",
             size=64 << 20, sharable=False)
    assert v["uri"][0] == "nvme+tcp://192.0.2.1:4420/nqn.2014-08.org.zfs-ng:%s:%s" % (
        sr_uuid, v["key"])
    call("Volume.set", sr=pool, key=v["key"], k="vdi-type", v="user")
    s = call("Volume.snapshot", sr=pool, key=v["key"])
    call("Volume.set", sr=pool, key=s["key"], k="snapshot_of", v=v["key"])
    c = call("Volume.clone", sr=pool, key=s["key"])
    call("Volume.destroy", sr=pool, key=v["key"])  # its snapshot stays, hidden parent
    before = sorted(call("SR.ls", sr=pool), key=lambda x: x["key"])
    assert {x["key"] for x in before} == {s["key"], c["key"]}

    call("SR.detach", sr=pool)
    assert pool not in pools()
    other = str(tmp_path / "other-host")
    env = dict(os.environ, ZFSNG_STATE_DIR=other)
    doc = call_env(env, "SR.attach", configuration={"pool": pool, "device": ",".join(devs),
                                                    "sr-uuid": sr_uuid})
    assert doc == pool
    after = sorted(call_env(env, "SR.ls", sr=pool), key=lambda x: x["key"])
    for x in after:
        check_volume(x)
    strip = lambda vs: [dict(x, physical_utilisation=0) for x in vs]  # noqa: E731
    assert strip(after) == strip(before)
    assert os.listdir(other) and any(f.endswith(".sqlite") for f in os.listdir(other))
    assert call_env(env, "Volume.similar_content", sr=pool, key=c["key"]) == [s["key"]]
    call_env(env, "SR.destroy", sr=pool)
    shutil.rmtree(other)


def call_env(env, method, **params):
    params.setdefault("dbg", "test")
    p = subprocess.run([os.path.join(PLUGIN_DIR, method), "--json"],
                       input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=env)
    assert p.returncode == 0, (method, p.stdout, p.stderr)
    return json.loads(p.stdout)
