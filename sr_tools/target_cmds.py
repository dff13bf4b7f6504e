"""`zfs-ng target ...`: run the user-space NVMe/TCP target and manage the volumes
it serves (through its control socket, while it runs)."""

import logging

import click

from nvmeof_target.limits import Limits
from sr_tools.output import emit, fail, json_option

_LIMITS = Limits()
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
@click.option("--file-dir", "file_dirs", multiple=True, metavar="DIR",
              help="Also serve regular image files under DIR (repeatable; default: block "
              "devices only; the variable ZFSNG_TARGET_FILE_DIRS: ':'-separated).")
@click.option("--max-connections", type=click.IntRange(1), envvar="ZFSNG_TARGET_MAX_CONNECTIONS",
              default=_LIMITS.max_connections, show_default=True,
              help="TCP connections per worker; more are closed at once.")
@click.option("--max-pending", type=click.IntRange(1), envvar="ZFSNG_TARGET_MAX_PENDING",
              default=_LIMITS.max_pending, show_default=True,
              help="Connections without a completed Connect; when full the oldest is closed.")
@click.option("--max-pending-per-host", type=click.IntRange(1),
              envvar="ZFSNG_TARGET_MAX_PENDING_PER_HOST",
              default=_LIMITS.max_pending_per_host, show_default=True,
              help="The same per source address.")
@click.option("--connect-timeout", type=click.FloatRange(0.1), metavar="SECONDS",
              envvar="ZFSNG_TARGET_CONNECT_TIMEOUT", default=_LIMITS.connect_timeout,
              show_default=True,
              help="From accept to a completed ICReq + Connect (+ DH-HMAC-CHAP); then closed.")
@click.option("--conn-buffer", metavar="BYTES[K|M|G]", envvar="ZFSNG_TARGET_CONN_BUFFER",
              default="4M", show_default=True,
              help="Bytes buffered per connection (replies its host has not read, write "
              "data granted); over it the connection is not read until its host catches up.")
@click.option("--total-buffer", metavar="BYTES[K|M|G]", envvar="ZFSNG_TARGET_TOTAL_BUFFER",
              default="256M", show_default=True,
              help="Bytes buffered by all connections of a worker; over it, connections with "
              "unread replies take no new command.")
@click.option("-v", "--verbose", count=True, help="-v: connections, -vv: every error status.")
def serve(listen, state, socket_path, workers, reuse_port, file_dirs, max_connections,
          max_pending, max_pending_per_host, connect_timeout, conn_buffer, total_buffer,
          verbose):
    """Serve NVMe/TCP until SIGTERM."""
    from nvmeof_target.service import parse_listen, serve as run
    logging.basicConfig(level=(logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)],
                        format="nvmeof_target[%(process)d] %(levelname)s %(message)s")
    try:
        addrs = [parse_listen(x) for x in (listen or ("127.0.0.1:4420",))]
        limits = Limits(max_connections, max_pending, max_pending_per_host, connect_timeout,
                        _bytes(conn_buffer, "--conn-buffer"), _bytes(total_buffer, "--total-buffer"))
        run(addrs, state, socket_path, reuse_port, workers, limits, list(file_dirs) or None)
    except (OSError, ValueError) as e:
        fail(str(e))


def _bytes(text, what):
    """'4M' -> 4194304 (K, M, G: powers of 1024)."""
    t = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    try:
        return int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError("%s: not a size: %r" % (what, text))


@group.command()
@click.argument("nqn")
@click.argument("path")
@click.option("--uuid", "vol_uuid", required=True, help="Namespace UUID/NGUID (stable per volume).")
@click.option("--readonly", is_flag=True)
@click.option("--allow", "hosts", multiple=True, metavar="HOSTNQN", help="Host allowed to connect.")
@click.option("--allow-any-host", is_flag=True, help="Any host may connect (default: deny).")
@click.option("--block-size", default="512", show_default=True, type=click.Choice(
    ["512", "1024", "2048", "4096"]))
@click.option("--require-auth", is_flag=True,
              help="Refuse hosts without a DH-HMAC-CHAP key (see `target host-key`).")
@socket_option
@json_option
def add(nqn, path, vol_uuid, readonly, hosts, allow_any_host, block_size, require_auth,
        socket_path, as_json):
    """Serve the volume at PATH as subsystem NQN."""
    emit(_call(socket_path, "add", nqn, path, vol_uuid, readonly, hosts, allow_any_host,
               int(block_size), require_auth), as_json)


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


