"""Datapath pure logic: URI contract, attachment state and locking, the
activation rules, tap-ctl and sysfs parsing.  Real ZFS/tapdisk-free parts;
the devices themselves are covered by tests/e2e/test_datapath*.py in the VM."""

import json
import multiprocessing
import os

import pytest

from plugins import smapi, state, uri
from plugins.datapath import core, nvme_host, tapctl

KEY = "0f8fad5b-d9cb-469f-a165-70867728950e"
SRU = "5b1f2a8e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.fixture(autouse=True)
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZFSNG_RUN_DIR", str(tmp_path / "run"))
    return tmp_path / "run"


# -- URIs -------------------------------------------------------------------------

def test_local_uris():
    u = uri.parse("zfsng-raw://tank/%s" % KEY)
    assert (u.scheme, u.sr, u.key, u.host) == ("zfsng-raw", "tank", KEY, None)
    n = uri.parse("zfsng-nbd://tank/%s" % KEY)
    assert n.volume_id == u.volume_id == "tank/" + KEY


def test_nvme_uri_and_subnqn():
    nqn = uri.subnqn_for(SRU, KEY)
    assert nqn == "nqn.2014-08.org.zfs-ng:%s:%s" % (SRU, KEY)
    u = uri.parse("nvme+tcp://10.0.0.5:4420/" + nqn)
    assert (u.host, u.port, u.sr, u.key, u.subnqn) == ("10.0.0.5", 4420, SRU, KEY, nqn)
    v6 = uri.parse("nvme+tcp://[fd00::1]:4421/" + nqn)
    assert (v6.host, v6.port) == ("fd00::1", 4421)


def test_the_builders_are_read_back_by_parse():
    for scheme in (uri.RAW, uri.NBD):
        u = uri.parse(uri.local_uri(scheme, "tank", KEY))
        assert (u.scheme, u.sr, u.key) == (scheme, "tank", KEY)
    for scheme in (uri.NVME_TCP, uri.NBD_TLS):
        for endpoint, host in (("10.0.0.5:4420", "10.0.0.5"), ("[fd00::1]:4420", "fd00::1")):
            u = uri.parse(uri.remote_uri(scheme, endpoint, SRU, KEY))
            assert (u.scheme, u.host, u.port, u.sr, u.key) == (scheme, host, 4420, SRU, KEY)
            assert u.subnqn == uri.subnqn_for(SRU, KEY)
    with pytest.raises(uri.BadUri):
        uri.local_uri(uri.NVME_TCP, "tank", KEY)
    with pytest.raises(uri.BadUri):
        uri.remote_uri(uri.RAW, "10.0.0.5:4420", SRU, KEY)


@pytest.mark.parametrize("bad", [
    "zfsng-raw://tank/", "zfsng-raw://tank", "file:///x", "zfsng-raw://-o/x",
    "zfsng-raw://tank/a b", "zfsng-raw://tank/../x/y", "zfsng-raw://tank/a;rm",
    "nvme+tcp://host/nqn.2014-08.org.zfs-ng:a:b", "nvme+tcp://h:0/nqn.2014-08.org.zfs-ng:a:b",
    "nvme+tcp://h:4420/nqn.2014-08.org.other:a:b", "nvme+tcp://h:4420/nqn.2014-08.org.zfs-ng:a",
    "nvme+tcp://-h:4420/nqn.2014-08.org.zfs-ng:a:b", "nvme+tcp://h;x:4420/nqn.2014-08.org.zfs-ng:a:b",
])
def test_bad_uris_refused(bad):
    with pytest.raises(uri.BadUri):
        uri.parse(bad)


# -- state ------------------------------------------------------------------------

def test_state_roundtrip_and_cleanup(run_dir):
    with state.locked("tank/k") as st:
        st.attached["3"] = {"scheme": "zfsng-raw"}
    files = os.listdir(str(run_dir / "datapath"))
    assert any(f.endswith(".json") for f in files)
    assert [s["attached"] for s in state.list_states()] == [{"3": {"scheme": "zfsng-raw"}}]
    with state.locked("tank/k") as st:
        assert st.attached == {"3": {"scheme": "zfsng-raw"}}
        st.attached.clear()
    assert state.list_states() == []


def test_state_saved_even_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with state.locked("tank/k") as st:
            st.attached["3"] = {"half": "done"}
            raise RuntimeError("boom")
    with state.locked("tank/k") as st:
        assert st.attached == {"3": {"half": "done"}}


