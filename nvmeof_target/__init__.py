"""zfs-ng's user-space NVMe/TCP target: one subsystem (NSID 1) per volume.

Layout, one concern per module (cf. Linux drivers/nvme/target/):
  pdu.py        PDU encoders and the sans-IO stream parser (digests: crc.py)
  command.py    the 64-byte SQE, handler results
  queue.py      the TCP transport: one connection = one queue, a sans-IO state machine
  core.py       a command from transport to handler: SGL checks, fabrics/admin/io dispatch
  fabrics.py    Connect, Property Get/Set, Authentication Send/Receive
  auth.py       DH-HMAC-CHAP in-band authentication (state machine, DHHC-1 secrets)
  controller.py controller registers, features, AEN state
  admin.py      admin commands; identify.py, logpages.py, discovery.py data
  io.py         Read/Write(FUA)/Flush/Write Zeroes/DSM on blockio.backend.Backend
  aio.py        reads, writes, flushes in flight by Linux AIO (O_DIRECT, eventfd in the
                loop), from and into fixed slots: no copy of the data on the way
  filespan.py   large reads sent by sendfile from the page cache
  registry.py   the persistent volume table (sqlite3; an idle volume = one row)
  target.py     live subsystems, controllers, volume changes
  server.py     the selectors event loop of one process
  service.py    `serve()`: one process, or several (workers.py); the CLI's entry
  limits.py     what the network may take: connection slots, deadlines, buffer budgets
  workers.py    several processes on one port (SO_REUSEPORT)
  control.py    the local control socket and its `Client`

Other parts use `nvmeof_target.control.Client`:
    Client(path="/run/zfs-ng/target.sock").add(nqn, path, uuid, readonly=False,
        allowed_hosts=(), allow_any_host=False, block_size=512)
    .remove(nqn) .allow(nqn, hostnqn) .deny(nqn, hostnqn) .set_allow_any(nqn, value)
    .notify(nqn) (= .resize) .get(nqn) .list() .stats()
    .set_host_key(hostnqn, secret, ctrl_secret=None, hash="sha256", dhgroup="ffdhe2048")
    .remove_host_key(hostnqn) .host_keys() .set_auth_required(nqn or "*", value=True)
Errors come back as nvmeof_target.control.ControlError with a message.
"""
