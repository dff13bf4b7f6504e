"""The shared-SR logic that needs no ZFS: the `node` key and the remote SR
string (parsers fuzzed), who is the node, which transport runs a node op, which
volume URIs a host keeps, and SMAPI errors crossing the transport from a real
`python3 -m plugins.node_ops` process.  The SR/Volume calls themselves run
against real ZFS in tests/e2e/test_shared_sr.py."""

import json
import socket
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from plugins import nodes, smapi
from plugins.volume import remote


# -- the node key ------------------------------------------------------------------

@pytest.mark.parametrize("node, want", [
    ("10.0.0.5", (None, "10.0.0.5")),
    ("root@storage-1.example.org", ("root", "storage-1.example.org")),
    ("zfsng@fd00::5", ("zfsng", "fd00::5")),
    ("admin@[fd00::5]", ("admin", "fd00::5")),
])
def test_split_node(node, want):
    assert nodes.split_node(node) == want
    assert nodes.node_string(*want).replace("[", "").replace("]", "") == \
        node.replace("[", "").replace("]", "")


@pytest.mark.parametrize("bad", ["", "-oProxyCommand=x", "root@", "@host", "a b", "ro ot@h",
                                 "host;rm", "h/x", "x@-o", "Root@h", "h:22", 5, None])
def test_bad_nodes_never_reach_ssh(bad):
    with pytest.raises(smapi.InvalidParameters):
        nodes.split_node(bad)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_split_node_fuzz(text):
    try:
        user, host = nodes.split_node(text)
    except smapi.InvalidParameters:
        return
    # what passes can be given to ssh as one argv element without being an option
    dest = nodes.ssh_destination(text)
    assert not dest.startswith("-") and " " not in dest and "\n" not in dest
    assert not host.startswith("-")


def test_ssh_is_the_default_transport_and_the_override_wins(monkeypatch):
    monkeypatch.delenv("ZFSNG_NODE_COMMAND", raising=False)
    argv = nodes.command("192.0.2.200")
    assert argv[:1] == ["ssh"] and "BatchMode=yes" in argv
    assert argv[argv.index("--") + 1] == "root@192.0.2.200"
    assert argv[-3:] == ["python3", "-m", "plugins.node_ops"]
    assert nodes.command("admin@192.0.2.200")[argv.index("--") + 1] == "admin@192.0.2.200"
    assert nodes.command(None) is None                       # the node is here
    assert nodes.command("127.0.0.1") is None                # loopback: here
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps(["nsenter", "x"]))
    assert nodes.command("192.0.2.200") == ["nsenter", "x"]
    assert nodes.command(None) == ["nsenter", "x"]
    assert nodes.command("127.0.0.1") is None


def test_is_local_by_binding_the_address():
    assert nodes.is_local("127.0.0.1") and nodes.is_local("localhost")
    assert not nodes.is_local("192.0.2.200")       # TEST-NET-1, never on this host
    assert not nodes.is_local("no-such-host.invalid")
    # an address of one of this host's interfaces (the one a UDP socket would use)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))
        mine = s.getsockname()[0]
    except OSError:
        mine = None
    finally:
        s.close()
    if mine and not mine.startswith("127."):
        assert nodes.is_local(mine)


def test_identity(monkeypatch):
    monkeypatch.setenv("ZFSNG_HOST_ID", "host-7")
    assert nodes.identity() == "host-7"
    monkeypatch.delenv("ZFSNG_HOST_ID")
    assert nodes.identity()


# -- the remote SR string ------------------------------------------------------------

def test_remote_sr_round_trip():
    s = remote.remote_sr("root@10.1.2.3", "zfsng-abc")
    assert s == "zfs-ng://root@10.1.2.3/zfsng-abc"
    assert remote.parse_remote_sr(s) == ("root@10.1.2.3", "zfsng-abc")
    assert remote.parse_remote_sr("zfsng-abc") is None             # a local SR: the pool
    for bad in ("zfs-ng://", "zfs-ng://host", "zfs-ng://-o/p", "zfs-ng://h/p;x", "zfs-ng://h/"):
        with pytest.raises(smapi.SrDoesNotExist):
            remote.parse_remote_sr(bad)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_parse_remote_sr_fuzz(text):
    for s in (text, remote.PREFIX + text):
        try:
            got = remote.parse_remote_sr(s)
        except smapi.SrDoesNotExist:
            continue
        if got is not None:
            assert remote.remote_sr(*got) == s


