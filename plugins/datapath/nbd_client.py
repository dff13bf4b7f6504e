"""The kernel NBD client of this host (nbd-client), as xapi's own
nbd_client_manager.py drives it (xen-api python3/libexec/nbd_client_manager.py,
connect_nbd/disconnect_nbd_device): under one host-wide lock, the first
/dev/nbdN that `nbd-client -check` calls free is connected with
`nbd-client -unix PATH /dev/nbdN -timeout 90 -name EXPORT`, then waited for;
disconnect is `nbd-client -disconnect /dev/nbdN`.  (xapi adds -persist; with
the netlink interface of current nbd-client it has no effect, and a server we
stop is stopped on purpose.)

The nbd+tls datapath connects the same way, to the unix socket of its relay
(nbd_relay.py), which does TLS and reconnects: nbd-client's own TLS
(-certfile ...) is not used, its proxy dies with the TCP connection.

This is what gives blkback/tapdisk a block device for a volume served over NBD:
XCP-ng 8.3 has no qdisk backend for guests (qemuback is disabled in the
xcp-ng-xapi-storage spec), so an Nbd implementation alone serves nobody.
"""

import fcntl
import os
import re
import subprocess
import time

_SEARCH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
_DEVICE = re.compile(r"^/dev/nbd([0-9]{1,4})\Z")
MAX_DEVICES = 1000
NLE_BUSY = 25     # nbd-client's netlink "device busy": another connect won the race


class NbdClientError(RuntimeError):
    pass


class Unavailable(NbdClientError):
    """This host has no nbd-client or no nbd kernel module."""


def find():
    """Path of nbd-client, or None.  ZFSNG_NBD_CLIENT overrides ('' = none)."""
    override = os.environ.get("ZFSNG_NBD_CLIENT")
    if override is not None:
        return override or None
    for d in _SEARCH:
        p = os.path.join(d, "nbd-client")
        if os.access(p, os.X_OK):
            return p
    return None


def check_device(dev):
    if not isinstance(dev, str) or not _DEVICE.match(dev):
        raise NbdClientError("not an NBD device: %r" % (dev,))
    return dev


def _run(argv, timeout=120):
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    except OSError as e:
        raise NbdClientError("cannot run %s: %s" % (argv[0], e.strerror))
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise NbdClientError("%s timed out after %d s" % (" ".join(argv[:2]), timeout))
    return p.returncode, out, err


def _connected(client, dev):
    rc, _, _ = _run([client, "-check", dev], timeout=30)
    if rc in (0, 1):
        return rc == 0
    raise NbdClientError("nbd-client -check %s failed (%d)" % (dev, rc))


def _devices():
    if not os.path.isdir("/sys/module/nbd"):
        subprocess.run(["modprobe", "nbd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = []
    for n in range(MAX_DEVICES):
        dev = "/dev/nbd%d" % n
        if not os.path.exists(dev):
            break
        out.append(dev)
    return out


def _lock(run_dir):
    if not os.path.isdir(run_dir):
        os.makedirs(run_dir, 0o700)
    f = open(os.path.join(run_dir, "nbd-client.lock"), "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def connect(unix_path, export, run_dir, timeout=30.0):
    """Connect a free /dev/nbdN to the export on unix_path; return its path."""
    return _connect(["-unix", unix_path], [], export, run_dir, timeout)


def _connect(server, extra, export, run_dir, timeout):
    client = find()
    if client is None:
        raise Unavailable("nbd-client not found (XCP-ng: the nbd package)")
    lock = _lock(run_dir)
    try:
        devs = _devices()
        if not devs:
            raise Unavailable("no /dev/nbdN devices (the nbd kernel module is not loaded)")
        for dev in devs:
            if _connected(client, dev):
                continue
            argv = [client] + server + [dev, "-timeout", "90", "-name", export] + extra
            rc, out, err = _run(argv)
            if rc == NLE_BUSY:
                continue
            if rc != 0:
                raise NbdClientError("nbd-client %s failed (%d): %s"
                                     % (dev, rc, (err or out).strip()))
            deadline = time.time() + timeout
            while not _connected(client, dev):
                if time.time() > deadline:
                    disconnect(dev)
                    raise NbdClientError("%s did not connect within %.0f s" % (dev, timeout))
                time.sleep(0.1)
            return dev
        raise NbdClientError("every NBD device of this host is in use (%d)" % len(devs))
    finally:
        lock.close()


def disconnect(dev):
    """Best effort: True when dev is no longer connected."""
    check_device(dev)
    client = find()
    if client is None:
        return False
    _run([client, "-disconnect", dev], timeout=60)
    try:
        return not _connected(client, dev)
    except NbdClientError:
        return False


def connected(dev):
    """Is dev connected (to whatever server)?"""
    check_device(dev)
    client = find()
    return client is not None and _connected(client, dev)
