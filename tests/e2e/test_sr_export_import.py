"""An SR moved to another host (zpool export, then import with a fresh local
index) keeps every volume, name, key, snapshot relation and URI; imported
again after a crash, it comes back without the devices the crash left."""

import json
import os
import re
import shutil
import subprocess
import time
import uuid

import dp_helpers as dp
from conftest import wait_for_path
from nvmeof_target.registry import Registry
from volume_calls import PLUGIN_DIR, call, check_volume, index_built, zget

RAW = "zfsng-raw"


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
    # "sr-uuid": the spelling of PBDs made before 0.2 (now "sr_uuid") still attaches
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


def test_the_next_host_takes_the_index_the_pool_carries(file_vdevs, tmp_path):
    """SR.detach leaves the index in the pool (carried.carry_index) and the next
    host's SR.attach takes it (carried.adopt_carried) instead of reading every
    dataset: a hidden leftover planted before the move is still there after
    the attach, which a sweep would have destroyed.  The copy is used only at
    the pool's generation: host A, whose own index is older, takes B's newer
    copy; a pool whose generation moved on without a copy (a crash after a
    mutation began) is read in full again, and its leftover swept."""
    devs = file_vdevs(1, 512 << 20)
    sr_uuid = str(uuid.uuid4())
    env_a = dict(os.environ, ZFSNG_STATE_DIR=str(tmp_path / "a"))
    env_b = dict(os.environ, ZFSNG_STATE_DIR=str(tmp_path / "b"))
    env_c = dict(os.environ, ZFSNG_STATE_DIR=str(tmp_path / "c"))
    conf = call_env(env_a, "SR.create", uuid=sr_uuid, configuration={"device": devs[0]},
                    name="carried", description="")
    pool = call_env(env_a, "SR.attach", configuration=conf)
    try:
        v = call_env(env_a, "Volume.create", sr=pool, name="v", description="d",
                     size=16 << 20, sharable=False)
        s = call_env(env_a, "Volume.snapshot", sr=pool, key=v["key"])
        c = call_env(env_a, "Volume.clone", sr=pool, key=s["key"])
        call_env(env_a, "Volume.destroy", sr=pool, key=v["key"])
        before = sorted(call_env(env_a, "SR.ls", sr=pool), key=lambda x: x["key"])
        trap = "%s/zfs-ng/h-planted" % pool      # garbage only a sweep removes
        subprocess.run(["zfs", "create", "-V", "1M", trap], check=True)
        call_env(env_a, "SR.detach", sr=pool)
        assert pool not in pools()

        call_env(env_b, "SR.attach", configuration=conf)
        assert dp.zfs_exists(trap), "the attach swept: the carried index was not taken"
        after = sorted(call_env(env_b, "SR.ls", sr=pool), key=lambda x: x["key"])
        assert after == before
        x = call_env(env_b, "Volume.create", sr=pool, name="x", description="",
                     size=16 << 20, sharable=False)
        call_env(env_b, "SR.detach", sr=pool)

        # A's own index is from before B's create: B's copy wins
        call_env(env_a, "SR.attach", configuration=conf)
        assert {y["key"] for y in call_env(env_a, "SR.ls", sr=pool)} == \
            {s["key"], c["key"], x["key"]}
        assert dp.zfs_exists(trap)
        call_env(env_a, "SR.detach", sr=pool)

        # a generation the copy does not have: read in full, and swept
        subprocess.run(["zpool", "import", "-N", "-d", os.path.dirname(devs[0]), pool],
                       check=True)
        subprocess.run(["zfs", "set", "org.zfs-ng:generation=999999", "%s/zfs-ng" % pool],
                       check=True)
        export(pool)
        call_env(env_c, "SR.attach", configuration=conf)
        assert not dp.zfs_exists(trap)
        assert {y["key"] for y in call_env(env_c, "SR.ls", sr=pool)} == \
            {s["key"], c["key"], x["key"]}
    finally:
        if pool not in pools():
            subprocess.run(["zpool", "import", "-N", "-d", os.path.dirname(devs[0]), pool])
        dp.destroy_pool(pool)


