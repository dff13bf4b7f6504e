"""A shared SR (issue 15, item 1): the storage node holds the pool, another
host of the pool plugs the same SR and manages its volumes through the node.

The node is the VM's root network namespace (10.78.0.1); host B is the
namespace zfsng-hb (10.78.0.2, its own host NQN), whose plugin calls run in
it with ZFSNG_NODE_COMMAND standing in for ssh (tests/e2e/netns.py).  The SR
configuration names the node by address (`node=10.78.0.1`): on the node the
address is its own, so everything is local; in B it is not, so B forwards.

What xapi does that this follows: xapi_sr.ml create (SR.create on the host the
admin called, usually the master; its result stored as every host's PBD
device_config), xapi_pbd.ml plug on every host (SR.attach with that
device_config, the returned SR string kept per host by xapi-storage-script
main.ml sr_attach_impl and passed back in every later call), sr-scan and
VDI operations on the master (SR.ls / Volume.*), PBD.unplug on each host
(SR.detach).
"""

import json
import os
import time
import uuid

import pytest

from conftest import make_file_vdevs, run
from dp_helpers import PluginError, call as dp_call, destroy_pool, impl, pattern, pread, serving_target
from netns import HostNs, node_command
from nvmeof_target.control import Client
from volume_calls import call as node_call

NODE_IP, B_IP = "10.78.0.1", "10.78.0.2"
PORT = 4426
SOCK = "/run/zfs-ng/shared-sr-target.sock"
B_NQN = "nqn.2014-08.org.zfs-ng:netns-hb"
B_ID = "0d5e8f4a-7c21-4b9e-8f3a-5a6b7c8d9e01"
MiB = 1 << 20

B_ENV = {"ZFSNG_RUN_DIR": "/run/zfsng-hb", "ZFSNG_NODE_RUN_DIR": None,
         "ZFSNG_NODE_COMMAND": json.dumps(node_command(ZFSNG_TARGET_SOCKET=SOCK)),
         "ZFSNG_HOSTNQN": None, "ZFSNG_TARGET_SOCKET": None, "ZFSNG_HOST_ID": None,
         "ZFSNG_REMOTE_DATAPATHS": None, "ZFSNG_NODE_TIMEOUT": None}


@pytest.fixture(scope="module")
def hb():
    ns = HostNs("zfsng-hb", NODE_IP, B_IP, B_NQN, B_ID, env=B_ENV)
    try:
        yield ns.setup()
    finally:
        ns.teardown()


def root_prop(pool, prop):
    out = run("zfs", "get", "-H", "-p", "-o", "value", "org.zfs-ng:" + prop,
              "%s/zfs-ng" % pool).stdout.strip()
    return None if out == "-" else json.loads(out)


def pools():
    return set(run("zpool", "list", "-H", "-o", "name").stdout.split())


@pytest.fixture(scope="module")
def shared(hb):
    """The SR, created from host B (not the node), plugged on the node and on B."""
    vdev = make_file_vdevs(1, 1 << 30)[0]
    sr_uuid = str(uuid.uuid4())
    before = pools()
    config = {"device": vdev, "node": NODE_IP, "nvme-node": "%s:%d" % (NODE_IP, PORT)}
    out = hb.volume("SR.create", uuid=sr_uuid, configuration=config, name="shared",
                 description="made on host B")
    pool = out.get("pool")
    try:
        yield {"uuid": sr_uuid, "config": out, "vdev": vdev, "pools_before": before}
    finally:
        if pool:
            destroy_pool(pool)
        os.unlink(vdev)


def test_sr_create_on_a_host_that_is_not_the_node_makes_the_pool_on_the_node(shared):
    """xe sr-create shared=true on the master (here B): SR.create runs on the
    node; its result (every PBD's device_config) keeps `node`."""
    config = shared["config"]
    assert config["node"] == NODE_IP and config["sr_uuid"] == shared["uuid"]
    assert config["pool"] in pools() - shared["pools_before"]       # on the node
    assert root_prop(config["pool"], "sr-uuid") == shared["uuid"]


def test_pbd_plug_on_every_host(hb, shared):
    """PBD.plug on the node (local attach: the pool name) and on B (through
    the node: zfs-ng://NODE/POOL, B recorded on the SR root); repeated plugs
    are no-ops."""
    config = shared["config"]
    pool = config["pool"]
    assert node_call("SR.attach", configuration=config) == pool
    sr_b = hb.volume("SR.attach", configuration=config)
    assert sr_b == "zfs-ng://%s/%s" % (NODE_IP, pool)
    assert hb.volume("SR.attach", configuration=config) == sr_b
    assert root_prop(pool, "remote-hosts") == [B_NQN]      # B's identity: its host NQN
    stat_b = hb.volume("SR.stat", sr=sr_b)
    stat_n = node_call("SR.stat", sr=pool)
    for k in ("uuid", "name", "description", "health", "total_space"):
        assert stat_b[k] == stat_n[k], k
    assert stat_b["name"] == "shared"
    shared["sr_b"] = sr_b


