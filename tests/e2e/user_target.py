"""Our user-space NVMe/TCP target in the test VM, for the e2e tests that
drive it with the kernel initiator (test_nvmeof*.py, test_nvme_auth.py): the
target process (TargetProc), its CLI (cli), a module's pool and target
(fixtures a test module makes: `pool, target = pool_fixture("nvt"),
target_fixture()`), volumes served by it (Vol),
finding a namespace's /dev node, fio, and the ZFS space a zvol uses."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import make_file_vdevs, run, wait_for_path
from dp_helpers import wait_started
import kernel_nvmet
from kernel_nvmet import connect, disconnect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PORT = 4420
SOCK = "/run/zfs-ng/test-target.sock"
HOSTNQN = open("/etc/nvme/hostnqn").read().strip()
OTHER_HOST = "nqn.2014-08.org.example:not-this-host"
FIO = ["fio", "--ioengine=libaio", "--direct=1", "--verify_state_save=0", "--randseed=42",
       "--group_reporting"]


class TargetProc(object):
    def __init__(self, state):
        self.state = state
        self.proc = None
        self.log = open(state + ".log", "a")

    def start(self):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sr_tools", "target", "serve", "--listen",
             "127.0.0.1:%d" % PORT, "--state", self.state, "--socket", SOCK, "-v"],
            cwd=ROOT, env=env, stdout=self.log, stderr=self.log)
        wait_started(self.proc, lambda: os.path.exists(SOCK), "target",
                     log_path=self.state + ".log")
        return self

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def cli(*args, **kw):
    return run(sys.executable, "-m", "sr_tools", "target", "--help", **kw) if not args else \
        run(sys.executable, "-m", "sr_tools", "target", *(list(args[:1]) + ["--socket", SOCK]
                                                          + list(args[1:])), cwd=ROOT, **kw)


def pool_fixture(prefix):
    """A module-scoped fixture: a pool named PREFIX + 6 hex digits on a 1 GiB
    file vdev, destroyed after the module."""
    @pytest.fixture(scope="module")
    def pool():
        name = "%s%s" % (prefix, uuid.uuid4().hex[:6])
        vdev = make_file_vdevs(1, 1 << 30)
        run("zpool", "create", "-f", "-o", "ashift=12", "-O", "compression=lz4", name, *vdev)
        yield name
        subprocess.run(["zpool", "destroy", "-f", name])
        for v in vdev:
            os.unlink(v)
    return pool


@contextlib.contextmanager
def running_target(state, tail=3000):
    """TargetProc(state) started; after the block every host is disconnected,
    the target stopped (exit status 0 asserted) and its log's tail printed."""
    t = TargetProc(state).start()
    yield t
    subprocess.run(["nvme", "disconnect-all"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rc = t.stop()
    print(open(state + ".log").read()[-tail:])
    assert rc == 0


def target_fixture():
    """A module-scoped fixture: the target running on the module's `pool`
    (its state file named after the pool), stopped after the module."""
    @pytest.fixture(scope="module")
    def target(pool):
        with running_target("/var/lib/zfsng-test/target-%s.db" % pool) as t:
            yield t
    return target


def find_namespace(ns_uuid, timeout=30.0):
    """kernel_nvmet.find_namespace, a test failure when it times out."""
    try:
        return kernel_nvmet.find_namespace(ns_uuid, timeout)
    except TimeoutError as e:
        pytest.fail(str(e))


def zfs_used(zname, pool):
    run("zpool", "sync", pool)
    return int(run("zfs", "get", "-Hp", "-o", "value", "used", zname).stdout)


def wait_used(zname, pool, ok, what, timeout=30):
    deadline = time.time() + timeout
    used = zfs_used(zname, pool)
    while not ok(used):
        assert time.time() < deadline, "%s: used stays at %d" % (what, used)
        time.sleep(0.5)
        used = zfs_used(zname, pool)
    return used


class Vol(object):
    """A zvol POOL/NAME served as nqn.2014-08.org.zfs-ng:POOL:NAME to `hosts`;
    options: more for `zfs-ng target add`."""

    def __init__(self, pool, name, size="128M", hosts=(HOSTNQN,), options=()):
        self.zname = "%s/%s" % (pool, name)
        run("zfs", "create", "-s", "-V", size, "-o", "volblocksize=16K", self.zname)
        self.path = wait_for_path("/dev/zvol/" + self.zname)
        self.uuid = str(uuid.uuid4())
        self.nqn = "nqn.2014-08.org.zfs-ng:%s:%s" % (pool, name)
        args = ["add", self.nqn, self.path, "--uuid", self.uuid]
        for h in hosts:
            args += ["--allow", h]
        cli(*(args + list(options)))

    def connect(self, *extra):
        connect(self.nqn, PORT, extra=list(extra))
        self.dev = find_namespace(self.uuid)
        return self.dev

    def disconnect(self):
        disconnect(self.nqn)


def fio(dev, *args):
    return run(*(FIO + ["--filename=" + dev] + list(args)))
