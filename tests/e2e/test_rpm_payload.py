"""The RPM's payload on real ZFS: the package the host built (dist/*.rpm, made
by `bash packaging/build-rpm.sh`, which run-tests does before the VM tests) is
unpacked into a scratch root and a whole SR/VDI lifecycle runs through the
unpacked /usr/libexec/xapi-storage-script executables and /usr/bin/zfs-ng only:
PYTHONPATH is the unpacked site-packages (and the vendored click beside it),
the cwd is outside the checkout, and the checkout (the guest's copy in
/tmp/checkout, its PYTHONPATH) is out of reach.  The guest runs the scripts with its own python3
(3.13; tests/host/test_rpm.py runs them on 3.6).  The guest has no rpm2cpio:
packaging/unpack_rpm.py reads the payload (gzip, by the spec)."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import uuid

import pytest

from conftest import run
from volume_calls import check_error, check_volume, zget

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITE = "/usr/lib/python3.6/site-packages"
VOLUME = "/usr/libexec/xapi-storage-script/volume/org.xen.xapi.storage.zfs-ng"
MiB = 1 << 20


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    rpms = sorted(glob.glob(os.path.join(ROOT, "dist", "zfs-ng-*.noarch.rpm")),
                  key=os.path.getmtime)
    if not rpms:
        pytest.fail("no dist/zfs-ng-*.noarch.rpm in the checkout: run "
                    "`bash packaging/build-rpm.sh` on the host first (run-tests does)")
    root = str(tmp_path_factory.mktemp("rpmroot"))
    if shutil.which("rpm2cpio") and shutil.which("cpio"):
        r2c = subprocess.Popen(["rpm2cpio", rpms[-1]], stdout=subprocess.PIPE)
        subprocess.run(["cpio", "-idm", "--quiet"], stdin=r2c.stdout, cwd=root, check=True)
        r2c.stdout.close()
        assert r2c.wait() == 0
    else:
        spec = importlib.util.spec_from_file_location(
            "unpack_rpm", os.path.join(ROOT, "packaging", "unpack_rpm.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.unpack(rpms[-1], root)
    return root


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cwd"))


def env_for(tree):
    site = tree + SITE
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
            "PYTHONPATH": site + os.pathsep + os.path.join(site, "zfs_ng_vendor"),
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


class Plugin(object):
    """The unpacked volume plugin, called as xapi-storage-script calls it."""

    def __init__(self, tree, cwd):
        self.tree, self.cwd = tree, cwd

    def _run(self, method, params):
        params = dict(params, dbg="rpm-e2e")
        p = subprocess.run([self.tree + VOLUME + "/" + method, "--json"],
                           input=json.dumps(params) + "\n", cwd=self.cwd,
                           env=env_for(self.tree), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
        assert "Traceback" not in p.stdout, p.stdout
        lines = p.stdout.splitlines()
        assert len(lines) == 1, "stdout must be one JSON value: %r (stderr %s)" % (p.stdout,
                                                                                    p.stderr)
        return p.returncode, json.loads(lines[0]), p.stderr

    def call(self, method, **params):
        rc, doc, err = self._run(method, params)
        assert rc == 0, "%s %r failed: %s\n%s" % (method, params, doc, err)
        return doc

    def fails(self, method, **params):
        rc, doc, err = self._run(method, params)
        assert rc == 1, "%s %r should have failed: %r" % (method, params, doc)
        check_error(doc)
        return doc


def cli(tree, cwd, *args):
    p = subprocess.run([tree + "/usr/bin/zfs-ng"] + list(args), cwd=cwd, env=env_for(tree),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=300)
    assert p.returncode == 0, "zfs-ng %s: %s%s" % (" ".join(args), p.stdout, p.stderr)
    return p.stdout


def pools():
    return set(run("zpool", "list", "-H", "-o", "name").stdout.split())


def test_the_checkout_is_out_of_reach(tree, cwd):
    code = "import site; site.main()\nimport plugins, sr_tools\nprint(plugins.__file__)"
    p = subprocess.run(["python3", "-S", "-c", code], cwd=cwd, env=env_for(tree),
                       stdout=subprocess.PIPE, universal_newlines=True, check=True)
    assert p.stdout.strip() == tree + SITE + "/plugins/__init__.py"
    assert cli(tree, cwd, "--version").strip().startswith("zfs-ng, version ")


def test_sr_and_volume_lifecycle_from_the_rpm(tree, cwd, file_vdevs):
    plugin = Plugin(tree, cwd)
    vdev = file_vdevs(1, 1 << 30)[0]
    sr_uuid = str(uuid.uuid4())
    conf = plugin.call("SR.create", uuid=sr_uuid, configuration={"file-uri": "file://" + vdev},
                       name="rpm SR", description="from the RPM payload")
    pool = conf["pool"]
    try:
        assert plugin.call("SR.attach", configuration=conf) == pool
        assert pool in plugin.call("Plugin.ls")
        st = plugin.call("SR.stat", sr=pool)
        assert st["uuid"] == sr_uuid and st["name"] == "rpm SR"
        assert json.loads(cli(tree, cwd, "sr", "stat", pool, "--json"))["uuid"] == sr_uuid

        v = check_volume(plugin.call("Volume.create", sr=pool, name="disk0",
                                     description="d", size=8 * MiB, sharable=False))
        s = check_volume(plugin.call("Volume.snapshot", sr=pool, key=v["key"]))
        assert s["read_write"] is False and s["name"] == "disk0"
        c = check_volume(plugin.call("Volume.clone", sr=pool, key=s["key"]))
        assert c["read_write"] is True and c["virtual_size"] == 8 * MiB
        plugin.call("Volume.resize", sr=pool, key=v["key"], new_size=16 * MiB)
        st = check_volume(plugin.call("Volume.stat", sr=pool, key=v["key"]))
        assert st["virtual_size"] == 16 * MiB
        assert int(zget("%s/zfs-ng/%s" % (pool, v["key"]), "volsize")) == 16 * MiB
        assert {x["key"] for x in plugin.call("SR.ls", sr=pool)} == {v["key"], s["key"],
                                                                     c["key"]}
        # an error from inside the installed code: the IDL's error, its backtrace ours
        e = plugin.fails("Volume.stat", sr=pool, key=str(uuid.uuid4()))
        assert e["params"][0] == "Volume_does_not_exist"
        assert all(f.startswith(tree + SITE + "/") for f in e["backtrace"]["files"])

        for key in (c["key"], s["key"], v["key"]):
            plugin.call("Volume.destroy", sr=pool, key=key)
        assert plugin.call("SR.ls", sr=pool) == []

        plugin.call("SR.detach", sr=pool)
        assert pool not in pools()
        assert plugin.call("SR.attach", configuration=conf) == pool
        plugin.call("SR.destroy", sr=pool)
        assert pool not in pools()
    finally:
        if pool in pools():
            subprocess.run(["zpool", "destroy", "-f", pool], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
