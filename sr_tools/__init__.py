"""zfs-ng admin tools: the `zfs-ng` command line."""
