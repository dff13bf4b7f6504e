"""VM migration between two hosts of a pool on a shared SR (issue 15 item 3),
over both remote transports: host A attaches over nvme+tcp, host C (no
nvme-tcp as far as zfs-ng is told: ZFSNG_REMOTE_DATAPATHS=nbd+tls, as on
XCP-ng 8.3's dom0 kernel) over nbd+tls with its client certificate.

xapi's order for a VM moving between hosts with its VDI on a shared SR
(xenops_server.ml VM_migrate / VM_receive_memory, storage_mux.ml): the
destination attaches the VDI while the source still has it active
(Datapath.attach), the VM is paused, the source deactivates, the destination
activates and the VM runs there; the source detaches after.  Read-write on
one host at a time: the destination's activate is refused until the source
has deactivated (Activated_on_another_host).

The guest's disk I/O is fio with crc32c verify headers: what the VM wrote on
the source is verified (fio --verify_only) on the destination after the
handoff, and the other way back.  Printed: the handoff time (source deactivate
-> destination activate done) and fio's write bandwidth on each transport
(TCG: relative figures only).

Network: the node is the VM's root namespace (10.82.0.1 for NVMe/TCP and the
ssh stand-in, 10.81.0.1 for NBD, the address in the test PKI's node
certificate); A and C are namespaces (tests/e2e/netns.py).
"""

import json
import os
import shutil
import time
import uuid

import pytest

from conftest import make_file_vdevs
from dp_helpers import copy_pki, destroy_pool, impl, serving_nbd_node, serving_target
from netns import HostNs, node_command
from volume_calls import call as node_call

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PKI = "/run/zfsng-migration-pki"
NVME_IP, NBD_IP = "10.82.0.1", "10.81.0.1"
NVME_PORT, NBD_PORT = 4428, 10813
SOCK = "/run/zfs-ng/migration-target.sock"
MiB = 1 << 20
REGION = 24 * MiB

A_NQN = "nqn.2014-08.org.zfs-ng:netns-ma"
C_NQN = "nqn.2014-08.org.zfs-ng:netns-mc"


def host_env(run_dir, schemes, cert_dir=None):
    return {"ZFSNG_RUN_DIR": run_dir, "ZFSNG_NODE_RUN_DIR": None,
            "ZFSNG_NODE_COMMAND": json.dumps(node_command(ZFSNG_TARGET_SOCKET=SOCK)),
            "ZFSNG_HOSTNQN": None, "ZFSNG_TARGET_SOCKET": None, "ZFSNG_HOST_ID": None,
            "ZFSNG_REMOTE_DATAPATHS": schemes, "ZFSNG_NODE_TIMEOUT": None,
            "ZFSNG_NBD_CLIENT_DIR": cert_dir}