@group.command("require-auth")
@click.argument("nqn", required=False)
@click.option("--all", "all_", is_flag=True, help="Every volume (discovery never asks).")
@click.option("--off", is_flag=True, help="Hosts without a key are accepted again.")
@socket_option
def require_auth(nqn, all_, off, socket_path):
    """Refuse hosts without a DH-HMAC-CHAP key on NQN (or --all).

    A host that has a key always authenticates, required or not; this
    makes the key mandatory.  Hosts connected without one are disconnected."""
    if bool(nqn) == all_:
        fail("give a subsystem NQN or --all")
    _call(socket_path, "set_auth_required", "*" if all_ else nqn, not off)


_HASHES = ["sha256", "sha384", "sha512"]
_DHGROUPS = ["null", "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192"]
_KEY_HASH = {"none": 0, "sha256": 1, "sha384": 2, "sha512": 3}


@group.group("host-key")
def host_key():
    """DH-HMAC-CHAP keys of hosts (NVMe in-band authentication).

    On the node: `zfs-ng target host-key set HOSTNQN --generate` prints a new
    secret; on the host: `nvme connect ... --dhchap-secret=SECRET`.  A host
    with a key always authenticates; `target require-auth` refuses hosts
    without one.  Keys are kept in the target's registry (mode 0600)."""


def _secret_arg(value, what):
    if value == "-":
        value = click.get_text_stream("stdin").readline().strip()
    from nvmeof_target.auth import parse_secret
    try:
        parse_secret(value)
    except ValueError as e:
        fail("%s: %s" % (what, e))
    return value


@host_key.command("set")
@click.argument("hostnqn")
@click.option("--secret", metavar="DHHC-1:..|-",
              help="The host's secret as `nvme gen-dhchap-key` prints it (- reads a line "
              "from stdin, keeping it off the command line).")
@click.option("--generate", is_flag=True, help="Make a new random host secret and print it.")
@click.option("--ctrl-secret", metavar="DHHC-1:..|-",
              help="Controller secret: the host checks the target too "
              "(nvme connect --dhchap-ctrl-secret).")
@click.option("--generate-ctrl", is_flag=True, help="Make a new controller secret and print it.")
@click.option("--key-hash", type=click.Choice(sorted(_KEY_HASH)), default="none",
              show_default=True, help="For --generate*: the DHHC-1 key transformation "
              "(nvme gen-dhchap-key --hmac); the key is 32 bytes, or the hash's length.")
@click.option("--hash", "hash_name", type=click.Choice(_HASHES), default="sha256",
              show_default=True, help="HMAC picked when the host offers it.")
@click.option("--dhgroup", type=click.Choice(_DHGROUPS), default="ffdhe2048", show_default=True,
              help="DH group picked when the host offers it.")
@socket_option
@json_option
def host_key_set(hostnqn, secret, generate, ctrl_secret, generate_ctrl, key_hash, hash_name,
                 dhgroup, socket_path, as_json):
    """Set HOSTNQN's secret (its controllers reconnect and authenticate)."""
    from nvmeof_target.auth import generate_secret
    if bool(secret) == generate:
        fail("give --secret SECRET or --generate")
    if ctrl_secret and generate_ctrl:
        fail("give --ctrl-secret SECRET or --generate-ctrl, not both")
    out = {"hostnqn": hostnqn}
    if generate:
        secret = out["secret"] = generate_secret(_KEY_HASH[key_hash])
    else:
        secret = _secret_arg(secret, "--secret")
    if generate_ctrl:
        ctrl_secret = out["ctrl_secret"] = generate_secret(_KEY_HASH[key_hash])
    elif ctrl_secret:
        ctrl_secret = _secret_arg(ctrl_secret, "--ctrl-secret")
    _call(socket_path, "set_host_key", hostnqn, secret, ctrl_secret, hash_name, dhgroup)
    out.update(bidirectional=bool(ctrl_secret), hash=hash_name, dhgroup=dhgroup)
    emit(out, as_json)


@host_key.command("rm")
@click.argument("hostnqn")
@socket_option
def host_key_rm(hostnqn, socket_path):
    """Forget HOSTNQN's key (its controllers are disconnected)."""
    _call(socket_path, "remove_host_key", hostnqn)


@host_key.command("ls")
@socket_option
@json_option
def host_key_ls(socket_path, as_json):
    """Hosts with a key (never the secrets)."""
    emit(_call(socket_path, "host_keys"), as_json, ["hostnqn", "bidirectional", "hash", "dhgroup"])


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
         ["nqn", "path", "uuid", "readonly", "allow_any", "allowed_hosts", "require_auth"])


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