def _bump(run, n):
    os.environ["ZFSNG_RUN_DIR"] = run
    for _ in range(n):
        with state.locked("tank/counter") as st:
            st.shared["n"] = st.shared.get("n", 0) + 1


def test_state_lock_serialises_processes(run_dir):
    procs = [multiprocessing.Process(target=_bump, args=(str(run_dir), 50)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with state.locked("tank/counter") as st:
        assert st.shared["n"] == 200  # lost updates would show here


# -- activation rules -------------------------------------------------------------

class Recorder(core.Datapath):
    """A datapath whose hooks only record calls: it tests the rules of core."""
    scheme = uri.RAW

    def __init__(self, writable=True):
        self.calls = []
        self.writable = writable

    def _attach(self, u, st, domain, rec):
        self.calls.append(("attach", domain))
        return [["BlockDevice", {"path": "/dev/null"}]]

    def _writable(self, u, st):
        return self.writable

    def _activate(self, u, st, domain, rec, mode):
        self.calls.append(("activate", domain, mode))

    def _deactivate(self, u, st, domain, rec):
        self.calls.append(("deactivate", domain))

    def _detach(self, u, st, domain, rec):
        self.calls.append(("detach", domain))

    def _release(self, u, st):
        self.calls.append(("release",))


URI = "zfsng-raw://tank/" + KEY


def err_name(excinfo):
    return excinfo.value.name


def test_attach_activate_idempotent():
    dp = Recorder()
    a = dp.attach(URI, "3")
    assert dp.attach(URI, "3") == a
    dp.activate(URI, "3")
    dp.activate(URI, "3")
    assert dp.calls == [("attach", "3"), ("activate", "3", "rw")]
    dp.deactivate(URI, "3")
    dp.deactivate(URI, "3")
    dp.detach(URI, "3")
    dp.detach(URI, "3")
    assert dp.calls[2:] == [("deactivate", "3"), ("detach", "3"), ("release",), ("release",)]
    assert state.list_states() == []


def test_rw_and_ro_exclusive():
    dp = Recorder()
    for d in ("u0_vbd_0_xvda", "u0_vbd_0_xvdb", "7"):
        dp.attach(URI, d)
    dp.activate_readonly(URI, "u0_vbd_0_xvda")
    dp.activate_readonly(URI, "u0_vbd_0_xvdb")
    with pytest.raises(smapi.BackendError) as e:
        dp.activate(URI, "7")
    assert err_name(e) == "Volume_in_use"
    with pytest.raises(smapi.BackendError) as e:
        dp.activate(URI, "u0_vbd_0_xvda")  # same domain, other mode
    assert err_name(e) == "Activation_mode_conflict"
    dp.deactivate(URI, "u0_vbd_0_xvda")
    dp.detach(URI, "u0_vbd_0_xvdb")  # detach deactivates
    dp.activate(URI, "7")
    with pytest.raises(smapi.BackendError) as e:
        dp.activate_readonly(URI, "u0_vbd_0_xvda")
    assert err_name(e) == "Volume_in_use"


def test_activate_needs_attach_and_snapshots_are_read_only():
    dp = Recorder(writable=False)
    with pytest.raises(smapi.BackendError) as e:
        dp.activate(URI, "3")
    assert err_name(e) == "Not_attached"
    dp.attach(URI, "3")
    with pytest.raises(smapi.BackendError) as e:
        dp.activate(URI, "3")
    assert err_name(e) == "Volume_read_only"
    dp.activate_readonly(URI, "3")


def test_detach_never_fails():
    class Broken(Recorder):
        def _detach(self, u, st, domain, rec):
            raise OSError("device busy")

        def _deactivate(self, u, st, domain, rec):
            raise OSError("cannot close")

    dp = Broken()
    dp.attach(URI, "3")
    dp.activate(URI, "3")
    assert dp.detach(URI, "3") is None
    assert dp.detach("garbage", "3") is None
    assert state.list_states() == []


def test_failed_attach_leaves_nothing():
    class Fails(Recorder):
        def _attach(self, u, st, domain, rec):
            rec["made"] = "something"
            raise OSError("no device")

    dp = Fails()
    with pytest.raises(OSError):
        dp.attach(URI, "3")
    assert ("detach", "3") in dp.calls and ("release",) in dp.calls
    assert state.list_states() == []


def test_bad_parameters_are_smapi_errors():
    dp = Recorder()
    with pytest.raises(smapi.InvalidParameters):
        dp.attach("zfsng-nbd://tank/" + KEY, "3")  # wrong datapath
    with pytest.raises(smapi.InvalidParameters):
        dp.attach(URI, "3; rm -rf /")


def test_entry_point_error_json():
    dp = Recorder()
    ms = core.methods(dp, "test")
    import io
    out = io.StringIO()
    rc = smapi.main(ms, ["Datapath.activate", "--json"],
                    io.StringIO(json.dumps({"uri": URI, "domain": "3", "dbg": "t"}) + "\n"), out)
    assert rc == 1
    err = json.loads(out.getvalue())
    assert err["code"] == "SR_BACKEND_FAILURE" and err["params"][0] == "Not_attached"
    out = io.StringIO()
    assert smapi.main(ms, ["Plugin.Query", "--json"], io.StringIO('{"dbg":"t"}\n'), out) == 0
    assert json.loads(out.getvalue())["required_api_version"] == "5.0"


# -- tap-ctl and sysfs parsing -------------------------------------------------------

def test_tapctl_output_parsing():
    assert tapctl.parse_pid("1234\n") == 1234
    assert tapctl.parse_minor("/dev/xen/blktap-2/tapdev7\n") == 7
    with pytest.raises(tapctl.TapCtlError):
        tapctl.parse_minor("error: no minors")
    rows = tapctl.parse_list("pid=10 minor=0 state=0 args=aio:/dev/zd0\npid=11 minor=1 state=0\n")
    assert rows == [{"pid": "10", "minor": "0", "state": "0", "args": "aio:/dev/zd0"},
                    {"pid": "11", "minor": "1", "state": "0"}]


def test_tapctl_absent(monkeypatch):
    monkeypatch.setenv("ZFSNG_TAP_CTL", "")
    assert tapctl.find() is None


def test_nvme_ids_and_addresses():
    assert nvme_host.normalize_id("0F8FAD5B-D9CB-469F-A165-70867728950E") == KEY.replace("-", "")
    assert nvme_host.normalize_id("uuid." + KEY) == KEY.replace("-", "")
    assert nvme_host.normalize_id("eui.00112233445566778899aabbccddeeff") == \
        "00112233445566778899aabbccddeeff"
    assert nvme_host.normalize_id("0" * 32) is None
    assert nvme_host.parse_address("traddr=127.0.0.1,trsvcid=4420,src_addr=127.0.0.1") == \
        {"traddr": "127.0.0.1", "trsvcid": "4420", "src_addr": "127.0.0.1"}
    # a second host NQN in one machine needs its own, stable host id
    a = nvme_host.hostid_for("nqn.2014-08.org.example:host-a")
    assert a == nvme_host.hostid_for("nqn.2014-08.org.example:host-a")
    assert a != nvme_host.hostid_for("nqn.2014-08.org.example:host-b")


# -- the node transport and the CLI ----------------------------------------------------

def test_node_command_transport_carries_errors(monkeypatch):
    import sys
    from plugins.datapath import node
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", root)
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps([sys.executable, "-m",
                                                         "plugins.node_ops"]))
    with pytest.raises(smapi.SmapiError) as e:
        node.call("claim", subnqn="nqn.2014-08.org.zfs-ng:%s:%s" % (SRU, KEY),
                  hostnqn="nqn.2014-08.org.example:h", mode="rw")
    assert e.value.name == "Not_attached"          # never granted: refused by the node
    with pytest.raises(smapi.SmapiError) as e:
        node.call("claim", subnqn="nqn.2014-08.org.other:x", hostnqn="nqn.2014-08.org.e:h",
                  mode="rw")
    assert e.value.name == "Invalid_parameters"
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", "ssh node")
    with pytest.raises(smapi.InvalidParameters):
        node.call("unclaim", subnqn="x", hostnqn="y")


def test_node_command_hung_or_broken_is_node_unreachable(monkeypatch):
    import sys
    import time
    from plugins.datapath import node
    monkeypatch.setenv("ZFSNG_NODE_TIMEOUT", "1")
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps(
        [sys.executable, "-c", "import time; time.sleep(60)"]))
    t0 = time.time()
    with pytest.raises(smapi.SmapiError) as e:
        node.call("unclaim", subnqn="x", hostnqn="y")
    assert e.value.name == "Node_unreachable" and "within 1 s" in e.value.message
    assert time.time() - t0 < 10
    # a wrapper whose grandchild holds the pipes (sh -c, sudo, ssh's helpers)
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps(["sh", "-c", "sleep 30; true"]))
    t0 = time.time()
    with pytest.raises(smapi.SmapiError) as e:
        node.call("unclaim", subnqn="x", hostnqn="y")
    assert e.value.name == "Node_unreachable" and time.time() - t0 < 10
    monkeypatch.setenv("ZFSNG_NODE_COMMAND", json.dumps(
        [sys.executable, "-c", "import sys; sys.stderr.write('ssh: no route'); sys.exit(255)"]))
    with pytest.raises(smapi.SmapiError) as e:
        node.call("unclaim", subnqn="x", hostnqn="y")
    assert e.value.name == "Node_unreachable" and "ssh: no route" in e.value.message
    monkeypatch.setenv("ZFSNG_NODE_TIMEOUT", "soon")
    with pytest.raises(smapi.InvalidParameters):
        node.call("unclaim", subnqn="x", hostnqn="y")


