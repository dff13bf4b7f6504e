"""The `zfs-ng` command: one click group per area (sr, vol, target, ...).

Each area lives in its own module next to this one (`sr_tools/<area>_cmds.py`,
exposing a click group named `group`) and is listed in AREAS.  An area's
module is imported when a command of that area runs (or `zfs-ng --help`
lists them), not for every command: `zfs-ng target serve` (the target's
systemd unit) starts without the volume, backup and NBD commands.  Every
command prints a human table by default and JSON with --json.
"""

import importlib

import click

# area name -> its module sr_tools.<area>_cmds
AREAS = ("sr", "vol", "target", "nbd", "backup")


class _Areas(click.Group):
    """A group whose subcommands are AREAS' groups, each imported on use."""

    def list_commands(self, ctx):
        return list(AREAS)

    def get_command(self, ctx, name):
        if name not in AREAS:
            return None
        return importlib.import_module("sr_tools.%s_cmds" % name).group


@click.group(cls=_Areas, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zfs-ng", prog_name="zfs-ng")
def main():
    """zfs-ng: ZFS storage for XCP-ng and NVMe/TCP storage nodes."""
