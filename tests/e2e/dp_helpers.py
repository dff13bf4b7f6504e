"""Helpers for the datapath VM tests: call plugin executables exactly as
xapi-storage-script does (`<dir>/<Interface>.<method> --json`, one JSON line on
stdin, result or error JSON on stdout)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATAPATH = os.path.join(ROOT, "plugins", "datapath")


class PluginError(Exception):
    def __init__(self, err):
        Exception.__init__(self, "%s" % (err,))
        self.err = err
        self.params = err.get("params", [])
        self.name = self.params[0] if self.params else None


def call(scheme, method, env=None, **params):
    """A datapath plugin call on this host (the node's namespaces; a host
    elsewhere: tests/e2e/netns.py HostNs.datapath); env: variables to set
    (None: unset)."""
    params.setdefault("dbg", "test")
    exe = os.path.join(DATAPATH, scheme, method)
    e = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    p = subprocess.run([exe, "--json"], input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True, env=e, timeout=300)
    try:
        out = json.loads(p.stdout)
    except ValueError:
        raise AssertionError("%s: not JSON on stdout (rc %d): %r\nstderr: %s"
                             % (method, p.returncode, p.stdout, p.stderr))
    if p.returncode != 0:
        assert set(out) == {"code", "params", "backtrace"}, out
        raise PluginError(out)
    return out


def impl(result, kind):
    """The payload of the first implementation of that kind."""
    for k, v in result["implementations"]:
        if k == kind:
            return v
    raise AssertionError("no %s in %r" % (kind, result))


VOLUME = os.path.join(ROOT, "plugins", "volume", "org.xen.xapi.storage.zfs-ng")


def vol_call(method, **params):
    """A volume plugin method, through its executable."""
    params.setdefault("dbg", "test")
    p = subprocess.run([os.path.join(VOLUME, method), "--json"], input=json.dumps(params) + "\n",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=300)
    if p.returncode != 0:
        raise AssertionError("%s failed: %s %s" % (method, p.stdout, p.stderr))
    return json.loads(p.stdout)


def make_sr(vdev, **configuration):
    """A zfs-ng SR made and attached by the volume plugin; returns the SR string."""
    configuration["device"] = vdev
    conf = vol_call("SR.create", uuid=str(uuid.uuid4()), configuration=configuration,
                    name="dp test", description="")
    return vol_call("SR.attach", configuration=conf)


def destroy_pool(pool):
    subprocess.run(["zpool", "destroy", "-f", pool], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def make_volume(sr, size=64 << 20):
    return vol_call("Volume.create", sr=sr, name="v", description="", size=size, sharable=False)


def make_snapshot(sr, key):
    return vol_call("Volume.snapshot", sr=sr, key=key)


def uri_of(vol, scheme):
    for u in vol["uri"]:
        if u.startswith(scheme + "://"):
            return u
    raise AssertionError("no %s URI in %r" % (scheme, vol["uri"]))


def volmode_local(dataset):
    out = subprocess.run(["zfs", "get", "-H", "-o", "value,source", "volmode", dataset],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout.split()
    return out[0] if out and out[-1] == "local" else None


def pattern(seed, size):
    return (("%08d" % seed).encode() * (size // 8 + 1))[:size]


def pwrite(path, offset, data):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def pread(path, offset, length):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def zfs_exists(name):
    return subprocess.run(["zfs", "list", "-H", "-o", "name", name], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


def wait_started(proc, ready, what, timeout=60, log_path=None):
    """The one start-up wait of the e2e tests: poll ready() (every 0.1 s) until
    it is true; the test fails (pytest.fail) if proc (a Popen) exits first or
    timeout s pass, saying what did not start, proc's exit code and the tail
    of its log at log_path (when given)."""
    deadline = time.time() + timeout
    while not ready():
        rc = proc.poll()
        if rc is not None:
            why = "exited with code %d" % rc
        elif time.time() > deadline:
            why = "not ready after %d s" % timeout
        else:
            time.sleep(0.1)
            continue
        msg = "%s did not start: %s" % (what, why)
        if log_path is not None:
            try:
                with open(log_path, errors="replace") as f:
                    msg += "\n--- tail of %s ---\n%s" % (log_path, f.read()[-4000:])
            except OSError as e:
                msg += "\n(no log: %s)" % e
        pytest.fail(msg)


def stop(proc, timeout=30):
    """SIGTERM, then SIGKILL after timeout s; reaped either way."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving_target(listen, state, sock):
    """`zfs-ng target serve` on listen (ADDR:PORT) with its control socket at
    sock, for the node side of nvme+tcp tests; stopped by SIGTERM after."""
    log = open(state + ".log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
                             listen, "--state", state, "--socket", sock],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log,
                            stderr=log)
    try:
        wait_started(proc, lambda: os.path.exists(sock), "target", log_path=state + ".log")
        yield proc
    finally:
        stop(proc)
        log.close()


PKI_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pki", "nbdtls")


def copy_pki(dst):
    """The test PKI (tests/e2e/pki/nbdtls: node/, h1/, h2/, forged/) copied to
    dst with key files 0600 (whatever the 9p share shows); returns dst."""
    import shutil
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(PKI_SRC, dst)
    for d, _, files in os.walk(dst):
        for f in files:
            os.chmod(os.path.join(d, f), 0o600 if f.endswith("key.pem") else 0o644)
    return dst


def _accepts(host, port):
    import socket
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def serving_nbd_node(host, port, pki, log_path):
    """`zfs-ng nbd serve-node` on host:port with the node certificate of the
    PKI copy `pki` (copy_pki), until it accepts; terminated after."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")
    proc = subprocess.Popen([sys.executable, "-m", "sr_tools", "nbd", "serve-node", "-v",
                             "--listen", "%s:%d" % (host, port),
                             "--cert", os.path.join(pki, "node", "cert.pem"),
                             "--key", os.path.join(pki, "node", "key.pem"),
                             "--ca", os.path.join(pki, "node", "ca.pem")],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_started(proc, lambda: _accepts(host, port), "serve-node", log_path=log_path)
        yield proc
    finally:
        stop(proc)
        log.close()
