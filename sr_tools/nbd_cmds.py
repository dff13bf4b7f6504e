"""`zfs-ng nbd ...`: run zfs-ng's NBD server."""

import click

from sr_tools.output import emit, fail, json_option


@click.group()
def group():
    """NBD exports of volumes and snapshots."""


@group.command()
@click.option("--unix", "unix_path", metavar="PATH", help="Listen on this unix socket.")
@click.option("--tcp", metavar="ADDR:PORT", help="Listen on this TCP address.")
@click.option("--export", "exports", multiple=True, required=True, metavar="NAME=PATH[:ro]",
              help="Serve PATH (zvol, snapshot device, or an image file under --file-dir) as "
              "NAME; :ro for read-only.")
@click.option("--bitmap", "bitmaps", multiple=True, nargs=3, metavar="EXPORT BITMAP FILE",
              help="Serve qemu:dirty-bitmap:BITMAP on EXPORT from a raw (or .b64) CBT bitmap.")
@click.option("--allocation", "allocations", multiple=True, nargs=2, metavar="EXPORT FILE",
              help="base:allocation of EXPORT from a JSON extent map.")
@click.option("--description", "descriptions", multiple=True, nargs=2, metavar="EXPORT TEXT")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM certificate.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM private key.")
@click.option("--tls-required", is_flag=True, help="Refuse clients that do not STARTTLS.")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False),
              help="PEM CA: clients need a certificate it signed (implies --tls-required).")
@click.option("--tls-allow", "tls_allow", multiple=True, metavar="DN",
              help="Client certificate subject allowed, e.g. 'CN=backup1' or 'CN=xo,O=Example' "
              "(repeatable; needs --tls-ca; default: any certificate of the CA).")
@click.option("--max-connections", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Connections at once; when full, one still in its handshake gives way.")
@click.option("--max-per-client", default=32, show_default=True, type=click.IntRange(1),
              help="TCP connections from one client address.")
@click.option("--handshake-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              metavar="SECONDS", help="For the whole handshake, TLS included.")
@click.option("--idle-timeout", default=300.0, show_default=True, type=click.FloatRange(0),
              metavar="SECONDS", help="TCP: between requests, and for a client that reads "
              "no reply (0: none; unix socket clients never idle out).")
@click.option("--request-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1),
              metavar="SECONDS", help="TCP: from a request's first byte to its last.")
@click.option("--max-buffer", default=256 << 20, show_default=True, type=click.IntRange(1),
              metavar="BYTES", help="WRITE payloads held by all connections at once.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Requests of one connection executed at once (>1: overlap slow zvol I/O).")
@click.option("--file-dir", "file_dirs", multiple=True, metavar="DIR",
              help="Image files under DIR may be exported too (default: "
              "$ZFSNG_TARGET_FILE_DIRS, else block devices only).")
@click.option("-v", "--verbose", count=True, help="-v: connections, -vv: every option/request.")
def serve(unix_path, tcp, exports, bitmaps, allocations, descriptions, tls_cert, tls_key,
          tls_required, tls_ca, tls_allow, max_connections, max_per_client, handshake_timeout,
          idle_timeout, request_timeout, max_buffer, workers, file_dirs, verbose):
    """Serve exports until SIGTERM.

    Example: zfs-ng nbd serve --unix /run/zfs-ng/nbd.sock
    --export vol1=/dev/zvol/tank/vol1 --export snap1=/dev/zvol/tank/vol1@s1:ro
    --bitmap snap1 since-s0 /run/zfs-ng/s0-s1.cbt
    """
    from nbd_server import service  # imported here so `zfs-ng --help` stays fast
    try:
        service.serve(unix_path=unix_path, tcp=tcp, exports=exports, bitmaps=bitmaps,
                      allocations=allocations, descriptions=descriptions, tls_cert=tls_cert,
                      tls_key=tls_key, tls_required=tls_required, tls_ca=tls_ca,
                      tls_allow=tls_allow, max_connections=max_connections, workers=workers,
                      verbose=verbose, max_per_client=max_per_client,
                      handshake_timeout=handshake_timeout, idle_timeout=idle_timeout,
                      request_timeout=request_timeout, max_buffer=max_buffer,
                      file_dirs=list(file_dirs) or None)
    except service.UsageError as e:
        fail(str(e))


@group.command("ls")
@click.option("--unix", "unix_path", metavar="PATH", help="The server's unix socket.")
@click.option("--tcp", metavar="ADDR:PORT", help="The server's TCP address.")
@json_option
def ls(unix_path, tcp, as_json):
    """List the exports of a running NBD server (any NBD server)."""
    from nbd_server.client import NbdError, list_exports
    from nbd_server.server import parse_tcp

    if bool(unix_path) == bool(tcp):
        fail("give one of --unix PATH or --tcp ADDR:PORT")
    try:
        rows = list_exports(unix_path=unix_path, tcp=parse_tcp(tcp) if tcp else None)
    except NbdError as e:
        fail(str(e))
    except (OSError, ValueError) as e:
        fail("%s: %s" % (unix_path or tcp, e))
    if not as_json:
        for r in rows:
            r["contexts"] = ",".join(r.get("contexts", [])) or "-"
    emit(rows, as_json, columns=["name", "size", "readonly", "multi_conn", "contexts",
                                 "description"])


from sr_tools.nbd_node_cmds import serve_node  # noqa: E402 (the storage node's endpoint)
group.add_command(serve_node)
