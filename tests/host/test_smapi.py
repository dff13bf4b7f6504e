"""plugins.smapi: dispatch, parameter checking and the exact error JSON."""

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from plugins import smapi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _create(sr, name, size, sharable, description=""):
    if size < 0:
        raise smapi.InvalidParameters("size must be >= 0")
    return {"sr": sr, "name": name, "size": size, "sharable": sharable}


def _boom():
    raise KeyError("oops")


METHODS = [
    smapi.Method("Volume", "create", _create, [
        smapi.Param("sr", str), smapi.Param("name", str), smapi.Param("size", int),
        smapi.Param("sharable", bool), smapi.Param("description", str, optional=True)]),
    smapi.Method("Volume", "destroy", lambda sr, key: (_ for _ in ()).throw(
        smapi.VolumeDoesNotExist(key)), [smapi.Param("sr", str), smapi.Param("key", str)]),
    smapi.Method("Plugin", "diagnostics", lambda: _boom()),
    smapi.Method("SR", "set_keys", lambda keys: sorted(keys), [smapi.Param("keys", dict)]),
]


def run(argv0, line, *args):
    out = io.StringIO()
    rc = smapi.main(METHODS, [argv0] + list(args or ["--json"]), io.StringIO(line), out)
    return rc, out.getvalue()


def check_error_shape(doc):
    assert set(doc) == {"code", "params", "backtrace"}
    assert doc["code"] == "SR_BACKEND_FAILURE"
    assert all(isinstance(p, str) for p in doc["params"]) and len(doc["params"]) == 2
    bt = doc["backtrace"]
    assert set(bt) == {"error", "files", "lines"}
    assert isinstance(bt["error"], str)
    assert all(isinstance(f, str) for f in bt["files"])
    assert all(isinstance(n, int) for n in bt["lines"])
    assert len(bt["files"]) == len(bt["lines"])


def test_dispatch_is_case_insensitive_on_basename():
    line = json.dumps({"sr": "p", "name": "n", "size": 0, "sharable": False, "dbg": "x"})
    rc, out = run("/usr/libexec/x/volume.CREATE", line)
    assert rc == 0
    assert json.loads(out) == {"sr": "p", "name": "n", "size": 0, "sharable": False}
    assert out.count("\n") == 1


def test_unit_result_is_null():
    m = [smapi.Method("SR", "detach", lambda sr: None, [smapi.Param("sr", str)])]
    out = io.StringIO()
    assert smapi.main(m, ["SR.detach", "--json"], io.StringIO('{"sr":"a","dbg":"d"}'), out) == 0
    assert out.getvalue() == "null\n"


@pytest.mark.parametrize("args,needle", [
    ({"sr": "p", "name": "n", "size": 0}, "missing parameter 'sharable'"),
    ({"sr": "p", "name": "n", "size": "1", "sharable": False}, "'size' must be int"),
    ({"sr": "p", "name": "n", "size": True, "sharable": False}, "'size' must be int"),
    ({"sr": 3, "name": "n", "size": 1, "sharable": False}, "'sr' must be string"),
    ({"sr": "p", "name": "n", "size": 1, "sharable": 1}, "'sharable' must be bool"),
])
def test_parameter_checking(args, needle):
    rc, out = run("Volume.create", json.dumps(args))
    assert rc == 1
    doc = json.loads(out)
    check_error_shape(doc)
    assert doc["params"][0] == "Invalid_parameters"
    assert needle in doc["params"][1]


def test_map_parameter_values_must_be_strings():
    rc, out = run("SR.set_keys", json.dumps({"keys": {"a": 1}}))
    assert rc == 1 and "'keys' must be object" in json.loads(out)["params"][1]
    rc, out = run("SR.set_keys", json.dumps({"keys": {"b": "1", "a": "2"}}))
    assert rc == 0 and json.loads(out) == ["a", "b"]


def test_not_json_and_not_an_object():
    rc, out = run("Volume.create", "not json")
    check_error_shape(json.loads(out))
    assert rc == 1 and json.loads(out)["params"][0] == "Invalid_parameters"
    rc, out = run("Volume.create", "[1]")
    assert rc == 1 and "JSON object" in json.loads(out)["params"][1]