def test_a_host_taking_the_pool_after_a_crash_reads_only_the_journals_datasets(
        file_vdevs, tmp_path):
    """Host A dies (no SR.detach: its last copy of the index in the pool is
    older than the pool) after mutations of every kind, with copies carried
    on the way (a small journal, ZFSNG_JOURNAL_LIMIT: deltas; one delta
    before a whole copy again, ZFSNG_JOURNAL_DELTAS); host B's SR.attach
    takes the whole copy and the deltas after it, and reads again only the
    datasets the pool's journal names (carried.adopt_carried,
    carried.catch_up), and lists exactly
    what A listed: a hidden leftover outside the journal stays (no walk over
    every dataset); the volume A left activated is reset.  Without a journal
    (inherited away) host C reads every dataset and lists the same."""
    devs = file_vdevs(1, 512 << 20)
    sr_uuid = str(uuid.uuid4())

    def host(name, **more):
        run = str(tmp_path / name / "run")
        return dict({"ZFSNG_STATE_DIR": str(tmp_path / name / "state"), "ZFSNG_RUN_DIR": run,
                     "ZFSNG_NODE_RUN_DIR": run}, **more)
    a_env = host("a", ZFSNG_JOURNAL_LIMIT="250", ZFSNG_JOURNAL_DELTAS="1")
    env = dict((h, dict(os.environ, **e)) for h, e in
               (("a", a_env), ("b", host("b")), ("c", host("c"))))
    conf = call_env(env["a"], "SR.create", uuid=sr_uuid, configuration={"device": devs[0]},
                    name="crashed", description="")
    pool = call_env(env["a"], "SR.attach", configuration=conf)
    root = pool + "/zfs-ng"
    try:
        def a(method, **params):
            return call_env(env["a"], method, sr=pool, **params)
        v1, v2, v3 = [a("Volume.create", name=n, description="", size=16 << 20, sharable=False)
                      for n in ("v1", "v2", "v3")]
        s1 = a("Volume.snapshot", key=v1["key"])
        c1 = a("Volume.clone", key=s1["key"])
        s2 = a("Volume.snapshot", key=v2["key"])
        a("Volume.destroy", key=v1["key"])          # kept hidden: s1 has a clone
        a("Volume.resize", key=v2["key"], new_size=32 << 20)
        a("Volume.set_name", key=c1["key"], new_name="renamed \u00e9")
        a("Volume.set", key=v3["key"], k="owner", v="xo")
        a("Volume.enable_cbt", key=v2["key"])
        s3 = a("Volume.snapshot", key=v2["key"])
        a("Volume.data_destroy", key=s3["key"])
        a("Volume.revert", snapshot=s2["key"], key=v2["key"])
        ss = a("Volume.snapshot", key=s1["key"])    # of a snapshot: on a hidden clone
        a("Volume.destroy", key=v3["key"])
        c2 = a("Volume.clone", key=ss["key"])
        dp.call(RAW, "Datapath.attach", uri=dp.uri_of(c1, RAW), domain="3", env=a_env)
        ds_c1 = "%s/%s" % (root, c1["key"])
        assert dp.volmode_local(ds_c1) == "dev"
        before = sorted(a("SR.ls"), key=lambda x: x["key"])
        assert {x["key"] for x in before} == {s1["key"], c1["key"], v2["key"], s2["key"],
                                              s3["key"], ss["key"], c2["key"]}
        assert index_built(sr_uuid, a_env["ZFSNG_STATE_DIR"])
        trap = "%s/h-planted" % root                 # garbage only a full sweep removes
        subprocess.run(["zfs", "create", "-V", "1M", trap], check=True)
        subprocess.run(["udevadm", "settle", "--timeout=30"])
        export(pool)                                 # the crash: no SR.detach

        assert call_env(env["b"], "SR.attach", configuration=conf) == pool
        how = index_built(sr_uuid, str(tmp_path / "b" / "state"))
        print("host B's index:", how)
        assert how.startswith("carried at ") and "datasets read again" in how, how
        # the first copy was SR.create's first mutation's (generation 0); a
        # delta, then a whole copy again (ZFSNG_JOURNAL_DELTAS=1) came after
        assert int(re.match(r"carried at (\d+)", how).group(1)) > 0, how
        read_again = int(how.split(", ")[1].split()[0])
        total = len(subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", "volume", "-r",
                                    root], stdout=subprocess.PIPE, universal_newlines=True,
                                   check=True).stdout.split())
        assert 0 < read_again < total, (read_again, total)
        assert dp.zfs_exists(trap), "B walked every dataset"
        assert dp.volmode_local(ds_c1) is None, "the device A left active was not reset"
        assert sorted(call_env(env["b"], "SR.ls", sr=pool), key=lambda x: x["key"]) == before
        call_env(env["b"], "Volume.destroy", sr=pool, key=c2["key"])    # B goes on from there
        before = [x for x in before if x["key"] != c2["key"]]

        subprocess.run(["zfs", "inherit", "org.zfs-ng:journal", root], check=True)
        export(pool)                                 # B dies too, with no journal
        call_env(env["c"], "SR.attach", configuration=conf)
        how = index_built(sr_uuid, str(tmp_path / "c" / "state"))
        assert how.startswith("rebuilt at "), how
        assert not dp.zfs_exists(trap)
        assert sorted(call_env(env["c"], "SR.ls", sr=pool), key=lambda x: x["key"]) == before
    finally:
        if pool not in pools():
            subprocess.run(["zpool", "import", "-N", "-d", os.path.dirname(devs[0]), pool])
        dp.destroy_pool(pool)


