"""The XCP-ng 8.3 RPM (packaging/build-rpm.sh): its payload and dependencies,
then the payload itself, unpacked into a scratch root and run the way dom0
would run it, on Python 3.6, with nothing of the checkout or the .venv in reach.

How the unpacked tree is run: dom0's python3 finds the packages in its own
/usr/lib/python3.6/site-packages; here that directory is under the scratch root,
so PYTHONPATH names it (the interpreter honours PYTHONPATH under -S too, and the
entry scripts' site.main() keeps it).  The interpreter is a fresh python3.6 venv
(no pip, no system site-packages: nothing importable but the stdlib), started as
the shebangs would, [python, "-S", <method symlink>] for the plugins (argv[0] is
the method's name) and [python, "-s", usr/bin/zfs-ng] for the CLI, from a cwd
outside the checkout."""

import configparser
import hashlib
import json
import os
import re
import shlex
import stat
import subprocess
import sys

import pytest

from plugins import entry
from conftest import ROOT, free_port, python36, run_as_unit
SITE = "/usr/lib/python3.6/site-packages"
PLUGINDIR = "/usr/libexec/xapi-storage-script"
PLUGIN_DIRS = {entry.VOLUME_PLUGIN: PLUGINDIR + "/volume/" + entry.VOLUME_PLUGIN}
PLUGIN_DIRS.update((d, PLUGINDIR + "/datapath/" + d) for d in entry.DATAPATHS)
SCRIPT = {entry.VOLUME_PLUGIN: "entry.py"}
PACKAGES = ("blockio", "nbd_server", "nvmeof_target", "plugins", "sr_tools")
UNIT = "/usr/lib/systemd/system/zfs-ng-target.service"
NBD_NODE_UNIT = "/usr/lib/systemd/system/zfs-ng-nbd-node.service"
DEFAULTS = "/etc/default/zfs-ng-target"
# what rpm 4.11 (XCP-ng 8.3's) knows how to install
RPMLIB_OK = {"CompressedFileNames", "FileDigests", "PayloadFilesHavePrefix",
             "PartialHardlinkSets", "VersionedDependencies", "PayloadIsXz"}


def version():
    cp = configparser.ConfigParser()
    cp.read(os.path.join(ROOT, "setup.cfg"))
    return cp["metadata"]["version"]


def out(argv, **kw):
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120, **kw)
    assert p.returncode == 0, "%s: %s%s" % (argv, p.stdout, p.stderr)
    return p.stdout


@pytest.fixture(scope="module")
def rpm_path():
    """Built once per run of this module (a few seconds)."""
    assert os.path.exists("/usr/bin/rpmbuild"), "no rpmbuild: scripts/setup-host.sh installs rpm"
    built = out(["bash", os.path.join(ROOT, "packaging", "build-rpm.sh")], cwd=ROOT)
    path = os.path.join(ROOT, built.strip().splitlines()[-1])
    assert os.path.basename(path) == "zfs-ng-%s-1.noarch.rpm" % version()
    return path


def rpm_files(rpm):
    """path -> (flags, mode, link target) of every file the package lists."""
    qf = "[%{FILENAMES}\t%{FILEFLAGS:fflags}\t%{FILEMODES}\t%{FILELINKTOS}\n]"
    files = {}
    for line in out(["rpm", "-qp", "--qf", qf, rpm]).splitlines():
        path, flags, mode, link = line.split("\t")
        files[path] = (flags, int(mode) & 0xFFFF, link)
    return files


