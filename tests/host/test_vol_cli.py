"""`zfs-ng vol` argument handling (no ZFS needed: these fail before any call)."""

from click.testing import CliRunner

from sr_tools.vol_cmds import group, parse_size


def params(name):
    return [(p.name, p.param_type_name) for p in group.commands[name].params
            if p.name != "help"]


def test_shared_arguments_keep_their_order():
    for name in ("snapshot", "clone", "stat"):
        assert params(name) == [("sr", "argument"), ("key", "argument"), ("as_json", "option")]
    assert params("resize") == [("sr", "argument"), ("key", "argument"), ("size", "argument")]
    assert params("set")[:2] == [("sr", "argument"), ("key", "argument")]
    assert params("destroy") == [("sr", "argument"), ("keys", "argument")]
    assert params("ls") == [("sr", "argument"), ("as_json", "option")]


def test_usage_errors():
    r = CliRunner().invoke(group, ["snapshot", "pool"])
    assert r.exit_code == 2 and "Missing argument 'KEY'" in r.output
    r = CliRunner().invoke(group, ["destroy", "pool"])
    assert r.exit_code == 2 and "Missing argument 'KEYS...'" in r.output
    r = CliRunner().invoke(group, ["set", "pool", "k"])
    assert r.exit_code == 1 and "nothing to set" in r.output
    r = CliRunner().invoke(group, ["set", "pool", "k", "--key", "novalue"])
    assert r.exit_code == 1 and "--key expects K=V" in r.output
    r = CliRunner().invoke(group, ["resize", "pool", "k", "lots"])
    assert r.exit_code == 2 and "is not a size" in r.output


def test_sizes():
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("2TiB") == 2 << 40
