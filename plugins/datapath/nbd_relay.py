"""The nbd+tls relay: this host's kernel NBD device <-> a storage node's
NBD-over-TLS endpoint, surviving a node restart.

    /dev/nbdN <- nbd-client -unix SOCKET -> relay --TCP+TLS--> node (zfs-ng nbd serve-node)

Why a relay: nbd-client's own TLS (a proxy process it forks) dies with the TCP
connection, and the kernel then fails every request: a node restart (service
restart, upgrade) would break the disks of every VM on the host.  nbd-client
-persist does not help (ignored with netlink; with ioctls the device fails
every request until it has reconnected).  The relay keeps the kernel's side
open and, when the node's side breaks, reconnects (TLS with this host's client
certificate, NBD_OPT_GO for the same export: same size, no flag fewer) and
sends again what the node had not answered; with nbd_server/relay.py's log,
nothing the node acknowledged is lost even if it crashed.  The kernel sees
slow requests, not errors, as long as the node is back within
reconnect-seconds (60 by default, under nbd-client's -timeout 90 after which
the kernel gives a request up).  A node that answers but refuses the export
(the grant was revoked: detached or fenced) ends the relay at once, and so
does one that stays away past reconnect-seconds: the kernel's side is closed
and its I/O fails.

    python3 -m plugins.datapath.nbd_relay --socket PATH --host HOST --port N
        --export NAME --cert C --key K --ca CA [--tls-hostname NAME]
        [--reconnect-seconds S]

Start-up: opens the export on the node, listens on the unix socket (0600),
prints one JSON line on stdout, {"ready": true, "pid", "size", "readonly"} or
{"error": MESSAGE} (exit 1), and closes stdout.  It then serves one client,
the nbd-client that hands the socket to the kernel, and ends when that client
disconnects (nbd-client -disconnect).  start() launches it for the datapath
(its own session: it outlives the plugin call) and alive() recognises it.
Logs: syslog (SMlog on XCP-ng), as zfs-ng.
"""

import argparse
import json
import os
import selectors
import signal
import socket
import ssl
import subprocess
import sys
import time

from nbd_server import constants as C
from nbd_server.client import Connection, NbdError, NbdRefused
from nbd_server.exports import Export
from nbd_server.handshake import Closed, Handshake, Ready, transmission_flags
from nbd_server.relay import Relay
from nbd_server.transmission import ProtocolError
from plugins import smapi

RECONNECT_SECONDS = 60
STALL_SECONDS = 30             # requests waiting this long on a silent node: the link is dead
CHUNK = 256 << 10
MAX_QUEUED = 64 << 20          # requests queued for the node before the kernel is read again


class RelayFailed(Exception):
    pass


# -- the launcher (the datapath plugin's side) ----------------------------------------

def _command(args):
    return [sys.executable, "-m", "plugins.datapath.nbd_relay"] + args