def test_volume_calls_on_b_run_on_the_node(hb, shared):
    """sr-scan and VDI operations on B: Volume.* and SR.ls run on the node;
    B's volume URIs are only what B can attach from afar (nvme+tcp here: no
    nbd-node); errors of the node cross unchanged."""
    if "sr_b" not in shared:
        pytest.skip("needs test_pbd_plug_on_every_host")
    pool, sr_b = shared["config"]["pool"], shared["sr_b"]
    vol = hb.volume("Volume.create", sr=sr_b, name="disk on B", description="d",
                 size=32 * MiB, sharable=False)
    key = vol["key"]
    assert run("zfs", "list", "-H", "-o", "name", "%s/zfs-ng/%s" % (pool, key)).returncode == 0
    assert vol["uri"] and all(u.startswith("nvme+tcp://%s:%d/" % (NODE_IP, PORT))
                              for u in vol["uri"]), vol["uri"]
    on_node = node_call("Volume.stat", sr=pool, key=key)
    assert any(u.startswith("zfsng-raw://") for u in on_node["uri"])   # the node's own
    assert [u for u in on_node["uri"] if u.startswith("nvme+tcp")] == vol["uri"]
    # B may prefer NBD: no nbd-node on this SR, so it is left with nothing
    assert hb.volume("Volume.stat", sr=sr_b, key=key,
                  env={"ZFSNG_REMOTE_DATAPATHS": "nbd+tls"})["uri"] == []

    snap = hb.volume("Volume.snapshot", sr=sr_b, key=key)
    clone = hb.volume("Volume.clone", sr=sr_b, key=snap["key"])
    hb.volume("Volume.set", sr=sr_b, key=key, k="vdi-type", v="user")
    hb.volume("Volume.set_name", sr=sr_b, key=key, new_name="renamed on B")
    hb.volume("Volume.resize", sr=sr_b, key=key, new_size=48 * MiB)
    st = node_call("Volume.stat", sr=pool, key=key)
    assert st["name"] == "renamed on B" and st["keys"].get("vdi-type") == "user"
    assert st["virtual_size"] >= 48 * MiB
    keys_b = sorted(v["key"] for v in hb.volume("SR.ls", sr=sr_b))
    keys_n = sorted(v["key"] for v in node_call("SR.ls", sr=pool))
    assert keys_b == keys_n and {key, snap["key"], clone["key"]} <= set(keys_b)

    with pytest.raises(PluginError) as e:
        hb.volume("Volume.stat", sr=sr_b, key=str(uuid.uuid4()))
    assert e.value.name == "Volume_does_not_exist"
    with pytest.raises(PluginError) as e:
        hb.volume("SR.stat", sr="zfs-ng://%s/no;pool" % NODE_IP)
    assert e.value.name == "SR_does_not_exist"

    hb.volume("Volume.destroy", sr=sr_b, key=clone["key"])
    hb.volume("Volume.destroy", sr=sr_b, key=clone["key"])          # idempotent
    assert clone["key"] not in [v["key"] for v in node_call("SR.ls", sr=pool)]
    shared["key"] = key


def test_vm_on_b_writes_through_nvme_tcp_to_the_node(hb, shared):
    """VM start on B of a VDI of the SR created from B: B's Volume.stat URI
    (nvme+tcp) attached and activated by the datapath in B, data written
    there is on the node's zvol; detach leaves nothing connected."""
    if "key" not in shared:
        pytest.skip("needs test_volume_calls_on_b_run_on_the_node")
    pool, sr_b, key = shared["config"]["pool"], shared["sr_b"], shared["key"]
    uri = hb.volume("Volume.stat", sr=sr_b, key=key)["uri"][0]
    state = "/var/lib/zfsng-test/shared-sr-target.db"
    with serving_target("%s:%d" % (NODE_IP, PORT), state, SOCK):
        res = hb.datapath("Datapath.attach", uri=uri, domain="5")
        dev = impl(res, "BlockDevice")["path"]
        hb.datapath("Datapath.activate", uri=uri, domain="5")
        data = pattern(3, MiB)
        hb.run("python3", "-c", "import os,sys; fd=os.open(%r, os.O_WRONLY); "
               "os.pwrite(fd, bytes.fromhex(sys.stdin.read()), %d); os.fsync(fd)"
               % (dev, 4 * MiB), input=data.hex())
        hb.datapath("Datapath.deactivate", uri=uri, domain="5")
        hb.datapath("Datapath.detach", uri=uri, domain="5")
        hb.datapath("Datapath.detach", uri=uri, domain="5")
    zvol = "/dev/zvol/%s/zfs-ng/%s" % (pool, key)
    node_call("Volume.stat", sr=pool, key=key)
    # the zvol link exists while something uses the volume: read it through a
    # local activation on the node (zfsng-raw, no tap-ctl in the VM)
    raw = "zfsng-raw://%s/%s" % (pool, key)
    dp_call("zfsng-raw", "Datapath.attach", uri=raw, domain="9")
    try:
        assert pread(zvol, 4 * MiB, MiB) == data
        shared["written"] = data
    finally:
        dp_call("zfsng-raw", "Datapath.detach", uri=raw, domain="9")


