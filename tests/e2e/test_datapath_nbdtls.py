"""nbd+tls with a real second host: the kernel NBD client over TCP + TLS client
certificates, from a network namespace, to the node's one NBD endpoint.

The storage node is the VM's root network namespace: `zfs-ng nbd serve-node`
listens on 10.81.0.1 (its certificate names that address) and serves the node's
grants.  Host "h2" is the namespace zfsng-nt behind a veth pair (10.81.0.2,
tests/e2e/netns.py): its datapath calls run inside it, reach the node through
ZFSNG_NODE_COMMAND (nsenter, the stand-in for ssh) and present h2's client
certificate (CN=h2).  Host "h1" runs in the root namespace next to the node
(node ops in-process: the URI's host is one of its addresses) with CN=h1.

The certificates are tests/e2e/pki/nbdtls/ (the VM image has no openssl:
make-nbdtls-pki.sh made them).  Block devices are not per-namespace: the test
process reads /dev/nbdN and the node's zvol directly.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import make_file_vdevs
from dp_helpers import (PluginError, call, copy_pki, destroy_pool, impl, make_snapshot,
                        make_sr, make_volume, pattern, pread, pwrite, serving_nbd_node)
from netns import HostNs, node_command
from plugins import uri as urimod
from plugins.datapath import node_nbd

NT = "nbd+tls"
NODE_IP, HOST_IP = "10.81.0.1", "10.81.0.2"
PORT = 10811
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PKI = "/run/zfsng-nbdtls-pki"           # copied: keys 0600 whatever 9p shows
MiB = 1 << 20
LOG = os.path.join(ROOT, "build", "nbdtls-serve-node.log")   # kept after the VM is gone


def env_h2(**extra):
    e = {"ZFSNG_RUN_DIR": "/run/zfsng-nt-h2", "ZFSNG_NODE_COMMAND": json.dumps(node_command()),
         "ZFSNG_NBD_CLIENT_DIR": os.path.join(PKI, "h2"), "ZFSNG_HOSTNQN": None,
         "ZFSNG_NODE_TIMEOUT": None}
    e.update(extra)
    return e


H1 = {"ZFSNG_RUN_DIR": "/run/zfsng-nt-h1", "ZFSNG_NODE_COMMAND": None,
      "ZFSNG_NBD_CLIENT_DIR": os.path.join(PKI, "h1")}
HOST2 = HostNs("zfsng-nt", NODE_IP, HOST_IP, "nqn.2014-08.org.zfs-ng:netns-nt",
               "3c0b8a52-6f1e-4d6b-9a1e-1f2e3d4c5b6a", env=env_h2())
h2 = HOST2.datapath                     # h2(METHOD, uri=URI, env=MORE, ...): a call on h2


def h1(method, **params):
    return call(NT, method, env=H1, **params)


def _nbd_devices_of(export, run_dir=""):
    """pids of the nbd-client or nbd+tls relay (nbd_relay.py) serving export
    (with an argument under run_dir: one host's)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and (argv[0].endswith(b"nbd-client") or b"plugins.datapath.nbd_relay" in argv) \
                and export.encode() in argv and run_dir.encode() in b"\0".join(argv):
            out.append(int(pid))
    return out


def connected(dev):
    return subprocess.run(["nbd-client", "-check", dev], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


@pytest.fixture(scope="module")
def node():
    ns = HOST2.setup()
    copy_pki(PKI)
    vdev = make_file_vdevs(1, 1 << 30)[0]
    pool = make_sr(vdev)
    from plugins.volume import sr as srmod
    sr_uuid = srmod.read_root_props(pool)["sr-uuid"]
    serving = contextlib.ExitStack()

    def restart(down_seconds):
        """The node's NBD endpoint killed (-9) and started again after down_seconds."""
        proc = node_["serve"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        serving.close()
        time.sleep(down_seconds)
        node_["serve"] = serving.enter_context(serving_nbd_node(NODE_IP, PORT, PKI, LOG))

    node_ = {"pool": pool, "sr": sr_uuid, "ns": ns, "restart": restart}
    try:
        with serving:
            node_["serve"] = serving.enter_context(serving_nbd_node(NODE_IP, PORT, PKI, LOG))
            yield node_
    finally:
        ns.teardown()
        destroy_pool(pool)
        os.unlink(vdev)
        shutil.rmtree(PKI, ignore_errors=True)


def nt_uri(node, vol, port=PORT):
    return urimod.nbd_tls_uri(NODE_IP, port, node["sr"], vol["key"])


def zvol(node, vol):
    return "/dev/zvol/%s/zfs-ng/%s" % (node["pool"], vol["key"])


def nbdinfo(ns, export, who):
    """libnbd from the host namespace with a client directory of the PKI."""
    return ns.run("nbdinfo", "--json",
                  "nbds://%s:%d/%s?tls-certificates=%s" % (NODE_IP, PORT, export,
                                                            os.path.join(PKI, who)),
                  check=False, timeout=120)


def test_h2_attach_rw_write_read_detach(node):
    vol = make_volume(node["pool"])
    uri = nt_uri(node, vol)
    export = urimod.nbd_tls_export(node["sr"], vol["key"])
    res = h2("Datapath.attach", uri=uri, domain="7")
    dev = impl(res, "BlockDevice")["path"]
    assert dev.startswith("/dev/nbd") and connected(dev)
    assert impl(res, "XenDisk") == {"backend_type": "vbd", "params": dev, "extra": {}}
    assert h2("Datapath.attach", uri=uri, domain="7") == res          # idempotent
    assert node_nbd.lookup("h2", export)["readonly"] is False
    assert node_nbd.lookup("h1", export) is None
    # the TCP connection is h2's: from 10.81.0.2 inside the namespace
    ss = node["ns"].run("ss", "-tnH", "state", "established", "dst",
                        "%s:%d" % (NODE_IP, PORT)).stdout
    assert HOST_IP + ":" in ss, ss
    h2("Datapath.activate", uri=uri, domain="7")
    h2("Datapath.activate", uri=uri, domain="7")
    pwrite(dev, 3 * MiB, pattern(41, MiB))
    assert pread(dev, 3 * MiB, MiB) == pattern(41, MiB)
    assert pread(zvol(node, vol), 3 * MiB, MiB) == pattern(41, MiB)   # on the node's zvol
    pwrite(zvol(node, vol), 9 * MiB, pattern(42, 64 * 1024))
    subprocess.run(["blockdev", "--flushbufs", dev])
    assert pread(dev, 9 * MiB, 64 * 1024) == pattern(42, 64 * 1024)
    h2("Datapath.deactivate", uri=uri, domain="7")
    h2("Datapath.detach", uri=uri, domain="7")
    h2("Datapath.detach", uri=uri, domain="7")                        # never fails
    assert not connected(dev)
    assert node_nbd.lookup("h2", export) is None                      # grant revoked
    assert _nbd_devices_of(export) == []                              # no relay left
    assert nbdinfo(node["ns"], export, "h2").returncode != 0
    assert not os.listdir("/run/zfsng-nt-h2/datapath") or all(
        not f.endswith(".json") for f in os.listdir("/run/zfsng-nt-h2/datapath"))


def test_one_rw_host_and_snapshot_ro_on_both(node):
    vol = make_volume(node["pool"])
    uri = nt_uri(node, vol)
    dev1 = impl(h1("Datapath.attach", uri=uri, domain="3"), "BlockDevice")["path"]
    h1("Datapath.activate", uri=uri, domain="3")
    pwrite(dev1, 0, pattern(51, MiB))
    dev2 = impl(h2("Datapath.attach", uri=uri, domain="4"), "BlockDevice")["path"]
    assert dev2 != dev1
    for m in ("Datapath.activate", "Datapath.activate_readonly"):
        with pytest.raises(PluginError) as e:
            h2(m, uri=uri, domain="4")
        assert e.value.name == "Activated_on_another_host" and e.value.params[1] == "h1"
    h1("Datapath.deactivate", uri=uri, domain="3")
    h2("Datapath.activate", uri=uri, domain="4")                      # moved to h2
    assert pread(dev2, 0, MiB) == pattern(51, MiB)
    with pytest.raises(PluginError) as e:
        h1("Datapath.activate", uri=uri, domain="3")
    assert e.value.name == "Activated_on_another_host" and e.value.params[1] == "h2"
    h2("Datapath.detach", uri=uri, domain="4")
    h1("Datapath.detach", uri=uri, domain="3")

    snap = make_snapshot(node["pool"], vol["key"])
    suri = nt_uri(node, snap)
    devs = []
    for call_, dom in ((h1, "5"), (h2, "6")):
        d = impl(call_("Datapath.attach", uri=suri, domain=dom), "BlockDevice")["path"]
        with pytest.raises(PluginError) as e:
            call_("Datapath.activate", uri=suri, domain=dom)
        assert e.value.name == "Volume_read_only"
        call_("Datapath.activate_readonly", uri=suri, domain=dom)
        devs.append(d)
    for d in devs:
        assert pread(d, 0, MiB) == pattern(51, MiB)
        with pytest.raises(OSError):
            pwrite(d, 0, b"x" * 4096)                                 # the kernel device is ro
    h1("Datapath.detach", uri=suri, domain="5")
    h2("Datapath.detach", uri=suri, domain="6")
    assert not any(connected(d) for d in devs)


def test_other_identities_and_cas_refused(node):
    vol = make_volume(node["pool"])
    uri = nt_uri(node, vol)
    export = urimod.nbd_tls_export(node["sr"], vol["key"])
    h2("Datapath.attach", uri=uri, domain="8")
    try:
        r = nbdinfo(node["ns"], export, "h2")                         # the granted identity
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["exports"][0]["export-size"] == 64 * MiB
        for who in ("h1", "forged"):     # not granted; CN=h2 from another CA
            r = nbdinfo(node["ns"], export, who)
            assert r.returncode != 0 and "export-size" not in r.stdout, who
        # the kernel client with the forged certificate gets no device either
        p = node["ns"].run("nbd-client", NODE_IP, str(PORT), "/dev/nbd15", "-name", export,
                           "-certfile", os.path.join(PKI, "forged", "client-cert.pem"),
                           "-keyfile", os.path.join(PKI, "forged", "client-key.pem"),
                           "-cacertfile", os.path.join(PKI, "forged", "ca-cert.pem"),
                           "-tlshostname", NODE_IP, check=False, timeout=60)
        assert p.returncode != 0 and not connected("/dev/nbd15")
    finally:
        h2("Datapath.detach", uri=uri, domain="8")


def test_node_unreachable_and_endpoint_down(node):
    vol = make_volume(node["pool"])
    uri = nt_uri(node, vol)
    hang = json.dumps([sys.executable, "-c", "import time; time.sleep(300)"])
    t0 = time.time()
    with pytest.raises(PluginError) as e:
        h2("Datapath.attach", uri=uri, domain="9",
           env=env_h2(ZFSNG_NODE_COMMAND=hang, ZFSNG_NODE_TIMEOUT="5"))
    took = time.time() - t0
    assert e.value.name == "Node_unreachable" and took < 60, took
    h2("Datapath.detach", uri=uri, domain="9")
    # the node answers but nothing listens on the URI's port: refused, grant undone
    bad = nt_uri(node, vol, port=PORT + 1)
    export = urimod.nbd_tls_export(node["sr"], vol["key"])
    with pytest.raises(PluginError) as e:
        h2("Datapath.attach", uri=bad, domain="9")
    assert e.value.name == "NBD_client_failed"
    assert node_nbd.lookup("h2", export) is None
    assert _nbd_devices_of(export) == []


def test_node_restart_under_io_loses_nothing(node):
    """The node's NBD endpoint dies (kill -9) under fio's writes from h2 and
    comes back 5 s later: the relay reconnects (the same process: the kernel's
    device never saw the break), the writes that waited complete, fio's
    crc32c verify reads back every block, no I/O error reached the kernel."""
    vol = make_volume(node["pool"], size=64 * MiB)
    uri = nt_uri(node, vol)
    export = urimod.nbd_tls_export(node["sr"], vol["key"])
    dev = impl(h2("Datapath.attach", uri=uri, domain="5"), "BlockDevice")["path"]
    h2("Datapath.activate", uri=uri, domain="5")
    relays = _nbd_devices_of(export)
    assert len(relays) == 1
    mark = "zfsng-test: node restart under I/O begins %d" % os.getpid()
    with open("/dev/kmsg", "w") as f:
        f.write(mark + "\n")
    since = time.time()
    fio = subprocess.Popen(["fio", "--output-format=json", "--ioengine=libaio", "--direct=1",
                            "--filename=" + dev, "--name=guest", "--bs=64k", "--iodepth=8",
                            "--size=24M", "--rw=randwrite", "--verify=crc32c",
                            "--verify_state_save=0", "--randseed=7"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           universal_newlines=True)
    try:
        time.sleep(4)
        assert fio.poll() is None, "fio ended before the node went away"
        node["restart"](5)
        out, err = fio.communicate(timeout=900)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    took = time.time() - since
    assert fio.returncode == 0, err[-2000:]
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["write"]["io_bytes"] == 24 * MiB
    assert job["read"]["io_bytes"] == 24 * MiB                       # the verify pass
    assert _nbd_devices_of(export) == relays                         # reconnected, not replaced
    kmsg = subprocess.run(["dmesg"], stdout=subprocess.PIPE, universal_newlines=True).stdout
    name = os.path.basename(dev)
    after = kmsg.split(mark)[-1].splitlines()
    bad = [line for line in after if name in line and
           ("error" in line.lower() or "fail" in line.lower() or "timed out" in line)]
    assert not bad, bad
    print("fio with a node restart (5 s down): %.1f s" % took)
    h2("Datapath.deactivate", uri=uri, domain="5")
    h2("Datapath.detach", uri=uri, domain="5")
    assert _nbd_devices_of(export) == []


def test_a_dead_hosts_hold_is_released_from_the_cli(node):
    """h2 "dies" holding a volume read-write over nbd+tls (no deactivate, no
    detach): h1 is refused (Activated_on_another_host).  On the node,
    `zfs-ng vol holders` names h2 and `zfs-ng vol release` fences it: h2's
    connection is cut and its relay, refused on reconnecting, ends (h2's
    next write fails, nothing of it lands); h1 then activates and reads what
    h2 wrote before."""
    from click.testing import CliRunner
    from sr_tools.vol_attach_cmds import group

    def cli(*args):
        r = CliRunner().invoke(group, list(args))
        return r.exit_code, r.output

    vol = make_volume(node["pool"])
    uri = nt_uri(node, vol)
    export = urimod.nbd_tls_export(node["sr"], vol["key"])
    dev2 = impl(h2("Datapath.attach", uri=uri, domain="4"), "BlockDevice")["path"]
    h2("Datapath.activate", uri=uri, domain="4")
    pwrite(dev2, 0, pattern(61, MiB))
    dev1 = impl(h1("Datapath.attach", uri=uri, domain="6"), "BlockDevice")["path"]
    with pytest.raises(PluginError) as e:
        h1("Datapath.activate", uri=uri, domain="6")
    assert e.value.name == "Activated_on_another_host"
    rc, out = cli("holders", node["pool"], vol["key"], "--json")
    assert rc == 0, out
    rows = {r["holder"]: r for r in json.loads(out)}
    assert rows["h2"] == {"holder": "h2", "transport": "nbd+tls", "granted": True,
                          "active": "rw"}
    assert rows["h1"]["granted"] is True and rows["h1"]["active"] == "-"
    time.sleep(1.5)                       # the server re-checks a grant at most every second
    rc, out = cli("release", node["pool"], vol["key"], "h2", "--json")
    assert rc == 0 and json.loads(out) == {"holder": "h2", "transport": "nbd+tls",
                                           "released": True}, out
    assert node_nbd.lookup("h2", export) is None
    with pytest.raises(OSError):
        pwrite(dev2, MiB, pattern(62, 64 * 1024))            # cut: EIO, not written
    deadline = time.time() + 60
    while _nbd_devices_of(export, "/run/zfsng-nt-h2/") and time.time() < deadline:
        time.sleep(0.5)
    assert _nbd_devices_of(export, "/run/zfsng-nt-h2/") == [], "h2's relay did not end"
    assert len(_nbd_devices_of(export, "/run/zfsng-nt-h1/")) == 1          # h1's goes on
    assert pread(zvol(node, vol), MiB, 64 * 1024) != pattern(62, 64 * 1024)
    h1("Datapath.activate", uri=uri, domain="6")
    assert pread(dev1, 0, MiB) == pattern(61, MiB)
    assert cli("release", node["pool"], vol["key"], "h2", "--json")[0] == 0   # idempotent
    h2("Datapath.detach", uri=uri, domain="4")                                # never fails
    h1("Datapath.deactivate", uri=uri, domain="6")
    h1("Datapath.detach", uri=uri, domain="6")
