"""`zfs-ng target ...`: run the user-space NVMe/TCP target and manage the volumes
it serves (through its control socket, while it runs)."""

import logging

import click

from sr_tools.output import emit, fail, json_option

socket_option = click.option("--socket", "socket_path", metavar="PATH", envvar="ZFSNG_TARGET_SOCKET",
                             default="/run/zfs-ng/target.sock", show_default=True,
                             help="The target's control socket.")


def _client(socket_path):
    from nvmeof_target.control import Client
    return Client(socket_path)


def _call(socket_path, op, *args, **kw):
    from nvmeof_target.control import ControlError
    try:
        with _client(socket_path) as c:
            return getattr(c, op)(*args, **kw)
    except ControlError as e:
        fail(str(e))


@click.group()
def group():
    """The NVMe/TCP target: one subsystem per volume."""


@group.command()
@click.option("--listen", "listen", multiple=True, metavar="ADDR:PORT", envvar="ZFSNG_TARGET_LISTEN",
              help="Address to serve NVMe/TCP on (repeatable; the variable: space-separated). "
              "Default 127.0.0.1:4420.")
@click.option("--state", metavar="PATH", envvar="ZFSNG_TARGET_STATE",
              default="/var/lib/zfs-ng/target.db", show_default=True,
              help="Registry of served volumes (sqlite), kept across restarts.")
@socket_option
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              envvar="ZFSNG_TARGET_WORKERS",
              help="Worker processes sharing the port (SO_REUSEPORT), e.g. one per core.")
@click.option("--reuse-port", is_flag=True, help="SO_REUSEPORT: several targets share the port.")
@click.option("-v", "--verbose", count=True, help="-v: connections, -vv: every error status.")
def serve(listen, state, socket_path, workers, reuse_port, verbose):
    """Serve NVMe/TCP until SIGTERM."""
    from nvmeof_target.server import parse_listen, serve as run
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="nvmeof_target[%(process)d] %(levelname)s %(message)s")
    try:
        addrs = [parse_listen(x) for x in (listen or ("127.0.0.1:4420",))]
        run(addrs, state, socket_path, reuse_port, workers)
    except (OSError, ValueError) as e:
        fail(str(e))


@group.command()
@click.argument("nqn")
@click.argument("path")
@click.option("--uuid", "vol_uuid", required=True, help="Namespace UUID/NGUID (stable per volume).")
@click.option("--readonly", is_flag=True)
@click.option("--allow", "hosts", multiple=True, metavar="HOSTNQN", help="Host allowed to connect.")
@click.option("--allow-any-host", is_flag=True, help="Any host may connect (default: deny).")
@click.option("--block-size", default="512", show_default=True, type=click.Choice(
    ["512", "1024", "2048", "4096"]))
@socket_option
@json_option
def add(nqn, path, vol_uuid, readonly, hosts, allow_any_host, block_size, socket_path, as_json):
    """Serve the volume at PATH as subsystem NQN."""
    emit(_call(socket_path, "add", nqn, path, vol_uuid, readonly, hosts, allow_any_host,
               int(block_size)), as_json)


@group.command()
@click.argument("nqn")
@socket_option
def rm(nqn, socket_path):
    """Stop serving NQN (connected hosts are disconnected)."""
    _call(socket_path, "remove", nqn)


@group.command()
@click.argument("nqn")
@click.argument("hostnqn")
@socket_option
def allow(nqn, hostnqn, socket_path):
    """Let HOSTNQN connect to NQN."""
    _call(socket_path, "allow", nqn, hostnqn)


@group.command()
@click.argument("nqn")
@click.argument("hostnqn")
@socket_option
def deny(nqn, hostnqn, socket_path):
    """Refuse HOSTNQN (and disconnect it) from NQN."""
    _call(socket_path, "deny", nqn, hostnqn)


@group.command("allow-any-host")
@click.argument("nqn")
@click.option("--off", is_flag=True, help="Back to the allowed-hosts list only.")
@socket_option
def allow_any_host(nqn, off, socket_path):
    """Open NQN to every host (or close it again with --off)."""
    _call(socket_path, "set_allow_any", nqn, not off)


@group.command()
@click.argument("nqn")
@socket_option
@json_option
def resize(nqn, socket_path, as_json):
    """Tell connected hosts that NQN changed size (after zfs set volsize)."""
    emit({"notified_controllers": _call(socket_path, "notify", nqn)}, as_json)


@group.command()
@socket_option
@json_option
def ls(socket_path, as_json):
    """List served volumes."""
    emit(_call(socket_path, "list"), as_json,
         ["nqn", "path", "uuid", "readonly", "allow_any", "allowed_hosts"])


@group.command()
@click.argument("nqn")
@socket_option
@json_option
def show(nqn, socket_path, as_json):
    """One volume, with its connected controllers."""
    emit(_call(socket_path, "get", nqn), as_json)


@group.command()
@socket_option
@json_option
def stats(socket_path, as_json):
    """Volumes, live subsystems, controllers, queues, fds of the running target."""
    emit(_call(socket_path, "stats"), as_json)