def test_toolstack_on_b_plug_scan_and_vm_start(hb, shared):
    """xapi on host B (tests/e2e/toolstack.py, its plugin processes in B's
    namespace): the shared SR's PBD on B (sr-introduce + pbd-create with the
    SR's device_config, as a pool member gets it) plugged, sr-scan from B, a
    VM started on B: xenopsd gets XenDisk vbd + BlockDevice /dev/nvmeXnY
    (params_of_backend), blkback serves it; the data written on B before is
    there, a write from the VM lands on the node's zvol."""
    if "key" not in shared:
        pytest.skip("needs test_volume_calls_on_b_run_on_the_node")
    from toolstack import VBD, VM, Host, implementations_of_backend
    pool, key = shared["config"]["pool"], shared["key"]
    workdir = "/run/zfsng-shared-toolstack"
    host = Host(workdir, "hostB", tapctl=None, netns=hb.name, extra_env=hb.env).start()
    assert "nvme+tcp" in host.xss.datapaths
    sr = host.xapi.sr_introduce("shared", sr_uuid=shared["uuid"])
    host.xapi.pbd_create(sr, shared["config"])
    host.xapi.pbd_plug(sr)
    assert host.xss.attached[sr] == shared["sr_b"]
    rec = host.xapi.sr_scan(sr)[key]
    assert rec["name_label"] == "renamed on B"
    state = "/var/lib/zfsng-test/shared-sr-target.db"
    with serving_target("%s:%d" % (NODE_IP, PORT), state, SOCK):
        vm = VM(host, "vm-on-b", [VBD(rec)]).start()
        try:
            xendisks, blockdevs, _f, _n = implementations_of_backend(
                vm.vbds[0].attach_info["implementations"])
            assert xendisks[0]["backend_type"] == "vbd"
            assert blockdevs[0]["path"].startswith("/dev/nvme"), blockdevs
            disk = vm.disk()
            assert disk.backend == "blkback"
            if "written" in shared:
                assert disk.read(4 * MiB, MiB) == shared["written"]
            disk.write(8 * MiB, pattern(8, 256 * 1024))
        finally:
            vm.shutdown()
        host.xapi.pbd_unplug(sr)
    assert root_prop(pool, "remote-hosts") == []          # B's PBD.unplug: B's record gone
    assert hb.volume("SR.attach", configuration=shared["config"]) == shared["sr_b"]
    assert root_prop(pool, "remote-hosts") == [B_NQN]


def test_one_read_write_host_the_node_included(hb, shared):
    """The node is one host among those using the SR: a volume active
    read-write on the node (zfsng-raw, a VM there) cannot be activated on B,
    and the other way round; read-only on both at once is fine for a snapshot."""
    if "key" not in shared:
        pytest.skip("needs test_volume_calls_on_b_run_on_the_node")
    pool, sr_b, key = shared["config"]["pool"], shared["sr_b"], shared["key"]
    uri_b = hb.volume("Volume.stat", sr=sr_b, key=key)["uri"][0]
    raw = "zfsng-raw://%s/%s" % (pool, key)
    state = "/var/lib/zfsng-test/shared-sr-target.db"
    with serving_target("%s:%d" % (NODE_IP, PORT), state, SOCK):
        hb.datapath("Datapath.attach", uri=uri_b, domain="6")
        try:
            dp_call("zfsng-raw", "Datapath.attach", uri=raw, domain="8")
            try:
                dp_call("zfsng-raw", "Datapath.activate", uri=raw, domain="8")
                err = hb.datapath("Datapath.activate", fails=True, uri=uri_b, domain="6")
                assert err["params"][0] == "Activated_on_another_host", err
                dp_call("zfsng-raw", "Datapath.deactivate", uri=raw, domain="8")
                hb.datapath("Datapath.activate", uri=uri_b, domain="6")
                with pytest.raises(PluginError) as e:
                    dp_call("zfsng-raw", "Datapath.activate", uri=raw, domain="8")
                assert e.value.name == "Activated_on_another_host", e.value
                hb.datapath("Datapath.deactivate", uri=uri_b, domain="6")
                dp_call("zfsng-raw", "Datapath.activate", uri=raw, domain="8")   # free again
            finally:
                dp_call("zfsng-raw", "Datapath.detach", uri=raw, domain="8")
        finally:
            hb.datapath("Datapath.detach", uri=uri_b, domain="6")