def test_idl_error_shape():
    rc, out = run("Volume.destroy", json.dumps({"sr": "p", "key": "k1", "dbg": "x"}))
    doc = json.loads(out)
    check_error_shape(doc)
    assert rc == 1
    assert doc["params"] == ["Volume_does_not_exist", "k1"]
    assert doc["backtrace"]["error"] == "k1"
    assert doc["backtrace"]["files"]  # where it was raised


def test_activated_on_another_host_params_as_the_daemon_matches_them():
    doc = smapi.error_json(smapi.ActivatedOnAnotherHost("host-uuid"))
    assert doc["params"] == ["Activated_on_another_host", "host-uuid"]


def test_unexpected_exception_is_error_json_not_traceback():
    rc, out = run("Plugin.diagnostics", "{}")
    doc = json.loads(out)
    check_error_shape(doc)
    assert rc == 1
    assert doc["params"][0] == "Internal_error"
    assert "KeyError" in doc["params"][1]
    assert "Traceback" not in out


def test_unknown_method():
    rc, out = run("Volume.nope", "{}")
    doc = json.loads(out)
    check_error_shape(doc)
    assert rc == 1 and doc["params"] == ["Unimplemented", "Volume.nope"]


def test_help_lists_parameters():
    rc, out = run("Volume.create", "", "--help")
    assert rc == 0
    for p in ("sr", "name", "size", "sharable", "description"):
        assert "\n  %s " % p in out


def test_name_value_arguments_for_admins():
    rc, out = run("Volume.create", "", "sr=p", "name=a b", "size=4096", "sharable=false")
    assert rc == 0
    assert json.loads(out) == {"sr": "p", "name": "a b", "size": 4096, "sharable": False}
    rc, out = run("Volume.create", "", "size=x")
    assert rc == 1 and "not JSON" in json.loads(out)["params"][1]


def test_real_script_via_symlink(tmp_path):
    """Invoked exactly as xapi-storage-script does: argv [script, --json], one stdin line."""
    script = tmp_path / "iface.py"
    script.write_text(textwrap.dedent("""\
        import sys
        sys.path.insert(0, %r)
        from plugins import smapi
        def f(sr):
            print("chatter that must not reach stdout", file=sys.stderr)
            return {"sr": sr}
        sys.exit(smapi.main([smapi.Method("SR", "stat", f, [smapi.Param("sr", str)])]))
        """ % ROOT))
    link = tmp_path / "SR.stat"
    link.symlink_to(script)
    p = subprocess.run([sys.executable, str(link), "--json"], input='{"sr":"p1","dbg":"d"}\n',
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"sr": "p1"}
    p = subprocess.run([sys.executable, str(link), "--json"], input='{"dbg":"d"}\n',
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert p.returncode == 1
    check_error_shape(json.loads(p.stdout))


def test_the_log_writes_one_prefixed_line_to_stderr_and_each_line_to_syslog(capsys):
    """smapi.Log: "zfs-ng[PID] message" on stderr (what the e2e tests and an
    admin running a script read); to syslog one record per line, at the
    record's priority (rsyslog would otherwise show the traceback's newlines
    as #012 in SMlog)."""
    got = []

    class Syslog(object):
        def syslog(self, priority, line):
            got.append((priority, line))
    log = smapi.Log("zfs-ng")
    log.info("plain %s", "text")
    log._syslog = Syslog()
    log.warning("100% sure")            # no args: not %-formatted
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("call %s failed", "X.y")
    err = capsys.readouterr().err
    assert err.startswith("zfs-ng[%d] plain text\nzfs-ng[%d] 100%% sure\n" % (os.getpid(), os.getpid()))
    assert "call X.y failed\nTraceback (most recent call last):" in err and "ValueError: boom" in err
    assert got[0] == (smapi.Log.WARNING, "100% sure")
    assert got[1] == (smapi.Log.ERROR, "call X.y failed")
    assert got[-1] == (smapi.Log.ERROR, "ValueError: boom")
    assert all("\n" not in line for _, line in got)
