"""Call the zfs-ng volume plugin exactly as xapi-storage-script does: argv
[script, "--json"], one JSON line on stdin, result or error JSON on stdout."""

import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLUGIN_DIR = os.path.join(ROOT, "plugins", "volume", "org.xen.xapi.storage.zfs-ng")


def start(method, **params):
    params.setdefault("dbg", "test")
    p = subprocess.Popen([os.path.join(PLUGIN_DIR, method), "--json"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True)
    p.stdin.write(json.dumps(params) + "\n")
    p.stdin.flush()
    p.stdin.close()
    return p


def finish(p):
    out = p.stdout.read()
    err = p.stderr.read()
    p.wait()
    p.stdout.close()
    p.stderr.close()
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert len(lines) == 1, "stdout must be one JSON value: %r (stderr %s)" % (out, err)
    return p.returncode, json.loads(lines[0]), err


def call(method, **params):
    """The result of a successful call (fails the test otherwise)."""
    rc, doc, err = finish(start(method, **params))
    assert rc == 0, "%s %r failed: %s\n%s" % (method, params, doc, err)
    return doc


def fails(method, **params):
    """The error JSON of a call that must fail, its shape checked."""
    rc, doc, err = finish(start(method, **params))
    assert rc != 0, "%s %r should have failed: %r" % (method, params, doc)
    check_error(doc)
    return doc


def check_error(doc):
    assert set(doc) == {"code", "params", "backtrace"}, doc
    assert doc["code"] == "SR_BACKEND_FAILURE"
    assert len(doc["params"]) == 2 and all(isinstance(p, str) for p in doc["params"])
    assert set(doc["backtrace"]) == {"error", "files", "lines"}


VOLUME_FIELDS = {"key", "uuid", "name", "description", "read_write", "sharable", "virtual_size",
                 "physical_utilisation", "uri", "keys", "cbt_enabled"}


def check_volume(v):
    assert set(v) == VOLUME_FIELDS, sorted(v)
    assert isinstance(v["key"], str) and isinstance(v["name"], str)
    assert isinstance(v["read_write"], bool) and isinstance(v["sharable"], bool)
    assert isinstance(v["virtual_size"], int) and isinstance(v["physical_utilisation"], int)
    assert all(isinstance(u, str) for u in v["uri"]) and v["uri"]
    assert all(isinstance(k, str) and isinstance(x, str) for k, x in v["keys"].items())
    assert v["cbt_enabled"] is False
    return v


def zfs_names(pool, types="volume,snapshot"):
    out = subprocess.run(["zfs", "list", "-H", "-o", "name", "-t", types, "-r",
                          pool + "/zfs-ng"], stdout=subprocess.PIPE,
                         universal_newlines=True, check=True).stdout
    return set(out.split())


def zget(name, prop):
    return subprocess.run(["zfs", "get", "-H", "-p", "-o", "value", prop, name],
                          stdout=subprocess.PIPE, universal_newlines=True,
                          check=True).stdout.strip()


def wait_zfs_idle(timeout=60):
    """Orphaned zfs children of a killed script finish on their own."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run(["pgrep", "-x", "zfs"], stdout=subprocess.PIPE)
        if p.returncode != 0:
            return
        time.sleep(0.2)


def index_built(sr_uuid, state_dir=None):
    """How a host's index of the SR was last made whole (Index.built: "rebuilt
    at G", "carried at F ..., N datasets read again at G", "index at G, ...");
    state_dir: that host's ZFSNG_STATE_DIR (default: this machine's)."""
    from plugins.volume import metadata
    idx = metadata.Index.for_sr(sr_uuid, state_dir=state_dir)
    try:
        return idx.built() or ""
    finally:
        idx.close()