def test_sr_requiring_nvme_authentication(hb, shared):
    """nvme-auth=required on the SR: the node's grant makes the subsystem
    require DH-HMAC-CHAP, so B without a key is refused at connect; with its
    key on the node (zfs-ng target host-key) and in B's 0600 key file, B
    attaches and reads the volume."""
    if "key" not in shared:
        pytest.skip("needs test_volume_calls_on_b_run_on_the_node")
    config, sr_b, key = shared["config"], shared["sr_b"], shared["key"]
    pool = config["pool"]
    node_call("SR.attach", configuration=dict(config, **{"nvme-auth": "required"}))
    assert root_prop(pool, "nvme-auth") == "required"
    uri = hb.volume("Volume.stat", sr=sr_b, key=key)["uri"][0]
    keys = "/run/zfsng-hb/dhchap-keys.json"
    state = "/var/lib/zfsng-test/shared-sr-target.db"
    try:
        with serving_target("%s:%d" % (NODE_IP, PORT), state, SOCK):
            err = hb.datapath("Datapath.attach", fails=True, uri=uri, domain="4")
            assert err["params"][0] == "NVMe_connect_failed", err
            hb.datapath("Datapath.detach", uri=uri, domain="4")
            secret = run("nvme", "gen-dhchap-key", "-n", B_NQN).stdout.strip()
            with Client(SOCK) as c:
                c.set_host_key(B_NQN, secret)
            os.makedirs(os.path.dirname(keys), exist_ok=True)
            fd = os.open(keys, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({B_NQN: {"secret": secret}}, f)
            env = {"ZFSNG_DHCHAP_KEYS": keys}
            res = hb.datapath("Datapath.attach", env=env, uri=uri, domain="4")
            dev = impl(res, "BlockDevice")["path"]
            try:
                if "written" in shared:
                    got = hb.run("python3", "-c", "import os,sys; fd=os.open(%r, os.O_RDONLY); "
                                 "sys.stdout.write(os.pread(fd, %d, %d).hex())"
                                 % (dev, MiB, 4 * MiB)).stdout
                    assert bytes.fromhex(got) == shared["written"]
            finally:
                hb.datapath("Datapath.detach", env=env, uri=uri, domain="4")
    finally:
        node_call("SR.attach", configuration=dict(config, **{"nvme-auth": "off"}))
        if os.path.exists(keys):
            os.unlink(keys)


def test_unplug_order_and_node_unreachable(hb, shared):
    """PBD.unplug on the node while B still has the SR plugged leaves the pool
    imported; B's unplug drops B's record; then the node's exports it.  A plug
    from B imports it again on the node.  A node that does not answer is
    Node_unreachable within ZFSNG_NODE_TIMEOUT; B's PBD.unplug still succeeds."""
    if "sr_b" not in shared:
        pytest.skip("needs test_pbd_plug_on_every_host")
    config, pool, sr_b = shared["config"], shared["config"]["pool"], shared["sr_b"]
    node_call("SR.detach", sr=pool)
    assert pool in pools(), "the node's unplug exported the pool under host B"
    hb.volume("SR.detach", sr=sr_b)
    assert root_prop(pool, "remote-hosts") == []
    node_call("SR.detach", sr=pool)
    assert pool not in pools()
    assert hb.volume("SR.attach", configuration=config) == sr_b        # imports on the node
    assert pool in pools() and root_prop(pool, "remote-hosts") == [B_NQN]

    hang = json.dumps(["python3", "-c", "import time; time.sleep(60)"])
    t0 = time.time()
    with pytest.raises(PluginError) as e:
        hb.volume("SR.stat", sr=sr_b, env={"ZFSNG_NODE_COMMAND": hang,
                                             "ZFSNG_NODE_TIMEOUT": "3"})
    assert e.value.name == "Node_unreachable" and time.time() - t0 < 30
    # no override: ssh to root@10.78.0.1, which this VM does not accept
    with pytest.raises(PluginError) as e:
        hb.volume("Volume.stat", sr=sr_b, key=shared.get("key", str(uuid.uuid4())),
               env={"ZFSNG_NODE_COMMAND": None, "ZFSNG_NODE_TIMEOUT": "20"})
    assert e.value.name == "Node_unreachable", e.value.err
    hb.volume("SR.detach", sr=sr_b, env={"ZFSNG_NODE_COMMAND": hang,
                                          "ZFSNG_NODE_TIMEOUT": "3"})
    assert root_prop(pool, "remote-hosts") == [B_NQN]     # kept: the node never heard
    node_call("SR.detach", sr=pool)
    assert pool in pools()
