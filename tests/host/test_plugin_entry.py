"""The plugin executables: every method name of every plugin directory is a
symlink to that directory's one script, which runs the method from a checkout
(python3 -S, no site) or, copied elsewhere, from the installed package."""

import json
import os
import shutil
import subprocess

import pytest

from plugins import entry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIRS = {entry.VOLUME_PLUGIN: os.path.join(ROOT, "plugins", "volume", entry.VOLUME_PLUGIN)}
DIRS.update((d, os.path.join(ROOT, "plugins", "datapath", d)) for d in entry.DATAPATHS)
SCRIPT = {entry.VOLUME_PLUGIN: "entry.py"}
PACKAGES = ("blockio", "nbd_server", "nvmeof_target", "plugins", "sr_tools")   # setup.cfg's


def call(argv, params=None, **kw):
    p = subprocess.run(argv + ["--json"], input=json.dumps(params or {"dbg": "t"}) + "\n",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60, **kw)
    return p.returncode, json.loads(p.stdout), p.stderr


@pytest.mark.parametrize("plugin", sorted(DIRS))
def test_every_method_is_a_link_to_the_one_script(plugin):
    d = DIRS[plugin]
    script = os.path.join(d, SCRIPT.get(plugin, "datapath.py"))
    with open(script) as f:
        assert f.readline() == "#!/usr/bin/python3 -S\n"   # fast start: no site scan
    assert os.access(script, os.X_OK)
    links = sorted(f for f in os.listdir(d) if os.path.islink(os.path.join(d, f)))
    assert sorted(links) == sorted(m.full_name for m in entry.methods_of(plugin))
    for f in links:
        assert os.readlink(os.path.join(d, f)) == os.path.basename(script)
    rc, q, err = call([os.path.join(d, "Plugin.Query")])
    assert rc == 0, err
    assert q["plugin"] == ("zfs-ng" if plugin == entry.VOLUME_PLUGIN else plugin)


def test_unknown_method_name_is_an_error_json(tmp_path):
    link = tmp_path / "Volume.nope"
    link.symlink_to(os.path.join(DIRS[entry.VOLUME_PLUGIN], "entry.py"))
    rc, doc, err = call([str(link)])
    assert rc == 1 and doc["params"][0] == "Unimplemented" and "Volume.snapshot" in err


def test_bad_json_is_an_error_json():
    p = subprocess.run([os.path.join(DIRS["zfsng-raw"], "Datapath.attach"), "--json"],
                       input="{nope\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["params"][0] == "Invalid_parameters"


def test_a_copy_outside_the_checkout_uses_the_installed_package(tmp_path):
    """Copied without the checkout, the script finds no plugins/ above it and
    runs site: the package comes from where it is installed.  Here: the
    packages copied into a site directory of their own, run by an interpreter
    that has no zfs-ng installed (not the venv, whose editable install points
    back at this checkout).  The RPM payload is tested the same way on
    Python 3.6 in test_rpm.py."""
    py = shutil.which("python3", path="/usr/bin:/bin")
    bare = dict(os.environ, PYTHONNOUSERSITE="1")
    bare.pop("PYTHONPATH", None)
    if py is None or subprocess.run([py, "-c", "import plugins"], env=bare, cwd=str(tmp_path),
                                    stderr=subprocess.DEVNULL).returncode == 0:
        pytest.skip("no python3 without zfs-ng installed on this machine")
    site = tmp_path / "site-packages"
    for package in PACKAGES:
        shutil.copytree(os.path.join(ROOT, package), str(site / package),
                        ignore=shutil.ignore_patterns("__pycache__"))
    copy = tmp_path / "xapi-storage-script" / "volume" / entry.VOLUME_PLUGIN
    shutil.copytree(DIRS[entry.VOLUME_PLUGIN], str(copy), symlinks=True)
    rc, q, err = call([py, "-S", str(copy / "Plugin.Query")],
                      env=dict(bare, PYTHONPATH=str(site)), cwd=str(tmp_path))
    assert rc == 0, err
    assert q["plugin"] == "zfs-ng"
    assert entry.methods_of(entry.VOLUME_PLUGIN)  # and the same table as here


def test_unknown_plugin_directory():
    with pytest.raises(KeyError):
        entry.methods_of("zfsng-nope")
