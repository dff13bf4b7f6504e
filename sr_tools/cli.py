"""The `zfs-ng` command: one click group per area (sr, vol, target, ...).

Each area lives in its own module next to this one and is registered below.
Every command prints a human table by default and JSON with --json.
"""

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zfs-ng", prog_name="zfs-ng")
def main():
    """zfs-ng: ZFS storage for XCP-ng and NVMe/TCP storage nodes."""
