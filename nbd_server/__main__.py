"""python3 -m nbd_server serve ...: the same command as `zfs-ng nbd serve`,
without loading the other CLI areas (what nbd_server.run spawns)."""

from sr_tools.nbd_cmds import group

group(prog_name="nbd_server")
