"""nvme+tcp with a real second host: a network namespace.

The storage node is the VM's root network namespace: the SR publishes
nvme+tcp://10.77.0.1:PORT/... and our NVMe/TCP target listens on 10.77.0.1.
The remote host "h2" is the network namespace zfsng-h2 behind a veth pair
(10.77.0.2), a tests/e2e/netns.py HostNs.  Its datapath calls run inside it
(`ip netns exec`, as xapi-storage-script would run them on that host), with

  * its own /etc/nvme/hostnqn and hostid: /etc/netns/zfsng-h2/nvme/, which
    `ip netns exec` bind-mounts over /etc/nvme (ZFSNG_HOSTNQN is NOT set, so
    the datapath's default host NQN is what is tested);
  * its own attachment state (ZFSNG_RUN_DIR) and no target socket;
  * ZFSNG_NODE_COMMAND to reach the node.  On XCP-ng that is ssh; here the
    stand-in for ssh is netns.node_command: `nsenter --net=/proc/1/ns/net
    --mount=/proc/1/ns/mnt` with a clean environment, which runs
    `python3 -m plugins.node_ops` in the node's network and mount namespaces
    (the node's /etc, /sys, /run).

The kernel initiator opens its TCP sockets in the netns of the process that
writes /dev/nvme-fabrics (drivers/nvme/host/tcp.c nvme_tcp_alloc_queue:
sock_create / sock_create_kern with current->nsproxy->net_ns); the tests check
it: the connection's host end is 10.77.0.2 inside the netns, and the root
netns has no client end of it.

Block devices and sysfs's nvme/block classes are not per-netns, so the test
process reads the namespace and the zvol directly to check the data.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import make_file_vdevs, run
from netns import HostNs, disconnect_all, node_command
from dp_helpers import (PluginError, call, destroy_pool, impl, make_sr, make_volume, pattern,
                        pread, pwrite, serving_target, uri_of)
from nvmeof_target.control import Client, ControlError
from plugins.datapath import nvme_host

NVME = "nvme+tcp"
RAW = "zfsng-raw"
NODE_IP, HOST_IP = "10.77.0.1", "10.77.0.2"
PORT = 4424
SOCK = "/run/zfs-ng/dp-remote-target.sock"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20

H2_NQN = "nqn.2014-08.org.zfs-ng:netns-h2"
H2_ID = "6f1c2a8e-5d0b-4c1e-9a37-2b8d4e6f0a12"
HOST_A = "nqn.2014-08.org.zfs-ng:test-host-a"

H2 = {"ZFSNG_RUN_DIR": "/run/zfsng-h2",
      "ZFSNG_NODE_COMMAND": json.dumps(node_command(ZFSNG_TARGET_SOCKET=SOCK)),
      "ZFSNG_HOSTNQN": None, "ZFSNG_TARGET_SOCKET": None}
HOST2 = HostNs("zfsng-h2", NODE_IP, HOST_IP, H2_NQN, H2_ID, env=H2)
h2 = HOST2.datapath                            # h2(METHOD, uri=URI, ...): a call on h2
# a host in the root netns, next to the node (node ops in-process)
A = {"ZFSNG_RUN_DIR": "/run/zfsng-host-a", "ZFSNG_HOSTNQN": HOST_A, "ZFSNG_TARGET_SOCKET": SOCK,
     "ZFSNG_NODE_COMMAND": None}


@pytest.fixture(scope="module")
def netns():
    try:
        HOST2.setup()
        assert open("/etc/nvme/hostnqn").read().strip() != H2_NQN
        yield HOST2
    finally:
        HOST2.teardown()


@pytest.fixture(scope="module")
def node(netns):
    """The SR (volumes publish nvme+tcp://10.77.0.1:PORT first) and our target on 10.77.0.1."""
    vdev = make_file_vdevs(1, 1 << 30)[0]
    pool = make_sr(vdev, **{"nvme-node": "%s:%d" % (NODE_IP, PORT), "datapath": "nvme"})
    state = "/var/lib/zfsng-test/dp-remote-target.db"
    try:
        with serving_target("%s:%d" % (NODE_IP, PORT), state, SOCK):
            try:
                yield pool
            finally:
                disconnect_all(H2_NQN)      # before the target goes
                disconnect_all(HOST_A)
    finally:
        destroy_pool(pool)
        os.unlink(vdev)


def tcp_ends(in_h2=False, **filt):
    """(local, peer) of the established TCP connections matching an ss filter."""
    argv = ["ss", "-tnH", "state", "established"]
    for k, v in filt.items():
        argv += [k, v]
    out = (HOST2.run(*argv) if in_h2 else run(*argv)).stdout
    return sorted((f[-2], f[-1]) for f in (l.split() for l in out.splitlines()) if len(f) >= 2)


def served(subnqn):
    """The target's record of the subsystem (ControlError once removed)."""
    with Client(SOCK) as c:
        return c.get(subnqn)


def plain_connect(subnqn):
    """`nvme connect` in the netns with nothing but its /etc/nvme host NQN and id."""
    return HOST2.run("nvme", "connect", "-t", "tcp", "-a", NODE_IP, "-s", str(PORT),
                     "-n", subnqn, check=False)


def fio(dev, *args, in_h2=False):
    argv = ["fio", "--ioengine=libaio", "--direct=1", "--verify_state_save=0", "--randseed=7",
            "--filename=" + dev, "--name=remote", "--rw=randwrite", "--bs=4k", "--offset=8M",
            "--size=4M", "--iodepth=8", "--verify=crc32c"] + list(args)
    return HOST2.run(*argv) if in_h2 else run(*argv)


def test_remote_host_in_netns_attach_fio_detach_revoke(node):
    vol = make_volume(node)
    uri = uri_of(vol, NVME)
    assert vol["uri"][0] == uri
    assert uri.startswith("nvme+tcp://%s:%d/nqn.2014-08.org.zfs-ng:" % (NODE_IP, PORT))
    subnqn = uri.split("/", 3)[3]

    res = h2("Datapath.attach", uri=uri, domain="7")
    dev = impl(res, "BlockDevice")["path"]
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert h2("Datapath.attach", uri=uri, domain="7") == res
    # connected as /etc/nvme/hostnqn of the netns, with its host id
    ctrls = nvme_host.controllers(subnqn, H2_NQN)
    assert len(ctrls) == 1
    assert open("/sys/class/nvme/%s/hostid" % ctrls[0]).read().strip() == H2_ID
    # the TCP connections belong to the netns: host end 10.77.0.2 in there, and
    # the node's root netns holds only the target's end of them
    host_side = tcp_ends(in_h2=True, dst="%s:%d" % (NODE_IP, PORT))
    assert host_side and all(l.startswith(HOST_IP + ":") for l, _ in host_side)
    node_side = tcp_ends(src="%s:%d" % (NODE_IP, PORT))
    assert sorted(p for _, p in node_side) == sorted(l for l, _ in host_side)
    assert tcp_ends(dst="%s:%d" % (NODE_IP, PORT)) == []
    assert served(subnqn)["allowed_hosts"] == [H2_NQN]

    h2("Datapath.activate", uri=uri, domain="7")
    fio(dev, "--do_verify=1", in_h2=True)
    HOST2.run(sys.executable, "-c", "import os; fd = os.open(%r, os.O_WRONLY); "
          "os.pwrite(fd, (b'%%08d' %% 31) * %d, %d); os.fsync(fd)" % (dev, MiB // 8, 40 * MiB))
    h2("Datapath.deactivate", uri=uri, domain="7")
    h2("Datapath.detach", uri=uri, domain="7")
    h2("Datapath.detach", uri=uri, domain="7")

    assert nvme_host.controllers(subnqn, H2_NQN) == []
    assert not os.path.exists(dev) or nvme_host.find_namespace(vol["key"]) is None
    assert tcp_ends(in_h2=True, dst="%s:%d" % (NODE_IP, PORT)) == []
    with pytest.raises(ControlError):          # the node revoked its last host
        served(subnqn)
    assert plain_connect(subnqn).returncode != 0
    # the data is on the zvol: read back on the node through the raw datapath
    raw = uri_of(vol, RAW)
    rdev = impl(call(RAW, "Datapath.attach", uri=raw, domain="u0_check"), "BlockDevice")["path"]
    try:
        call(RAW, "Datapath.activate_readonly", uri=raw, domain="u0_check")
        assert pread(rdev, 40 * MiB, MiB) == pattern(31, MiB)
        # fio's blocks, checked on the node (verify_only rereads all 4 MiB)
        job = json.loads(fio(rdev, "--verify_only", "--output-format=json").stdout)["jobs"][0]
        assert job["read"]["io_bytes"] == 4 * MiB and job["error"] == 0
    finally:
        call(RAW, "Datapath.detach", uri=raw, domain="u0_check")


def test_remote_host_refused_ungranted_and_activated_on_another_host(node):
    vol = make_volume(node)
    uri = uri_of(vol, NVME)
    subnqn = uri.split("/", 3)[3]
    dev_a = impl(call(NVME, "Datapath.attach", uri=uri, domain="3", env=A),
                 "BlockDevice")["path"]
    call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    # h2 was not granted: its own plain `nvme connect` is refused by the target
    p = plain_connect(subnqn)
    assert p.returncode != 0, p.stdout
    assert nvme_host.controllers(subnqn, H2_NQN) == []

    # non-persistent sessions over nvme+tcp are not implemented: said, not faked
    with pytest.raises(PluginError) as e:
        h2("Datapath.open", uri=uri, persistent=False)
    assert e.value.name == "Unimplemented"
    dev_h2 = impl(h2("Datapath.attach", uri=uri, domain="4"), "BlockDevice")["path"]
    assert sorted(served(subnqn)["allowed_hosts"]) == sorted([HOST_A, H2_NQN])
    for m in ("Datapath.activate", "Datapath.activate_readonly"):
        with pytest.raises(PluginError) as e:
            h2(m, uri=uri, domain="4")
        assert e.value.name == "Activated_on_another_host"
        assert e.value.params[1] == HOST_A
    pwrite(dev_a, 0, pattern(32, 64 * 1024))
    call(NVME, "Datapath.deactivate", uri=uri, domain="3", env=A)
    h2("Datapath.activate", uri=uri, domain="4")      # migrated to h2
    assert pread(dev_h2, 0, 64 * 1024) == pattern(32, 64 * 1024)
    with pytest.raises(PluginError) as e:
        call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    assert e.value.name == "Activated_on_another_host"
    assert e.value.params[1] == H2_NQN

    # h2 dies holding it read-write (controller gone, its /run lost): its claim
    # stays on the node until the admin revokes it there
    for c in nvme_host.controllers(subnqn, H2_NQN):
        assert nvme_host.disconnect(c)
    shutil.rmtree(H2["ZFSNG_RUN_DIR"])
    with pytest.raises(PluginError) as e:
        call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    assert e.value.params[1] == H2_NQN
    p = subprocess.run([sys.executable, "-m", "sr_tools", "vol", "export", node, vol["key"],
                        "--to-host", H2_NQN, "--stop", "--json"], cwd=ROOT,
                       env=dict(os.environ, ZFSNG_TARGET_SOCKET=SOCK), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 0 and json.loads(p.stdout)["exported"] is False, p.stderr
    # h2 is revoked while host A keeps the volume
    assert served(subnqn)["allowed_hosts"] == [HOST_A]
    assert plain_connect(subnqn).returncode != 0
    call(NVME, "Datapath.activate", uri=uri, domain="3", env=A)
    assert pread(dev_a, 0, 64 * 1024) == pattern(32, 64 * 1024)
    assert nvme_host.controllers(subnqn, HOST_A)
    call(NVME, "Datapath.detach", uri=uri, domain="3", env=A)
    with pytest.raises(ControlError):
        served(subnqn)


def h2_cli(*args):
    p = HOST2.run(sys.executable, "-m", "sr_tools", "vol", *args, env=HOST2.environ(), cwd=ROOT,
                  timeout=300)
    assert "Traceback" not in p.stderr, p.stdout + p.stderr
    return json.loads(p.stdout)


def test_remote_host_cli_attach_by_uri(node):
    """The admin CLI on a host without the SR: `zfs-ng vol attach --uri`."""
    vol = make_volume(node)
    uri = uri_of(vol, NVME)
    subnqn = uri.split("/", 3)[3]
    got = h2_cli("attach", "--uri", uri, "--json")
    assert got["mode"] == "rw" and got["device"].startswith("/dev/nvme")
    assert nvme_host.controllers(subnqn, H2_NQN)
    assert [(a["volume"], a["active"], a["datapath"]) for a in h2_cli("attachments", "--json")] \
        == [("%s/%s" % (uri.split(":")[-2], vol["key"]), "rw", NVME)]
    pwrite(got["device"], 0, pattern(33, MiB))
    assert h2_cli("detach", "--uri", uri, "--json")["detached"] is True
    assert nvme_host.controllers(subnqn, H2_NQN) == []
    assert h2_cli("attachments", "--json") == []
    with pytest.raises(ControlError):
        served(subnqn)
