"""The `zfs-ng sr` / `zfs-ng vol` CLI on real ZFS: tables by default, --json,
one-line errors; the same library code as the plugin, so the plugin sees
what the CLI made."""

import json
import subprocess
import sys

from volume_calls import call


def cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "sr_tools"] + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True)
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def test_cli_sr_and_vol(file_vdevs):
    dev = file_vdevs(1, 512 << 20)[0]
    conf = json.loads(cli("sr", "create", "--device", dev, "--name", "cli sr", "--json").stdout)
    pool = conf["pool"]
    try:
        table = cli("sr", "ls").stdout
        assert table.splitlines()[0].split()[:3] == ["SR", "NAME", "UUID"]
        assert pool in table and "Healthy" in table
        v = json.loads(cli("vol", "create", pool, "--size", "64M", "--name", "disk 1",
                           "--json").stdout)
        assert v["virtual_size"] == 64 << 20 and v["name"] == "disk 1"
        s = json.loads(cli("vol", "snapshot", pool, v["key"], "--json").stdout)
        c = json.loads(cli("vol", "clone", pool, v["key"], "--json").stdout)
        cli("vol", "set", pool, v["key"], "--name", "renamed", "--key", "a=b")
        cli("vol", "resize", pool, v["key"], "128M")
        st = call("Volume.stat", sr=pool, key=v["key"])  # the plugin sees it
        assert st["name"] == "renamed" and st["keys"] == {"a": "b"}
        assert st["virtual_size"] == 128 << 20
        rows = cli("vol", "ls", pool).stdout.splitlines()
        assert rows[0].split()[:2] == ["KEY", "NAME"] and len(rows) == 4
        assert {x["key"] for x in json.loads(cli("vol", "ls", pool, "--json").stdout)} == {
            v["key"], s["key"], c["key"]}
        err = cli("vol", "resize", pool, v["key"], "1M", check=False)
        assert err.returncode == 1 and "Shrink_refused" in err.stderr
        assert err.stderr.count("\n") == 1
        err = cli("vol", "stat", pool, "nope", check=False)
        assert err.returncode == 1 and "Invalid_parameters" in err.stderr
        cli("vol", "destroy", pool, v["key"], s["key"], c["key"])
        assert json.loads(cli("vol", "ls", pool, "--json").stdout) == []
        assert cli("sr", "destroy", pool, check=False).returncode == 1  # needs --yes
        cli("sr", "destroy", pool, "--yes")
        err = cli("sr", "stat", pool, check=False)
        assert err.returncode == 1 and "Sr_not_attached" in err.stderr
    finally:
        subprocess.run(["zpool", "destroy", "-f", pool], stderr=subprocess.DEVNULL)
