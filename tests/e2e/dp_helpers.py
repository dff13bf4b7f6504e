"""Helpers for the datapath VM tests: call plugin executables exactly as
xapi-storage-script does (`<dir>/<Interface>.<method> --json`, one JSON line on
stdin, result or error JSON on stdout)."""

import json
import os
import subprocess
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATAPATH = os.path.join(ROOT, "plugins", "datapath")


class PluginError(Exception):
    def __init__(self, err):
        Exception.__init__(self, "%s" % (err,))
        self.err = err
        self.params = err.get("params", [])
        self.name = self.params[0] if self.params else None


def call(scheme, method, env=None, **params):
    params.setdefault("dbg", "test")
    exe = os.path.join(DATAPATH, scheme, method)
    e = dict(os.environ)
    e.update(env or {})
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


def make_sr(run, pool):
    """The SR layout of plugins/volume/names.py on a fresh pool."""
    run("zfs", "create", "-o", "canmount=off", "%s/zfs-ng" % pool)
    return pool


def make_volume(run, pool, size="64M"):
    key = str(uuid.uuid4())
    run("zfs", "create", "-s", "-b", "16K", "-V", size, "%s/zfs-ng/%s" % (pool, key))
    return key


def make_snapshot(run, pool, key):
    skey = str(uuid.uuid4())
    run("zfs", "snapshot", "%s/zfs-ng/%s@%s" % (pool, key, skey))
    return skey


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