def test_an_index_behind_the_pool_reads_only_the_journals_datasets(sr, sr_vdev):
    """A mutation that stopped between its generation bump (with its datasets
    in the pool's journal) and its index update leaves the index one
    generation behind: the next call reads again only the datasets the
    journal names (sr.SR.catch_up_local), not every dataset.  Made here by
    hand as such a mutation would leave it: volumes A and B made before a
    copy of the index was carried (SR.detach: the journal starts empty),
    then a snapshot taken of A with the journal naming A and the generation
    moved on in one `zfs set`; a snapshot of B made behind the plugin's
    back, which the journal does not name, is not seen: nothing but the
    journal's datasets was read.  A generation moved without the journal
    (by hand) reads everything."""
    from plugins.volume import journal
    pool = sr
    root = pool + "/zfs-ng"
    a, b = [call("Volume.create", sr=pool, name=n, description="", size=16 << 20,
                 sharable=False) for n in ("a", "b")]
    call("SR.detach", sr=pool)
    call("SR.attach", configuration={"pool": pool, "device": sr_vdev})
    before = {v["key"] for v in call("SR.ls", sr=pool)}
    gen = int(zget(root, "org.zfs-ng:generation"))
    base, names = journal.parse(json.loads(zget(root, "org.zfs-ng:journal")), gen)
    assert (base, names) == (gen, frozenset())
    snap_a, snap_b = str(uuid.uuid4()), str(uuid.uuid4())
    value = json.dumps(journal.build(base, names | {a["key"]}, gen + 1), sort_keys=True)
    subprocess.run(["zfs", "set", "org.zfs-ng:journal=" + value,
                    "org.zfs-ng:generation=%d" % (gen + 1), root], check=True)
    for key, snap in ((a["key"], snap_a), (b["key"], snap_b)):
        subprocess.run(["zfs", "snapshot", "-o", 'org.zfs-ng:name="s"',
                        "%s/%s@%s" % (root, key, snap)], check=True)
    listed = {v["key"] for v in call("SR.ls", sr=pool)}
    assert listed == before | {snap_a}, "not only the journal's datasets were read"
    how = index_built(zget(root, "org.zfs-ng:sr-uuid").strip('"'))
    assert how.startswith("index at %d, " % gen), how
    # the generation moved by hand, the journal left behind: everything is read
    subprocess.run(["zfs", "set", "org.zfs-ng:generation=%d" % (gen + 2), root], check=True)
    assert {v["key"] for v in call("SR.ls", sr=pool)} == before | {snap_a, snap_b}