def start(sock_path, host, port, export, cert, key, ca, tls_hostname=None,
          reconnect_seconds=RECONNECT_SECONDS, timeout=60.0):
    """Launch the relay for one export and wait until it listens on
    sock_path -> {"pid", "size", "readonly"}; raises RelayFailed."""
    args = ["--socket", sock_path, "--host", host, "--port", str(int(port)),
            "--export", export, "--cert", cert, "--key", key, "--ca", ca,
            "--reconnect-seconds", str(int(reconnect_seconds))]
    if tls_hostname:
        args += ["--tls-hostname", tls_hostname]
    env = dict(os.environ)
    top = os.path.dirname(os.path.dirname(os.path.abspath(smapi.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([top] + [p for p in env.get("PYTHONPATH", "").split(
        os.pathsep) if p])
    try:
        p = subprocess.Popen(_command(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, close_fds=True, cwd="/", env=env,
                             start_new_session=True)
    except OSError as e:
        raise RelayFailed("cannot start the NBD relay: %s" % e.strerror)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    line = b""
    deadline = time.time() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.time()
        if left <= 0 or not sel.select(left):
            p.kill()
            p.wait()
            raise RelayFailed("the NBD relay did not start within %.0f s" % timeout)
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        line += chunk
    sel.close()
    p.stdout.close()
    try:
        doc = json.loads(line.decode("utf-8", "replace"))
    except ValueError:
        doc = {"error": "the NBD relay ended without a word (exit %s)" % p.poll()}
    if not doc.get("ready"):
        p.wait()
        raise RelayFailed(doc.get("error") or "the NBD relay failed")
    # it runs on in its own session; the plugin process does not wait for it
    return {"pid": p.pid, "size": doc["size"], "readonly": doc["readonly"]}


def alive(pid, sock_path):
    """Is pid the relay serving sock_path?"""
    try:
        with open("/proc/%d/cmdline" % int(pid), "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError, TypeError):
        return False
    return b"plugins.datapath.nbd_relay" in argv and sock_path.encode() in argv


def stop(pid, sock_path, wait=10.0):
    """Make sure the relay of sock_path is gone (it ends by itself once its
    client disconnected; TERM after `wait` s).  Never fails."""
    deadline = time.time() + wait
    while alive(pid, sock_path) and time.time() < deadline:
        time.sleep(0.1)
    if alive(pid, sock_path):
        try:
            os.kill(int(pid), signal.SIGTERM)
        except OSError:
            pass
    try:
        os.unlink(sock_path)
    except OSError:
        pass


# -- the relay process ----------------------------------------------------------------

class _Sized(object):
    def __init__(self, size):
        self.size = size
        self.physical_block_size = 4096


class _OneExport(object):
    """The handshake's export table: the node's export, as the node gave it."""

    def __init__(self, name, size, readonly):
        self.export = Export(name, None, readonly=readonly, allocation=None)
        self.backend = _Sized(size)

    def get(self, name):
        return self.export if name == self.export.name else None

    def names(self):
        return [self.export.name]

    def acquire(self, name):
        return self.backend

    def release(self, name):
        pass


class _Node(object):
    """Opens the export on the node, again after a break."""

    def __init__(self, a):
        self.a = a
        self.ctx = ssl.create_default_context(cafile=a.ca)
        self.ctx.load_cert_chain(a.cert, a.key)
        self.label = "nbd+tls://%s:%d/%s" % (a.host, a.port, a.export)
        self.size = self.flags = None

    def open(self, timeout):
        c = Connection(self.label, tcp=(self.a.host, self.a.port), timeout=timeout,
                       tls=(self.ctx, self.a.tls_hostname or self.a.host))
        try:
            size, flags = c.go(self.a.export)
        except BaseException:
            c.close()
            raise
        if self.size is None:
            self.size, self.flags = size, flags
        elif size != self.size or flags & C.FLAG_READ_ONLY > self.flags & C.FLAG_READ_ONLY:
            c.close()
            raise NbdRefused("%s: the export came back changed (size %d -> %d, flags 0x%x -> "
                             "0x%x)" % (self.label, self.size, size, self.flags, flags))
        c.sock.settimeout(None)
        return c.sock

    def reopen(self, seconds):
        """Reconnect until `seconds` pass; NbdRefused/NbdError when it fails."""
        deadline = time.time() + seconds
        pause = 0.2
        while True:
            try:
                return self.open(max(1.0, min(10.0, deadline - time.time())))
            except NbdRefused:
                raise
            except NbdError as e:
                if time.time() + pause > deadline:
                    raise NbdError("%s: unreachable for %d s: %s" % (self.label, seconds, e))
                time.sleep(pause)
                pause = min(2.0, pause * 2)


def _handshake(sock, table):
    """The client's handshake; -> bytes it sent past it, or None (it left)."""
    hs = Handshake(table, structured=False)
    sock.sendall(hs.data_to_send())
    while True:
        ev = hs.next_event()
        out = hs.data_to_send()
        if out:
            sock.sendall(out)
        if ev is None:
            data = sock.recv(65536)
            if not data:
                return None
            hs.receive_data(data)
        elif isinstance(ev, Ready):
            return hs.leftover()
        elif isinstance(ev, Closed):
            return None


def _client(listener, table, seconds=60.0):
    """The client that stays -> (socket, its first bytes past the handshake),
    or (None, None) after `seconds`.  One that leaves before its first request
    (an nbd-client that lost its /dev/nbdN to another, NLE_BUSY, and goes on
    to the next device) is followed by the next one."""
    deadline = time.time() + seconds
    while True:
        listener.settimeout(max(0.1, deadline - time.time()))
        try:
            down, _ = listener.accept()
        except socket.timeout:
            return None, None
        try:
            down.settimeout(30.0)
            first = _handshake(down, table)
            if first is not None:
                down.settimeout(None)
                first = first or down.recv(CHUNK)     # the kernel's first request, or EOF
                if first:
                    return down, first
        except OSError:
            pass
        down.close()


def _pump(down, up, node, relay, a):
    """Relay until the client leaves (0) or the node is lost for good (1)."""
    sel = selectors.DefaultSelector()
    down.setblocking(False)
    up.setblocking(False)
    sel.register(up, selectors.EVENT_READ)
    down_mask = 0
    heard = time.time()            # the node's last word
    while True:
        # the kernel is read while the node is not too far behind
        want = (selectors.EVENT_READ if len(relay.to_up) <= MAX_QUEUED else 0) | \
            (selectors.EVENT_WRITE if relay.to_down else 0)
        if want != down_mask:
            if not down_mask:
                sel.register(down, want)
            elif not want:
                sel.unregister(down)
            else:
                sel.modify(down, want)
            down_mask = want
        sel.modify(up, selectors.EVENT_READ | (selectors.EVENT_WRITE if relay.to_up else 0))
        events = sel.select(1.0)
        try:
            for key, mask in events:
                if key.fileobj is not down:
                    continue
                if mask & selectors.EVENT_READ:
                    data = down.recv(CHUNK)
                    if not data:
                        _send_up_blocking(up, relay)
                        return 0
                    relay.from_down(data)
                if mask & selectors.EVENT_WRITE and relay.to_down:
                    n = down.send(relay.to_down[:CHUNK])
                    del relay.to_down[:n]
        except ProtocolError as e:
            smapi.log.error("nbd relay %s: the kernel's client broke the protocol: %s",
                            node.label, e)
            return 1
        except OSError as e:
            smapi.log.info("nbd relay %s: the kernel's side ended: %s", node.label, e)
            return 0
        try:
            for key, mask in events:
                if key.fileobj is not up:
                    continue
                if mask & selectors.EVENT_READ:
                    _recv_up(up, relay)
                    heard = time.time()
                if mask & selectors.EVENT_WRITE and relay.to_up:
                    _send_up(up, relay)
            if not relay.waiting():
                heard = time.time()          # only a wait with no word counts
            elif time.time() - heard > a.stall_seconds:
                raise OSError("no reply for %d s" % a.stall_seconds)
        except (OSError, ProtocolError, EOFError) as e:
            smapi.log.warning("nbd relay %s: the node's connection broke (%s); %d requests "
                              "unanswered, reconnecting", node.label, e, relay.unanswered())
            sel.unregister(up)
            up.close()
            relay.lost()
            try:
                up = node.reopen(a.reconnect_seconds)
            except NbdError as e:
                smapi.log.error("nbd relay %s: giving up: %s", node.label, e)
                return 1
            up.setblocking(False)
            relay.made()
            sel.register(up, selectors.EVENT_READ)
            heard = time.time()
            smapi.log.warning("nbd relay %s: reconnected; %d acknowledged writes replayed",
                              node.label, relay.log_size()[0])
        if relay.fatal:
            smapi.log.error("nbd relay %s: %s", node.label, relay.fatal)
            return 1


def _recv_up(up, relay):
    while True:
        try:
            data = up.recv(CHUNK)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        if not data:
            raise EOFError("the node closed the connection")
        relay.from_up(data)
        if not up.pending():
            return


def _send_up(up, relay):
    try:
        n = up.send(relay.to_up[:CHUNK])
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return
    del relay.to_up[:n]


def _send_up_blocking(up, relay):
    """The client's DISC, best effort, on its way out."""
    try:
        up.setblocking(True)
        up.settimeout(5.0)
        if relay.to_up and relay.connected:
            up.sendall(relay.to_up)
    except OSError:
        pass


def _say(doc):
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="nbd_relay")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--export", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--tls-hostname")
    ap.add_argument("--reconnect-seconds", type=int, default=RECONNECT_SECONDS)
    ap.add_argument("--stall-seconds", type=int, default=STALL_SECONDS)
    a = ap.parse_args(argv)
    smapi.setup_logging()
    try:
        node = _Node(a)
        up = node.open(30.0)
    except (NbdError, OSError, ssl.SSLError) as e:
        _say({"error": str(e)})
        return 1
    readonly = bool(node.flags & C.FLAG_READ_ONLY)
    table = _OneExport(a.export, node.size, readonly)
    missing = transmission_flags(table.export, False) & ~node.flags & ~C.FLAG_CAN_MULTI_CONN
    if missing:
        _say({"error": "%s: the node's export lacks flags 0x%x" % (node.label, missing)})
        return 1
    try:
        os.unlink(a.socket)
    except OSError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(a.socket)
    except OSError as e:
        _say({"error": "cannot listen on %s: %s" % (a.socket, e.strerror)})
        return 1
    finally:
        os.umask(old)
    listener.listen(1)
    listener.settimeout(60.0)
    _say({"ready": True, "pid": os.getpid(), "size": node.size, "readonly": readonly})
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        try:
            down, first = _client(listener, table)
        finally:
            listener.close()
            try:
                os.unlink(a.socket)
            except OSError:
                pass
        if down is None:
            smapi.log.error("nbd relay %s: no client came within 60 s", node.label)
            return 1
        relay = Relay()
        relay.from_down(first)
        smapi.log.info("nbd relay %s: serving (pid %d)", node.label, os.getpid())
        return _pump(down, up, node, relay, a)
    except Exception as e:      # a daemon: its end is logged, never a traceback on a tty
        smapi.log.exception("nbd relay %s: %s", node.label, e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
