"""One NBD server process: its options checked, its exports built, served
until SIGTERM.  Two front ends call serve(): the admin CLI (`zfs-ng nbd serve`,
click) and `python3 -m nbd_server --json OPTIONS` (what nbd_server.run spawns
for the datapath plugins: no click, so a dom0 that has click only vendored for
the CLI, and Python 3.6's C locale, do not matter to it)."""

import logging
import ssl

# serve()'s options and their defaults: the JSON front end accepts these only.
DEFAULTS = {
    "unix_path": None, "tcp": None, "exports": (), "bitmaps": (), "allocations": (),
    "descriptions": (), "tls_cert": None, "tls_key": None, "tls_required": False,
    "tls_ca": None, "tls_allow": (), "max_connections": 256, "workers": 1, "verbose": 0,
    "max_per_client": 32, "handshake_timeout": 30.0, "idle_timeout": 300.0,
    "request_timeout": 60.0, "max_buffer": 256 << 20, "file_dirs": None,
}


class UsageError(ValueError):
    """Options that cannot work together, or exports that cannot be served."""


def serve(unix_path=None, tcp=None, exports=(), bitmaps=(), allocations=(), descriptions=(),
          tls_cert=None, tls_key=None, tls_required=False, tls_ca=None, tls_allow=(),
          max_connections=256, workers=1, verbose=0, max_per_client=32, handshake_timeout=30.0,
          idle_timeout=300.0, request_timeout=60.0, max_buffer=256 << 20, export_source=None,
          file_dirs=None):
    """Listen, then serve until SIGTERM.  Raises UsageError before listening
    when the options or exports are wrong.  tls_ca (a PEM CA) makes TLS
    mandatory and requires client certificates it signed; tls_allow limits
    them to these subjects (nbd_server/tlsauth.py).  export_source (an
    exports.DynamicExports, not from JSON) replaces the fixed exports: each
    client sees what it returns for its certificate's CN, so it needs tls_ca.
    file_dirs: where image files may be exported besides block devices (None:
    ZFSNG_TARGET_FILE_DIRS; blockio/volpath.py)."""
    from nbd_server.config import build_exports
    from nbd_server.exports import ExportTable
    from nbd_server import tlsauth
    from nbd_server.server import Server, parse_tcp

    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="nbd_server[%(process)d] %(levelname)s %(message)s")
    if not unix_path and not tcp:
        raise UsageError("give --unix PATH and/or --tcp ADDR:PORT")
    if bool(tls_cert) != bool(tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if tls_required and not tls_cert:
        raise UsageError("--tls-required needs --tls-cert and --tls-key")
    if (tls_ca or tls_allow) and not tls_cert:
        raise UsageError("--tls-ca and --tls-allow need --tls-cert and --tls-key")
    if tls_allow and not tls_ca:
        raise UsageError("--tls-allow needs --tls-ca (the CA that signs client certificates)")
    if tls_ca:
        tls_required = True         # a client that skips TLS would skip the check
    if export_source is not None and (exports or bitmaps or allocations or descriptions):
        raise UsageError("a dynamic export source serves no --export")
    if export_source is not None and not tls_ca:
        raise UsageError("a dynamic export source needs --tls-ca: its exports belong to "
                         "client identities")
    if not 1 <= int(max_connections) <= 65536 or not 1 <= int(workers) <= 64:
        raise UsageError("max_connections must be 1..65536 and workers 1..64")
    if int(max_per_client) < 1 or int(max_buffer) < 1:
        raise UsageError("max_per_client and max_buffer must be at least 1")
    if not float(handshake_timeout) > 0 or not float(request_timeout) > 0 \
            or float(idle_timeout) < 0:
        raise UsageError("handshake and request timeouts must be > 0, idle timeout >= 0")
    try:
        table = export_source if export_source is not None else \
            ExportTable(build_exports(exports, bitmaps, allocations, descriptions,
                                      file_dirs=file_dirs))
        address = parse_tcp(tcp) if tcp else None
        ctx = None
        if tls_cert:
            ctx = tlsauth.server_context(tls_cert, tls_key, tls_ca, tls_allow)
        server = Server(table, unix_path=unix_path, tcp=address, tls_context=ctx,
                        tls_required=tls_required, max_connections=int(max_connections),
                        workers=int(workers), max_per_client=int(max_per_client),
                        handshake_timeout=float(handshake_timeout),
                        idle_timeout=float(idle_timeout), request_timeout=float(request_timeout),
                        max_buffer=int(max_buffer))
        server.listen()
    except (ValueError, OSError, ssl.SSLError) as e:
        raise UsageError(str(e))
    server.install_signal_handlers()
    server.serve_forever()


def options_from_json(doc):
    """serve()'s keyword arguments from the JSON front end's object."""
    if not isinstance(doc, dict):
        raise UsageError("--json takes a JSON object")
    unknown = sorted(set(doc) - set(DEFAULTS))
    if unknown:
        raise UsageError("unknown options: %s" % ", ".join(unknown))
    out = dict(DEFAULTS)
    out.update(doc)
    for k in ("bitmaps", "allocations", "descriptions"):
        out[k] = [tuple(x) for x in out[k]]
    if isinstance(out["tls_allow"], str):
        raise UsageError("tls_allow is a list of identities")
    out["tls_allow"] = list(out["tls_allow"])
    return out