# -- the URIs a host keeps -----------------------------------------------------------

URIS = ["zfsng-raw://p/k", "zfsng-nbd://p/k", "nvme+tcp://10.0.0.5:4420/nqn.x:y",
        "nbd+tls://10.0.0.5:10809/sr/k"]


def test_for_this_host_orders_by_what_the_host_has():
    assert remote.for_this_host(URIS, ["nvme+tcp", "nbd+tls"]) == URIS[2:]
    assert remote.for_this_host(URIS, ["nbd+tls", "nvme+tcp"]) == [URIS[3], URIS[2]]
    assert remote.for_this_host(URIS, ["nbd+tls"]) == [URIS[3]]
    assert remote.for_this_host(URIS[:2], ["nvme+tcp", "nbd+tls"]) == []


def test_host_schemes(monkeypatch):
    monkeypatch.setenv("ZFSNG_REMOTE_DATAPATHS", "nbd+tls, nvme+tcp")
    assert remote.host_schemes() == ["nbd+tls", "nvme+tcp"]
    monkeypatch.setenv("ZFSNG_REMOTE_DATAPATHS", "zfsng-raw")
    with pytest.raises(smapi.InvalidParameters):
        remote.host_schemes()
    monkeypatch.delenv("ZFSNG_REMOTE_DATAPATHS")
    want = ["nvme+tcp", "nbd+tls"] if remote._kernel_has("nvme-tcp") else ["nbd+tls"]
    assert remote.host_schemes() == want


def test_results_are_rewritten_for_the_host():
    vol = {"key": "k", "uri": list(URIS)}
    assert remote._rewrite(vol, ["nbd+tls"]) == {"key": "k", "uri": [URIS[3]]}
    assert remote._rewrite([vol, vol], ["nvme+tcp"]) == [{"key": "k", "uri": [URIS[2]]}] * 2
    assert remote._rewrite(None, ["nvme+tcp"]) is None
    # SR.ls's stored records (smapi.Encoded), as a node that is this machine returns them
    assert remote._rewrite(smapi.encoded_list(",".join([json.dumps(vol)] * 2)),
                           ["nvme+tcp"]) == [{"key": "k", "uri": [URIS[2]]}] * 2
    assert vol["uri"] == URIS                                     # not modified in place


# -- a real node process -----------------------------------------------------------

@pytest.fixture
def node_process(monkeypatch, tmp_path):
    """ZFSNG_NODE_COMMAND = this interpreter running the node module: the same
    process an ssh to the node would start."""
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps([sys.executable, "-m",
                                                         "plugins.node_ops"]))
    monkeypatch.setenv("ZFSNG_NODE_RUN_DIR", str(tmp_path))
    monkeypatch.setenv("ZFSNG_REMOTE_DATAPATHS", "nvme+tcp")


def test_errors_of_the_node_cross_unchanged(node_process):
    fn = remote.routed("Volume.stat", lambda **kw: pytest.fail("ran locally"))
    with pytest.raises(smapi.SmapiError) as e:
        fn(sr="zfs-ng://192.0.2.200/zfsng-nopool")      # the node's method table checks
    assert (e.value.name, e.value.message) == ("Invalid_parameters",
                                               "Volume.stat: missing parameter 'key'")
    with pytest.raises(smapi.SmapiError) as e:
        remote._node_call("192.0.2.200", "volume", None, method="Volume.nonesuch", params={})
    assert e.value.name == "Unimplemented"
    with pytest.raises(smapi.SmapiError) as e:
        remote._node_call("192.0.2.200", "volume", None, method="SR.attach", params={})
    assert e.value.name == "Unimplemented"          # attach/detach have their own ops
    with pytest.raises(smapi.SmapiError) as e:
        remote._node_call("192.0.2.200", "volume", None, method="SR.stat",
                          params={"sr": "zfs-ng://h/p"})
    assert e.value.name == "Invalid_parameters"     # no forwarding loops


