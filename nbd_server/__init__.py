"""zfs-ng's own NBD server: exports of volumes and snapshots with block status
(base:allocation, qemu:dirty-bitmap:NAME) over unix sockets and TCP.

Layout, one concern per module:
  constants     wire constants of the NBD protocol (doc/proto.md)
  handshake     sans-IO option haggling (bytes in -> events and bytes out)
  transmission  sans-IO request parsing, reply encoding, command execution
  extents       block status providers (file holes, dirty bitmaps, extent maps)
  exports       export definitions and the shared, refcounted Backends
  server        sockets, threads, signals
  run           start/stop a server in a background process (datapath plugins)
  client        the one NBD client: list a server's exports (`nbd ls`), read one (backups)
  config        export definitions from the command line and files
  nbdkit_plugin the same volumes behind nbdkit's python plugin
"""
