"""The `zfs-ng` command: one click group per area (sr, vol, target, ...).

Each area lives in its own module next to this one (`sr_tools/<area>_cmds.py`,
exposing a click group named `group`) and is registered below.  Every command
prints a human table by default and JSON with --json.
"""

import importlib

import click

# area name -> module; an area whose module is not there yet is simply absent.
AREAS = ("sr", "vol", "target", "nbd", "backup")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zfs-ng", prog_name="zfs-ng")
def main():
    """zfs-ng: ZFS storage for XCP-ng and NVMe/TCP storage nodes."""


def _register():
    for area in AREAS:
        name = "sr_tools.%s_cmds" % area
        try:
            mod = importlib.import_module(name)
        except ImportError as e:
            if getattr(e, "name", None) == name:
                continue
            raise
        main.add_command(mod.group, area)


_register()
