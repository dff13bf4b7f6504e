"""Run one NBD server in a background process (what the datapath plugins call).

    from nbd_server import run
    pid = run.start([{"name": "vol1", "path": "/dev/zvol/tank/vol1"},
                     {"name": "snap1", "path": "/dev/zvol/tank/vol1@s1", "readonly": True,
                      "bitmaps": {"since-s0": "/run/zfs-ng/s0-s1.cbt"},
                      "allocation": "/run/zfs-ng/s1.alloc.json"}],
                    unix_path="/run/zfs-ng/nbd/vol1.sock", log_path="/var/log/zfs-ng/nbd-vol1.log")
    ...  # nbd-client -unix /run/zfs-ng/nbd/vol1.sock /dev/nbd0 -N vol1
    run.stop(pid)

Export dicts: name, path, and optionally readonly (bool), description, bitmaps
({bitmap name: file with the raw CBT bitmap, or base64 text if it ends in .b64}),
allocation (JSON extent map, see nbd_server.config).  start() returns once the
server accepts connections, or raises RuntimeError with the server's own
error message; the server lives in its own session, so it outlives its caller.
stop() sends SIGTERM (clean shutdown: connections closed, socket removed) and
waits; SIGKILL after the timeout.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time


def argv(exports, unix_path=None, tcp=None, tls_cert=None, tls_key=None, tls_required=False,
         max_connections=None, workers=None, verbose=1, tls_ca=None, tls_allow=(), **limits):
    """The command line of a server for these exports (a list, no shell):
    `python3 -m nbd_server --json OPTIONS` (nbd_server.service.serve).
    limits: max_per_client, handshake_timeout, idle_timeout, request_timeout,
    max_buffer (nbd_server/server.py), given only when not None."""
    opts = {"exports": [], "bitmaps": [], "allocations": [], "descriptions": [],
            "verbose": int(verbose or 0)}
    if unix_path:
        opts["unix_path"] = unix_path
    if tcp:
        opts["tcp"] = tcp if isinstance(tcp, str) else "%s:%d" % tuple(tcp)
    for e in exports:
        name, path = e["name"], e["path"]
        if "=" in name:
            raise ValueError("export name %r contains '='" % name)
        opts["exports"].append("%s=%s%s" % (name, path, ":ro" if e.get("readonly") else ""))
        for bname, bpath in sorted((e.get("bitmaps") or {}).items()):
            opts["bitmaps"].append([name, bname, bpath])
        if e.get("allocation"):
            opts["allocations"].append([name, e["allocation"]])
        if e.get("description"):
            opts["descriptions"].append([name, e["description"]])
    if tls_cert:
        opts["tls_cert"], opts["tls_key"] = tls_cert, tls_key
    if tls_required:
        opts["tls_required"] = True
    if tls_ca:
        opts["tls_ca"] = tls_ca
    if tls_allow:
        opts["tls_allow"] = list(tls_allow)
    if max_connections:
        opts["max_connections"] = int(max_connections)
    if workers:
        opts["workers"] = int(workers)
    for k, v in sorted(limits.items()):
        if k not in LIMITS:
            raise TypeError("argv() got an unexpected keyword argument %r" % k)
        if v is not None:
            opts[k] = v
    return [sys.executable, "-m", "nbd_server", "--json", json.dumps(opts, sort_keys=True)]


LIMITS = ("max_per_client", "handshake_timeout", "idle_timeout", "request_timeout", "max_buffer")


def _accepting(unix_path, tcp):
    if unix_path:
        family, address = socket.AF_UNIX, unix_path
    else:
        host, _, port = (tcp if isinstance(tcp, str) else "%s:%d" % tuple(tcp)).rpartition(":")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host.strip("[]"), int(port))
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(address)
        return True
    except OSError:
        return False
    finally:
        s.close()


def start(exports, unix_path=None, tcp=None, log_path=None, timeout=30.0, **kw):
    """Start a server; return its pid once it accepts connections.  Without
    log_path only warnings are logged (to an unlinked temporary file)."""
    if not unix_path and not tcp:
        raise ValueError("start() needs unix_path and/or tcp")
    if not log_path:
        kw.setdefault("verbose", 0)
    cmd = argv(exports, unix_path=unix_path, tcp=tcp, **kw)
    if _accepting(unix_path, tcp):
        raise RuntimeError("another server already listens on %s" % (unix_path or tcp,))
    env = dict(os.environ)
    # The child must import this very package, wherever it was loaded from.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log = open(log_path, "a+b") if log_path else tempfile.TemporaryFile()
    try:
        start_at = log.seek(0, os.SEEK_END)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True, close_fds=True)
        deadline = time.time() + timeout
        while True:
            rc = proc.poll()
            if rc is not None:
                log.seek(start_at)
                err = log.read()[-2000:].decode("utf-8", "replace").strip()
                raise RuntimeError("NBD server exited with status %d: %s" % (rc, err))
            if _accepting(unix_path, tcp):
                return proc.pid
            if time.time() > deadline:
                stop(proc.pid)
                raise RuntimeError("NBD server did not listen within %.0f s" % timeout)
            time.sleep(0.05)
    finally:
        log.close()


def _gone(pid):
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)   # our child: reap it
        return done == pid
    except ChildProcessError:
        try:
            os.kill(pid, 0)                       # started by another process
            return False
        except OSError as e:
            return e.errno == errno.ESRCH


def stop(pid, timeout=10.0):
    """Stop a server started by start(); True if it was running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.time() + timeout
    while not _gone(pid):
        if time.time() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.time() + 5
        time.sleep(0.05)
    return True