def test_a_clean_move_resets_the_marked_devices_without_a_walk(file_vdevs, tmp_path):
    """A volume activated, a snapshot's read-only clone and a non-persistent
    session left by host A (no deactivate came: what SR.detach would carry if
    xapi skipped the detaches) are reset by host B's SR.attach from the marks
    the carried index holds (activate_device and sessions mark before making a
    device): B has no datapath records.  A device made behind the plugin's
    back (no mark) stays: B looked only at marked keys, not at every volume."""
    devs = file_vdevs(1, 512 << 20)
    sr_uuid = str(uuid.uuid4())

    def host(name):
        run = str(tmp_path / name / "run")
        return {"ZFSNG_STATE_DIR": str(tmp_path / name / "state"), "ZFSNG_RUN_DIR": run,
                "ZFSNG_NODE_RUN_DIR": run}
    a_env, b_env = host("a"), host("b")
    env_a, env_b = dict(os.environ, **a_env), dict(os.environ, **b_env)
    conf = call_env(env_a, "SR.create", uuid=sr_uuid, configuration={"device": devs[0]},
                    name="moved", description="")
    pool = call_env(env_a, "SR.attach", configuration=conf)
    try:
        a, b, c = [call_env(env_a, "Volume.create", sr=pool, name=n, description="",
                            size=16 << 20, sharable=False) for n in ("a", "b", "c")]
        s = call_env(env_a, "Volume.snapshot", sr=pool, key=a["key"])
        for v in (a, s):
            dp.call(RAW, "Datapath.attach", uri=dp.uri_of(v, RAW), domain="3", env=a_env)
        dp.call(RAW, "Datapath.open", uri=dp.uri_of(b, RAW), persistent=False, env=a_env)
        dp.call(RAW, "Datapath.attach", uri=dp.uri_of(b, RAW), domain="4", env=a_env)
        ds = dict((v["key"], "%s/zfs-ng/%s" % (pool, v["key"])) for v in (a, b, c))
        ro = "%s/zfs-ng/ro-%s" % (pool, s["key"])
        np_b = "%s/zfs-ng/np-%s" % (pool, b["key"])
        subprocess.run(["zfs", "set", "volmode=dev", ds[c["key"]]], check=True)   # no mark
        assert dp.volmode_local(ds[a["key"]]) == "dev" and dp.zfs_exists(ro)
        assert dp.zfs_exists(np_b)
        subprocess.run(["udevadm", "settle", "--timeout=30"])   # udev done with the new nodes
        call_env(env_a, "SR.detach", sr=pool)
        assert pool not in pools()

        call_env(env_b, "SR.attach", configuration=conf)
        assert dp.volmode_local(ds[a["key"]]) is None
        assert not dp.zfs_exists(ro) and not dp.zfs_exists(np_b)
        assert dp.volmode_local(ds[c["key"]]) == "dev"       # unmarked: not looked at
        assert {v["key"] for v in call_env(env_b, "SR.ls", sr=pool)} == \
            {a["key"], b["key"], c["key"], s["key"]}
        subprocess.run(["zfs", "inherit", "volmode", ds[c["key"]]], check=True)
    finally:
        if pool not in pools():
            subprocess.run(["zpool", "import", "-N", "-d", os.path.dirname(devs[0]), pool])
        dp.destroy_pool(pool)


def call_env(env, method, **params):
    params.setdefault("dbg", "test")
    p = subprocess.run([os.path.join(PLUGIN_DIR, method), "--json"],
                       input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=env)
    assert p.returncode == 0, (method, p.stdout, p.stderr)
    return json.loads(p.stdout)


