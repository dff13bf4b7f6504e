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


def test_a_command_imports_only_its_own_area():
    """sr_tools/cli.py: `zfs-ng target serve` (the target's systemd unit, so
    its restart) imports the target's commands, not the volume, SR, NBD or
    backup ones; `zfs-ng --help` still lists every area."""
    import subprocess
    import sys
    code = ("import sys\nfrom sr_tools.cli import main\n"
            "try:\n    main(['target', 'serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.startswith('sr_tools.')))")
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    assert "Serve NVMe/TCP until SIGTERM" in out
    loaded = eval(out.strip().splitlines()[-1])
    assert "sr_tools.target_cmds" in loaded
    assert not set(loaded) & {"sr_tools.vol_cmds", "sr_tools.sr_cmds", "sr_tools.nbd_cmds",
                              "sr_tools.backup_cmds", "sr_tools.vol_attach_cmds"}
    from sr_tools.cli import AREAS, main
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0 and all("  %s " % a in r.output for a in AREAS)
    assert CliRunner().invoke(main, ["nosuch"]).exit_code == 2