def test_node_claims_exclude_other_hosts(monkeypatch, tmp_path):
    from plugins.datapath import node
    monkeypatch.setenv("ZFSNG_NODE_RUN_DIR", str(tmp_path / "node"))
    subnqn = "nqn.2014-08.org.zfs-ng:%s:%s" % (SRU, KEY)
    a, b = "nqn.2014-08.org.example:a", "nqn.2014-08.org.example:b"
    with state.locked("nvme:" + subnqn, state.node_state_dir()) as st:
        st.shared["hosts"] = [a, b]              # as grant() leaves it
    node.claim(subnqn, a, "rw")
    node.claim(subnqn, a, "rw")
    for mode in ("rw", "ro"):
        with pytest.raises(smapi.ActivatedOnAnotherHost) as e:
            node.claim(subnqn, b, mode)
        assert e.value.params() == ["Activated_on_another_host", a]
    node.unclaim(subnqn, a)
    node.claim(subnqn, b, "ro")
    node.claim(subnqn, a, "ro")                  # read-only is shared between hosts
    with pytest.raises(smapi.ActivatedOnAnotherHost):
        node.claim(subnqn, a, "rw")


def test_cli_attachments_lists_state():
    from click.testing import CliRunner
    from sr_tools.vol_attach_cmds import group
    with state.locked("tank/" + KEY) as st:
        st.attached["3"] = {"scheme": "zfsng-raw", "device": "/dev/zvol/tank/zfs-ng/" + KEY}
        st.active["3"] = "rw"
    r = CliRunner().invoke(group, ["attachments", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"volume": "tank/" + KEY, "domain": "3",
                                     "datapath": "zfsng-raw", "active": "rw",
                                     "device": "/dev/zvol/tank/zfs-ng/" + KEY}]
    r = CliRunner().invoke(group, ["attachments"])
    assert "zfsng-raw" in r.output and "VOLUME" in r.output