@pytest.fixture(scope="module")
def tree(rpm_path, tmp_path_factory):
    """The payload unpacked as rpm2cpio | cpio -idm does."""
    root = str(tmp_path_factory.mktemp("rpmroot"))
    r2c = subprocess.Popen(["rpm2cpio", rpm_path], stdout=subprocess.PIPE)
    cp = subprocess.run(["cpio", "-idm", "--quiet"], stdin=r2c.stdout, cwd=root,
                        stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    r2c.stdout.close()
    assert r2c.wait() == 0 and cp.returncode == 0, cp.stderr
    return root


@pytest.fixture(scope="module")
def py36(tmp_path_factory):
    py = python36()
    if py is None:
        pytest.skip("no python3.6 interpreter on this machine")
    venv = str(tmp_path_factory.mktemp("py36venv"))
    out([py, "-m", "venv", "--without-pip", venv])
    return os.path.join(venv, "bin", "python3")


@pytest.fixture(scope="module")
def cwd(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cwd"))


def env_for(tree, **extra):
    """No PYTHONPATH but the unpacked site-packages, no user site, no locale."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": tree + SITE,
           "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


def checkout_modules():
    """Relative paths of the .py files of our packages (directories with an
    __init__.py), as the spec installs them."""
    found = set()
    for top in PACKAGES:
        for d, dirs, files in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [x for x in dirs if x != "__pycache__"]
            if "__init__.py" in files:
                rel = os.path.relpath(d, ROOT)
                found.update(os.path.join(rel, f) for f in files if f.endswith(".py"))
    return found


# -- the package ---------------------------------------------------------------

def test_payload(rpm_path):
    files = rpm_files(rpm_path)
    for plugin, d in PLUGIN_DIRS.items():
        script = SCRIPT.get(plugin, "datapath.py")
        flags, mode, _ = files[d + "/" + script]
        assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o755
        links = {p[len(d) + 1:]: files[p] for p in files if p.startswith(d + "/")}
        methods = {m.full_name for m in entry.methods_of(plugin)}
        assert set(links) == methods | {script}
        for m in methods:
            assert stat.S_ISLNK(links[m][1]) and links[m][2] == script, m
    # the packages, exactly the checkout's modules, each with its %ghost .pyc
    ours = {p[len(SITE) + 1:] for p in files
            if p.startswith(SITE + "/") and p.endswith(".py") and "/zfs_ng_vendor/" not in p}
    assert ours == checkout_modules()
    for p, (flags, mode, _) in files.items():
        if p.endswith(".py") and p.startswith(SITE):
            d, b = p.rsplit("/", 1)
            pyc = "%s/__pycache__/%s.cpython-36.pyc" % (d, b[:-3])
            assert files[pyc][0] == "g", pyc
        if p.endswith(".pyc"):
            assert files[p][0] == "g", p   # compiled by %post, never shipped
    assert "/tests/" not in "".join(files)
    vendor = SITE + "/zfs_ng_vendor"
    for mod in ("click/__init__.py", "importlib_metadata/__init__.py", "zipp.py",
                "typing_extensions.py", "click-8.0.4.dist-info/LICENSE.rst"):
        assert vendor + "/" + mod in files, mod
    meta = SITE + "/zfs_ng-%s.dist-info/METADATA" % version()
    assert meta in files
    assert stat.S_IMODE(files["/usr/bin/zfs-ng"][1]) == 0o755
    assert stat.S_IMODE(files[UNIT][1]) == 0o644
    assert set(files[DEFAULTS][0]) == {"c", "n"}        # %config(noreplace)
    assert stat.S_ISDIR(files["/var/lib/zfs-ng"][1])
    assert stat.S_IMODE(files["/var/lib/zfs-ng"][1]) == 0o700
    assert stat.S_IMODE(files[NBD_NODE_UNIT][1]) == 0o644
    allowed = (SITE + "/", PLUGINDIR + "/", "/usr/bin/zfs-ng", UNIT, NBD_NODE_UNIT, DEFAULTS,
               "/var/lib/zfs-ng", "/usr/share/doc/")
    assert [p for p in files if not p.startswith(allowed)] == []


def test_requires_and_provides(rpm_path):
    reqs = set(out(["rpm", "-qp", "--requires", rpm_path]).splitlines())
    rpmlib = {r for r in reqs if r.startswith("rpmlib(")}
    assert {re.match(r"rpmlib\((\w+)\)", r).group(1) for r in rpmlib} <= RPMLIB_OK
    # only what XCP-ng 8.3's own repositories have
    assert reqs - rpmlib == {"/bin/sh", "python3", "python(abi) = 3.6", "zfs >= 2.1",
                             "xapi-storage-script", "systemd"}
    provides = set(out(["rpm", "-qp", "--provides", rpm_path]).splitlines())
    assert provides == {"zfs-ng = %s-1" % version(),
                        "bundled(python3dist(click)) = 8.0.4",
                        "bundled(python3dist(importlib-metadata)) = 4.8.3",
                        "bundled(python3dist(zipp)) = 3.6.0",
                        "bundled(python3dist(typing-extensions)) = 4.1.1"}
    qf = "%{ARCH} %{PAYLOADCOMPRESSOR} %{VERSION}"
    assert out(["rpm", "-qp", "--qf", qf, rpm_path]).split() == ["noarch", "gzip", version()]
    scripts = out(["rpm", "-qp", "--scripts", rpm_path])
    assert "compileall" in scripts and "try-restart zfs-ng-target.service" in scripts


def _listing(root):
    found = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                what = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = None
            found[os.path.relpath(p, root)] = (st.st_mode, what)
    return found


def test_python_unpacker_matches_rpm2cpio(rpm_path, tree, tmp_path):
    """packaging/unpack_rpm.py, what the VM test uses (the guest has no rpm2cpio)."""
    dest = str(tmp_path / "py")
    r = out([sys.executable, os.path.join(ROOT, "packaging", "unpack_rpm.py"), rpm_path, dest])
    assert r.strip() == "zfs-ng-%s-1" % version()
    assert _listing(dest) == _listing(tree)


# -- the unpacked tree on Python 3.6 --------------------------------------------

def call(py36, tree, cwd, plugin, method, stdin):
    script = tree + PLUGIN_DIRS[plugin] + "/" + method
    p = subprocess.run([py36, "-S", script, "--json"], input=stdin, cwd=cwd, env=env_for(tree),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert "Traceback" not in p.stdout + p.stderr, p.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1, (p.stdout, p.stderr)
    return p.returncode, json.loads(lines[0]), p.stderr


def test_only_the_unpacked_tree_is_importable(py36, tree, cwd):
    code = ("import sys, plugins, sr_tools\n"
            "print(plugins.__file__); print(sr_tools.__file__)\n"
            "for m in ('click', 'crc32c'):\n"
            "    try:\n"
            "        __import__(m); print('leak', m)\n"
            "    except ImportError:\n"
            "        pass\n")
    got = out([py36, "-S", "-c", "import site; site.main()\n" + code], cwd=cwd,
              env=env_for(tree)).split()
    assert got == [tree + SITE + "/plugins/__init__.py", tree + SITE + "/sr_tools/__init__.py"]


@pytest.mark.parametrize("plugin", sorted(PLUGIN_DIRS))
def test_plugin_query_from_the_unpacked_tree(py36, tree, cwd, plugin):
    rc, q, err = call(py36, tree, cwd, plugin, "Plugin.Query", '{"dbg": "t"}\n')
    assert rc == 0, err
    assert q["plugin"] == ("zfs-ng" if plugin == entry.VOLUME_PLUGIN else plugin)
    assert "Plugin.Query" in err          # logged (stderr here; syslog LOCAL2 on dom0)


def test_error_json_from_the_unpacked_tree(py36, tree, cwd, tmp_path):
    rc, e, _ = call(py36, tree, cwd, "zfsng-raw", "Datapath.attach", "{nope\n")
    assert rc == 1 and e["code"] == "SR_BACKEND_FAILURE"
    assert e["params"][0] == "Invalid_parameters"
    rc, e, _ = call(py36, tree, cwd, entry.VOLUME_PLUGIN, "Volume.stat", '{"dbg": "t"}\n')
    assert rc == 1 and e["params"][0] == "Invalid_parameters" and "'sr'" in e["params"][1]
    # a failure inside a method: its backtrace is all in the unpacked tree
    rc, e, _ = call(py36, tree, cwd, entry.VOLUME_PLUGIN, "SR.stat",
                    '{"dbg": "t", "sr": "nosuchpool"}\n')
    assert rc == 1 and set(e) == {"code", "params", "backtrace"} and len(e["params"]) == 2
    assert e["backtrace"]["files"]
    assert all(f.startswith(tree + SITE + "/") for f in e["backtrace"]["files"])
    # a method name the plugin does not have
    link = tmp_path / "Volume.nope"
    link.symlink_to(tree + PLUGIN_DIRS[entry.VOLUME_PLUGIN] + "/entry.py")
    p = subprocess.run([py36, "-S", str(link), "--json"], input="{}\n", cwd=cwd,
                       env=env_for(tree), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert p.returncode == 1 and json.loads(p.stdout)["params"][0] == "Unimplemented"


def cli(py36, tree, cwd, *args, **env):
    return subprocess.run([py36, "-s", tree + "/usr/bin/zfs-ng"] + list(args), cwd=cwd,
                          env=env_for(tree, **env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)


@pytest.mark.parametrize("locale_env", [{}, {"LANG": "C.UTF-8"}, {"LC_ALL": "C"}],
                         ids=["no-locale", "utf8", "lc-all-c"])
def test_cli_from_the_unpacked_tree(py36, tree, cwd, locale_env):
    """The vendored click; without a UTF-8 locale (3.6 has no PEP 538) the
    script runs itself again under one instead of click refusing to start."""
    p = cli(py36, tree, cwd, "--help", **locale_env)
    assert p.returncode == 0, p.stderr
    for area in ("sr", "vol", "target", "nbd", "backup"):
        assert re.search(r"^\s+%s\s" % area, p.stdout, re.M), p.stdout
    p = cli(py36, tree, cwd, "--version", **locale_env)
    assert (p.returncode, p.stdout) == (0, "zfs-ng, version %s\n" % version()), p.stderr


SWEEP = r'''
import importlib.machinery, sys
wrapper = importlib.machinery.SourceFileLoader("zfsng_cli", sys.argv[1]).load_module()
sys.path.insert(0, wrapper._vendor_dir())
import click
from click.testing import CliRunner
from sr_tools.cli import main
assert click.__version__ == "8.0.4" and click.__file__.startswith(wrapper._vendor_dir())
n = 0
for area in main.list_commands(None):      # areas are imported on use (sr_tools/cli.py)
    group = main.get_command(None, area)
    for name in sorted(group.commands):
        r = CliRunner().invoke(main, [area, name, "--help"])
        assert r.exit_code == 0 and r.output.startswith("Usage: "), (area, name, r.output)
        n += 1
print(n)
'''


def test_every_cli_command_parses_with_the_vendored_click(py36, tree, cwd):
    n = out([py36, "-s", "-c", SWEEP, tree + "/usr/bin/zfs-ng"], cwd=cwd,
            env=env_for(tree, LANG="C.UTF-8"))
    assert int(n) > 20


def test_installed_unit_runs_the_installed_target(py36, tree, cwd, tmp_path):
    unit = tree + UNIT
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(unit)
    svc = cp["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[:3] == ["/usr/bin/zfs-ng", "target", "serve"]
    assert os.access(tree + argv[0], os.X_OK)
    assert svc["EnvironmentFile"] == "-" + DEFAULTS and os.path.isfile(tree + DEFAULTS)
    # systemd checks the unit, its ExecStart pointed into the tree
    (tmp_path / "u").mkdir()
    copy = tmp_path / "u" / "zfs-ng-target.service"
    with open(unit) as f:
        copy.write_text(f.read().replace("ExecStart=/usr/", "ExecStart=%s/usr/" % tree))
    p = subprocess.run(["systemd-analyze", "verify", str(copy)], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout
    # the defaults file only comments: the unit's own Environment= stand
    with open(tree + DEFAULTS) as f:
        assert all(not line.strip() or line.startswith("#") for line in f)
    # run it as systemd would (no locale set), on loopback, then SIGTERM
    port = free_port()
    env = env_for(tree, ZFSNG_TARGET_LISTEN="127.0.0.1:%d" % port,
                  ZFSNG_TARGET_STATE=str(tmp_path / "target.db"),
                  ZFSNG_TARGET_SOCKET=str(tmp_path / "target.sock"))
    proc = subprocess.Popen([py36, "-s", tree + argv[0]] + argv[1:], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    rc, log, _took = run_as_unit(proc, port, env["ZFSNG_TARGET_SOCKET"], svc)
    assert rc == 0 and "Traceback" not in log, log


NBD_START = r'''
import os, sys
from nbd_server import run
tmp = sys.argv[1]
img = os.path.join(tmp, "d.img")
with open(img, "wb") as f:
    f.truncate(1 << 20)
pid = run.start([{"name": "d", "path": img}], unix_path=os.path.join(tmp, "s.sock"))
run.stop(pid)
'''


def test_nbd_server_child_from_the_unpacked_tree(py36, tree, cwd, tmp_path):
    """What Datapath.attach of zfsng-nbd does (nbd_server.run.start) on dom0:
    no PYTHONPATH but site-packages, no locale.  (The datapath serves a zvol;
    this image file is allowed by naming its directory, blockio/volpath.py.)"""
    env = dict(env_for(tree), ZFSNG_TARGET_FILE_DIRS=str(tmp_path))
    p = subprocess.run([py36, "-c", NBD_START, str(tmp_path)], cwd=cwd, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stderr