def test_attach_after_a_crash_resets_devices_nobody_uses(file_vdevs, tmp_path, monkeypatch):
    """A host crash leaves zvols activated (volmode=dev) and snapshots' read-only
    clones behind, with /run (the datapaths' records) empty.  SR.attach that
    imports the pool resets what no record names: volumes back to the SR's
    volmode=none (no device node), read-only clones destroyed; a volume still
    recorded as attached keeps its device; a non-persistent session's clone
    (Datapath.open persistent=false: a reset-on-boot VM) is discarded, or
    Volume.destroy of its VDI would find the session open.  A later attach
    touches nothing."""
    run_dir = tmp_path / "run"            # this "host's" /run/zfs-ng
    monkeypatch.setenv("ZFSNG_RUN_DIR", str(run_dir))
    monkeypatch.setenv("ZFSNG_NODE_RUN_DIR", str(run_dir))
    # the NVMe/TCP target's registry survives reboots (it is not in /run)
    monkeypatch.setenv("ZFSNG_TARGET_STATE", str(tmp_path / "target.db"))
    devs = file_vdevs(1, 512 << 20)
    sr_uuid = str(uuid.uuid4())
    conf = call("SR.create", uuid=sr_uuid, configuration={"device": devs[0]},
                name="crash", description="")
    pool = call("SR.attach", configuration=conf)
    try:
        a, b, c, d = [call("Volume.create", sr=pool, name=n, description="", size=16 << 20,
                           sharable=False) for n in ("a", "b", "c", "d")]
        dp.call(RAW, "Datapath.open", uri=dp.uri_of(d, RAW), persistent=False)
        dp.call(RAW, "Datapath.attach", uri=dp.uri_of(d, RAW), domain="5")
        np_d = "%s/zfs-ng/np-%s" % (pool, d["key"])
        assert dp.zfs_exists(np_d)
        s = call("Volume.snapshot", sr=pool, key=a["key"])
        for v in (a, b, c, s):
            dp.call(RAW, "Datapath.attach", uri=dp.uri_of(v, RAW), domain="3")
        ds_a = "%s/zfs-ng/%s" % (pool, a["key"])
        ds_b = "%s/zfs-ng/%s" % (pool, b["key"])
        ds_c = "%s/zfs-ng/%s" % (pool, c["key"])
        ro = "%s/zfs-ng/ro-%s" % (pool, s["key"])
        # c is exported over NVMe/TCP: the target will serve it again at boot
        reg = Registry(str(tmp_path / "target.db"))
        reg.add("nqn.2014-08.org.zfs-ng:%s:%s" % (sr_uuid, c["key"]), "/dev/zvol/" + ds_c,
                str(uuid.uuid4()))
        reg.close()
        assert dp.volmode_local(ds_a) == dp.volmode_local(ds_b) == "dev"
        assert dp.zfs_exists(ro)

        # the crash: the pool goes with its devices active; /run loses every
        # record but b's (as if b alone had been attached again since)
        export(pool)
        kept = 0
        for path in run_dir.rglob("*.json"):
            if json.loads(path.read_text())["volume"].endswith("/" + b["key"]):
                kept += 1
            else:
                path.unlink()
        assert kept == 2                  # b's attachment and its device user

        assert call("SR.attach", configuration=conf) == pool
        assert dp.volmode_local(ds_a) is None and not dp.zfs_exists(ro)
        assert not dp.zfs_exists(np_d)
        snaps = subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-r",
                                "%s/zfs-ng/%s" % (pool, d["key"])], stdout=subprocess.PIPE,
                               universal_newlines=True).stdout
        assert "@np-" not in snaps, snaps
        call("Volume.destroy", sr=pool, key=d["key"])
        wait_gone("/dev/zvol/" + ds_a)
        assert dp.volmode_local(ds_b) == dp.volmode_local(ds_c) == "dev"
        wait_for_path("/dev/zvol/" + ds_b)
        assert {v["key"] for v in call("SR.ls", sr=pool)} == {a["key"], b["key"], c["key"],
                                                               s["key"]}

        # an attach of the imported pool leaves unrecorded devices alone (a
        # restore into a volume or Volume.compare records nobody)
        subprocess.run(["zfs", "set", "volmode=dev", ds_a], check=True)
        call("SR.attach", configuration=conf)
        assert dp.volmode_local(ds_a) == "dev"
        subprocess.run(["zfs", "inherit", "volmode", ds_a], check=True)

        # and everything still attaches and detaches as usual
        for v in (a, s):
            res = dp.call(RAW, "Datapath.attach", uri=dp.uri_of(v, RAW), domain="4")
            wait_for_path(dp.impl(res, "BlockDevice")["path"])
            dp.call(RAW, "Datapath.detach", uri=dp.uri_of(v, RAW), domain="4")
        dp.call(RAW, "Datapath.detach", uri=dp.uri_of(b, RAW), domain="3")
        assert dp.volmode_local(ds_b) is None and not dp.zfs_exists(ro)
    finally:
        dp.destroy_pool(pool)


def wait_gone(path, timeout=30.0):
    """A device node removed (udev removes zvol links asynchronously)."""
    deadline = time.time() + timeout
    while os.path.exists(path):
        assert time.time() < deadline, "%s still exists after %.0f s" % (path, timeout)
        subprocess.run(["udevadm", "settle", "--timeout=5"])
        time.sleep(0.2)


def export(pool):
    """zpool export, retried while udev still holds a just-made device."""
    for _ in range(20):
        p = subprocess.run(["zpool", "export", pool], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
        if p.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError("zpool export %s: %s" % (pool, p.stdout))
