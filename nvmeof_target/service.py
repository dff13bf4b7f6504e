"""`serve()`: the NVMe/TCP target from its options until SIGTERM/SIGINT, what
`zfs-ng target serve` (sr_tools/target_cmds.py) calls.  One process runs one
server.Server; with workers > 1, workers.run_workers forks that many on one
port and keeps the control socket in the parent.  parse_listen() reads the
--listen addresses."""

import logging
import signal

from .registry import Registry
from .server import DEFAULT_PORT, Server
from .target import Target
from .workers import run_workers

log = logging.getLogger("nvmeof_target")


def parse_listen(text):
    """'ADDR:PORT', '[v6]:PORT', 'ADDR' or ':PORT' -> (addr, port)."""
    addr, port = text, DEFAULT_PORT
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = rest[1:]
    elif text.count(":") == 1:
        addr, port = text.split(":")
    try:
        port = int(port)
    except ValueError:
        raise ValueError("bad port in %r" % text)
    if not 0 < port < 65536:
        raise ValueError("bad port in %r" % text)
    return addr or "127.0.0.1", port


def serve(listen, state, control_path, reuse_port=False, workers=1, limits=None,
          file_dirs=None):
    """Run the target until SIGTERM/SIGINT (what `zfs-ng target serve` calls).
    limits: a limits.Limits per process; file_dirs: directories whose regular
    files may be served (besides block devices), see blockio/volpath.py."""
    if workers > 1:
        return run_workers(workers, listen, state, control_path, limits, file_dirs)
    registry = Registry(state)
    target = Target(registry, file_dirs=file_dirs)
    server = Server(target, listen, control_path, reuse_port, limits)
    log.info("%d volumes in %s", registry.count(), state)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        registry.close()
        log.info("stopped")
    return 0