def test_the_node_answers_sr_ls_as_plain_json(monkeypatch, capsys):
    """SR.ls returns its stored records encoded already (smapi.Encoded); the
    node op `volume` must still answer another host with one JSON document
    (tests/e2e/test_shared_sr.py's sr-scan on B found it could not)."""
    import io
    from plugins import node_ops
    vol = {"key": "k", "uri": list(URIS)}
    ls = smapi.Method("SR", "ls", lambda sr: smapi.encoded_list(json.dumps(vol)),
                      [smapi.Param("sr", str)])
    monkeypatch.setitem(node_ops._METHODS, "SR.ls", ls)
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(
        {"method": "SR.ls", "params": {"sr": "zfsng-pool"}}) + "\n"))
    assert node_ops.main(["volume"]) == 0
    assert json.loads(capsys.readouterr().out) == {"result": [vol]}


def test_local_sr_strings_run_locally(node_process):
    calls = []
    fn = remote.routed("SR.stat", lambda **kw: calls.append(kw) or "here")
    assert fn(sr="zfsng-pool") == "here" and calls == [{"sr": "zfsng-pool"}]


def test_unreachable_node_is_a_clear_error_in_time(monkeypatch):
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps(
        [sys.executable, "-c", "import time; time.sleep(60)"]))
    monkeypatch.setenv("ZFSNG_NODE_TIMEOUT", "2")
    monkeypatch.setenv("ZFSNG_REMOTE_DATAPATHS", "nvme+tcp")
    t0 = time.time()
    with pytest.raises(smapi.SmapiError) as e:
        remote.routed("SR.stat", None)(sr="zfs-ng://192.0.2.200/zfsng-p")
    assert e.value.name == "Node_unreachable" and time.time() - t0 < 15
    # PBD.unplug on a host whose node is gone still succeeds
    assert remote.detach("zfs-ng://192.0.2.200/zfsng-p") is None


def test_attach_refuses_an_sr_other_hosts_cannot_reach(monkeypatch):
    monkeypatch.setattr(remote, "_node_call", lambda node, op, here, **a: {
        "pool": "zfsng-p", "sr_uuid": "u", "nvme-node": None, "nbd-node": None})
    with pytest.raises(smapi.SmapiError) as e:
        remote.attach({"node": "192.0.2.200", "pool": "zfsng-p"})
    assert e.value.name == "SR_not_shareable"
    monkeypatch.setattr(remote, "_node_call", lambda node, op, here, **a: {
        "pool": "zfsng-p", "sr_uuid": "u", "nvme-node": "192.0.2.200:4420", "nbd-node": None})
    assert remote.attach({"node": "192.0.2.200", "pool": "zfsng-p"}) == \
        "zfs-ng://192.0.2.200/zfsng-p"


def test_nvme_auth_values():
    from plugins.volume import names
    assert names.check_auth("required") == "required" and names.check_auth("off") == "off"
    for bad in ("on", "yes", "", None, "required "):
        with pytest.raises(smapi.InvalidParameters):
            names.check_auth(bad)


def test_in_process_ops_are_the_node_table():
    """nodes.call runs the caller's function when the node is here: the same one
    `python3 -m plugins.node_ops OP` would run there."""
    from plugins import node_ops
    from plugins.datapath import node, node_nbd
    for op, fn in node.OPS.items():
        assert node_ops.OPS[op] is fn
    assert set(node_nbd.OPS) <= set(node.OPS)
    assert node_ops.OPS["sr_attach"] is remote.op_sr_attach
    assert node_ops.OPS["sr_detach"] is remote.op_sr_detach
    assert set(node_ops.OPS) == set(node.OPS) | {"volume", "sr_attach", "sr_detach"}
