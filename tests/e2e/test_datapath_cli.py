"""`zfs-ng vol attach/detach/export/attachments` on real ZFS in the VM."""

import json

import nbd
from click.testing import CliRunner

from dp_helpers import make_snapshot, make_volume, pattern, pwrite
from sr_tools.vol_attach_cmds import group

MiB = 1 << 20


def cli(*args):
    r = CliRunner().invoke(group, list(args))
    return r.exit_code, r.output


def test_cli_attach_export_detach(sr):
    vol = make_volume(sr)
    key = vol["key"]
    rc, out = cli("attach", sr, key, "--json")
    assert rc == 0, out
    got = json.loads(out)
    assert got["mode"] == "rw" and got["device"] == "/dev/zvol/%s/zfs-ng/%s" % (sr, key)
    pwrite(got["device"], 0, pattern(30, MiB))
    rc, out = cli("attachments", "--json")
    assert [(a["domain"], a["active"]) for a in json.loads(out)] == [("u0_cli", "rw")]
    # a second read-write attach elsewhere is refused with a clear message
    rc, out = cli("attach", sr, key, "--domain", "u0_other")
    assert rc == 1 and "Volume_in_use" in out and "Traceback" not in out
    cli("detach", sr, key, "--domain", "u0_other")

    snap = make_snapshot(sr, key)
    rc, out = cli("export", sr, snap["key"], "--json")
    assert rc == 0, out
    link = json.loads(out)["nbd"]
    sock, _, name = link[len("nbd:unix:"):].rpartition(":exportname=")
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    assert h.is_read_only() and h.pread(MiB, 0) == pattern(30, MiB)
    h.shutdown()
    assert cli("export", sr, snap["key"], "--stop")[0] == 0
    assert cli("detach", sr, key)[0] == 0
    rc, out = cli("attachments", "--json")
    assert json.loads(out) == []
    rc, out = cli("attach", sr, "0f8fad5b-d9cb-469f-a165-70867728950e")
    assert rc == 1 and "Volume_does_not_exist" in out