def fio(host, dev, offset, *args):
    """fio in host's namespace; (returncode, parsed JSON or None, stderr)."""
    argv = ["fio", "--output-format=json", "--ioengine=libaio", "--direct=1",
            "--filename=" + dev, "--name=guest", "--bs=64k", "--iodepth=8",
            "--offset=%d" % offset, "--size=%d" % REGION, "--verify=crc32c",
            "--verify_state_save=0", "--randseed=%d" % (offset // MiB + 1)] + list(args)
    p = host.run(*argv, check=False, timeout=1200)
    try:
        out = json.loads(p.stdout[p.stdout.index("{"):])
    except ValueError:
        out = None
    return p.returncode, out, p.stderr


@pytest.fixture(scope="module")
def pool_of_hosts():
    ns_a = HostNs("zfsng-ma", NVME_IP, "10.82.0.2", A_NQN,
                  "5a1d3c2b-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
                  env=host_env("/run/zfsng-ma", "nvme+tcp")).setup()
    ns_c = HostNs("zfsng-mc", NBD_IP, "10.81.0.2", C_NQN,
                  "6b2e4d3c-5f6a-4b7c-9d8e-0f1a2b3c4d5e",
                  env=host_env("/run/zfsng-mc", "nbd+tls", os.path.join(PKI, "h2"))).setup()
    copy_pki(PKI)
    vdev = make_file_vdevs(1, 1 << 30)[0]
    config = {"device": vdev, "node": NVME_IP, "nvme-node": "%s:%d" % (NVME_IP, NVME_PORT),
              "nbd-node": "%s:%d" % (NBD_IP, NBD_PORT)}
    config = node_call("SR.create", uuid=str(uuid.uuid4()), configuration=config,
                       name="migration", description="")
    pool = node_call("SR.attach", configuration=config)
    try:
        with serving_nbd_node(NBD_IP, NBD_PORT, PKI,
                              "/var/lib/zfsng-test/migration-serve-node.log"), \
                serving_target("%s:%d" % (NVME_IP, NVME_PORT),
                               "/var/lib/zfsng-test/migration-target.db", SOCK):
            yield {"a": ns_a, "c": ns_c, "config": config, "pool": pool}
    finally:
        ns_a.teardown()
        ns_c.teardown()
        destroy_pool(pool)
        os.unlink(vdev)
        shutil.rmtree(PKI, ignore_errors=True)


def handoff(src, src_uri, dst, dst_uri, dom):
    """Source deactivates, destination activates: seconds between the two."""
    t0 = time.time()
    src.datapath("Datapath.deactivate", uri=src_uri, domain=dom)
    dst.datapath("Datapath.activate", uri=dst_uri, domain=dom)
    took = time.time() - t0
    src.datapath("Datapath.detach", uri=src_uri, domain=dom)
    return took


def bw_mib(out):
    return out["jobs"][0]["write"]["bw_bytes"] / float(MiB)


def test_migration_nvme_to_nbd_and_back_with_fio_verify(pool_of_hosts):
    w = pool_of_hosts
    a, c, config = w["a"], w["c"], w["config"]
    sr_a = a.volume("SR.attach", configuration=config)
    sr_c = c.volume("SR.attach", configuration=config)
    assert sr_a == sr_c == "zfs-ng://%s/%s" % (NVME_IP, w["pool"])
    vol = a.volume("Volume.create", sr=sr_a, name="migrating VM's disk", description="",
                   size=4 * REGION, sharable=False)
    uri_a = a.volume("Volume.stat", sr=sr_a, key=vol["key"])["uri"]
    uri_c = c.volume("Volume.stat", sr=sr_c, key=vol["key"])["uri"]
    assert [u.split("://")[0] for u in uri_a] == ["nvme+tcp"], uri_a
    assert [u.split("://")[0] for u in uri_c] == ["nbd+tls"], uri_c
    ua, uc = uri_a[0], uri_c[0]
    dom = "21"                                   # the VM's domid (kept across hosts here)
    figures = {}

    # -- the VM runs on A: its disk over NVMe/TCP
    dev_a = impl(a.datapath("Datapath.attach", uri=ua, domain=dom), "BlockDevice")["path"]
    a.datapath("Datapath.activate", uri=ua, domain=dom)
    rc, out, err = fio(a, dev_a, 0, "--rw=randwrite", "--do_verify=0")
    assert rc == 0 and out["jobs"][0]["error"] == 0, err
    figures["nvme+tcp write MiB/s"] = bw_mib(out)

    # -- migration A -> C: C attaches first, cannot activate while A is active
    dev_c = impl(c.datapath("Datapath.attach", uri=uc, domain=dom), "BlockDevice")["path"]
    err = c.datapath("Datapath.activate", uri=uc, fails=True, domain=dom)
    assert err["params"][0] == "Activated_on_another_host", err
    figures["handoff nvme+tcp -> nbd+tls s"] = handoff(a, ua, c, uc, dom)
    rc, out, err = fio(c, dev_c, 0, "--rw=randwrite", "--verify_only")
    assert rc == 0 and out["jobs"][0]["error"] == 0, ("A's writes, read on C", err)
    rc, out, err = fio(c, dev_c, REGION, "--rw=randwrite", "--do_verify=0")
    assert rc == 0 and out["jobs"][0]["error"] == 0, err
    figures["nbd+tls write MiB/s"] = bw_mib(out)

    # -- and back C -> A
    dev_a = impl(a.datapath("Datapath.attach", uri=ua, domain=dom), "BlockDevice")["path"]
    err = a.datapath("Datapath.activate", uri=ua, fails=True, domain=dom)
    assert err["params"][0] == "Activated_on_another_host", err
    figures["handoff nbd+tls -> nvme+tcp s"] = handoff(c, uc, a, ua, dom)
    for off in (0, REGION):
        rc, out, err = fio(a, dev_a, off, "--rw=randwrite", "--verify_only")
        assert rc == 0 and out["jobs"][0]["error"] == 0, ("verify on A", off, err)
    a.datapath("Datapath.deactivate", uri=ua, domain=dom)
    a.datapath("Datapath.detach", uri=ua, domain=dom)
    print("\nmigration figures (TCG VM): " + json.dumps(
        {k: round(v, 2) for k, v in figures.items()}, sort_keys=True))
    a.volume("SR.detach", sr=sr_a)
    c.volume("SR.detach", sr=sr_c)