def test_allocmap_file_is_what_nbd_server_loads_and_only_snapshots_get_one(tmp_path):
    from nbd_server.config import load_allocation
    from plugins.datapath import allocmap
    ext = [(0, 4096, 0), (4096, 8192, 3), (12288, 4096, 0)]
    path = allocmap.write(ext, str(tmp_path / "m.json"))
    amap = load_allocation(path)
    assert amap(None, 0, 16384) == [(4096, 0), (8192, 3), (4096, 0)]
    assert amap(None, 16384, 4096) == [(4096, 0)]          # past the map: data (safe)
    assert os.listdir(str(tmp_path)) == ["m.json"]
    # a live volume (writable) changes under the export: never a map
    assert allocmap.snapshot_map({"readonly": False, "dataset": "p/zfs-ng/k"}) is None
    assert allocmap.snapshot_map({"readonly": True, "dataset": "p/zfs-ng/k"}) is None


def test_cli_attach_detach_by_uri_checks_its_arguments():
    from click.testing import CliRunner
    from sr_tools.vol_attach_cmds import group
    for args, msg in ((["attach"], "give SR KEY (or --uri URI)"),
                      (["attach", "--uri", "bogus://x"], "unsupported URI"),
                      (["attach", "p", "k", "--uri", "zfsng-raw://p/k"], "not both"),
                      (["detach", "--uri", "nvme+tcp://h:1/nqn.bad"], "")):
        r = CliRunner().invoke(group, args)
        assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output
