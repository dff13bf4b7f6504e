"""DH-HMAC-CHAP (NVMe in-band authentication) between our user-space target
and the Linux kernel initiator, inside the test VM: secrets made by nvme-cli
(`nvme gen-dhchap-key`), given to the target with `zfs-ng target host-key set`,
then `nvme connect --dhchap-secret` (and `--dhchap-ctrl-secret` for
bidirectional).  The right secret connects and I/O works; a wrong secret, no
secret, or a host without a key on a volume that requires one is refused."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import run, wait_for_path
from dp_helpers import wait_started
from kernel_nvmet import disconnect
from user_target import (HOSTNQN, PORT, ROOT, SOCK, Vol, find_namespace, fio, pool_fixture,
                         running_target)

OTHER_HOST = "nqn.2014-08.org.example:auth-other-host"


pool = pool_fixture("nva")


@pytest.fixture(scope="module")
def target(pool):
    state = "/var/lib/zfsng-test/target-auth-%s.db" % pool
    with running_target(state, tail=4000) as t:
        yield t
    assert "Traceback" not in open(state + ".log").read()
    assert oct(os.stat(state).st_mode & 0o777) == oct(0o600)     # it holds the secrets


def tcli(*args):
    """zfs-ng target ARGS --socket SOCK (the option goes to the subcommand)."""
    return run(sys.executable, "-m", "sr_tools", "target", *(list(args) + ["--socket", SOCK]),
               cwd=ROOT)


def target_log(t):
    t.log.flush()
    return open(t.state + ".log").read()


def gen_key(*args):
    """A secret made by the real nvme-cli."""
    key = run("nvme", "gen-dhchap-key", *args).stdout.strip()
    assert key.startswith("DHHC-1:"), key
    return key


class AuthVol(Vol):
    def __init__(self, pool, name, hosts=(HOSTNQN,), require_auth=True):
        Vol.__init__(self, pool, name, "64M", hosts,
                     ["--require-auth"] if require_auth else [])

    def nvme_connect(self, *extra, **kw):
        return subprocess.run(["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", str(PORT),
                               "-n", self.nqn] + list(extra) + kw.get("more", []),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True)

    def controllers(self):
        out = []
        for c in os.listdir("/sys/class/nvme"):
            try:
                if open("/sys/class/nvme/%s/subsysnqn" % c).read().strip() == self.nqn:
                    out.append(c)
            except OSError:
                pass
        return out

    def disconnect(self):
        disconnect(self.nqn)
        deadline = time.time() + 30
        while self.controllers():
            assert time.time() < deadline, "controller of %s stays" % self.nqn
            time.sleep(0.2)


def set_key(host, secret, *extra):
    tcli("host-key", "set", host, "--secret", secret, *extra)


def dmesg_since(mark):
    return run("dmesg").stdout[mark:]


def dmesg_mark():
    return len(run("dmesg").stdout)


def assert_refused(v, r, t, why):
    assert r.returncode != 0, "%s: connect succeeded:\n%s" % (why, r.stdout)
    assert not v.controllers(), why


def test_right_secret_connects_and_io_works(pool, target):
    v = AuthVol(pool, "uni")
    key = gen_key("-n", HOSTNQN)                          # DHHC-1:00:...
    set_key(HOSTNQN, key)
    mark = dmesg_mark()
    r = v.nvme_connect("--dhchap-secret=" + key, "--nr-io-queues=2")
    assert r.returncode == 0, r.stdout
    try:
        dev = find_namespace(v.uuid)
        fio(dev, "--name=a", "--rw=randwrite", "--bs=4k", "--size=8m", "--iodepth=8",
            "--verify=crc32c", "--do_verify=1")
        kmsg = dmesg_since(mark)
        # the kernel's own account: hash and DH group the target picked
        assert re.search(r"qid 0: authenticated with hash hmac\(sha256\) dhgroup ffdhe2048",
                         kmsg), kmsg
        ctrl = v.controllers()[0]
        assert open("/sys/class/nvme/%s/dhchap_secret" % ctrl).read().strip() == key
        log = target_log(target)
        # the admin queue and both I/O queues authenticated
        for qid in (0, 1, 2):
            assert re.search(r"qid %d: %s authenticated \(sha256, ffdhe2048\)"
                             % (qid, re.escape(HOSTNQN)), log), qid
    finally:
        v.disconnect()


def test_wrong_or_missing_secret_is_refused(pool, target):
    v = AuthVol(pool, "refuse", hosts=(HOSTNQN, OTHER_HOST))
    key = gen_key("-n", HOSTNQN)
    set_key(HOSTNQN, key)
    r = v.nvme_connect("--dhchap-secret=" + gen_key("-n", HOSTNQN))
    assert_refused(v, r, target, "wrong secret")
    assert "DH-HMAC-CHAP failed for %s" % HOSTNQN in target_log(target)
    r = v.nvme_connect()                                  # the target asks, the host has none
    assert_refused(v, r, target, "no secret")
    # a host without a key on a volume that requires one: refused at Connect
    r = v.nvme_connect("--hostnqn=" + OTHER_HOST,
                       "--hostid=" + str(uuid.uuid5(uuid.NAMESPACE_URL, OTHER_HOST)))
    assert_refused(v, r, target, "host without a key")
    assert "host %s refused for %s: it has no DH-HMAC-CHAP key" % (OTHER_HOST, v.nqn) in \
        target_log(target)
    # and one with its own secret, unknown to the target: refused too
    r = v.nvme_connect("--hostnqn=" + OTHER_HOST,
                       "--hostid=" + str(uuid.uuid5(uuid.NAMESPACE_URL, OTHER_HOST)),
                       "--dhchap-secret=" + gen_key("-n", OTHER_HOST))
    assert_refused(v, r, target, "host with a key the target does not know")
    # the right one still works after all that
    r = v.nvme_connect("--dhchap-secret=" + key)
    assert r.returncode == 0, r.stdout
    v.disconnect()


def test_bidirectional(pool, target):
    v = AuthVol(pool, "bidi")
    key = gen_key("-n", HOSTNQN, "-m", "1")               # DHHC-1:01: transformed with SHA-256
    ctrl_key = gen_key("-n", v.nqn, "-m", "2")            # DHHC-1:02, 48 bytes
    set_key(HOSTNQN, key, "--ctrl-secret", ctrl_key, "--hash", "sha384", "--dhgroup", "ffdhe3072")
    mark = dmesg_mark()
    r = v.nvme_connect("--dhchap-secret=" + key, "--dhchap-ctrl-secret=" + ctrl_key)
    assert r.returncode == 0, r.stdout
    try:
        kmsg = dmesg_since(mark)
        assert "qid 0: controller authenticated" in kmsg, kmsg
        assert re.search(r"authenticated with hash hmac\(sha384\) dhgroup ffdhe3072", kmsg), kmsg
        dev = find_namespace(v.uuid)
        run("dd", "if=/dev/urandom", "of=" + dev, "bs=1M", "count=4", "oflag=direct")
    finally:
        v.disconnect()
    # the host checks the target: a controller secret the target does not have is refused
    r = v.nvme_connect("--dhchap-secret=" + key, "--dhchap-ctrl-secret=" + gen_key("-n", v.nqn))
    assert_refused(v, r, target, "wrong controller secret")


def test_null_dh_group_and_sha512(pool, target):
    v = AuthVol(pool, "nulldh")
    key = gen_key("-n", HOSTNQN, "-m", "3")               # 64-byte key, SHA-512 transform
    set_key(HOSTNQN, key, "--hash", "sha512", "--dhgroup", "null")
    mark = dmesg_mark()
    r = v.nvme_connect("--dhchap-secret=" + key)
    assert r.returncode == 0, r.stdout
    try:
        assert re.search(r"authenticated with hash hmac\(sha512\) dhgroup null",
                         dmesg_since(mark))
        find_namespace(v.uuid)
    finally:
        v.disconnect()


def test_discovery_does_not_ask(pool, target):
    """nvme-cli (libnvme) gives a discovery controller no DH-HMAC-CHAP secret,
    so the target does not ask there: a host with a key still discovers."""
    v = AuthVol(pool, "disc")
    key = gen_key("-n", HOSTNQN)
    set_key(HOSTNQN, key)
    base = ["nvme", "discover", "-t", "tcp", "-a", "127.0.0.1", "-s", str(PORT), "-o", "json"]
    for extra in ([], ["--dhchap-secret=" + key]):
        out = run(*(base + extra)).stdout
        assert v.nqn in [r["subnqn"] for r in json.loads(out)["records"]]


def test_key_change_disconnects_until_the_host_has_it(pool, target):
    v = AuthVol(pool, "rekey")
    key = gen_key("-n", HOSTNQN)
    set_key(HOSTNQN, key)
    r = v.nvme_connect("--dhchap-secret=" + key, "--ctrl-loss-tmo=3", "--reconnect-delay=1")
    assert r.returncode == 0, r.stdout
    try:
        set_key(HOSTNQN, gen_key("-n", HOSTNQN))          # the old key no longer gets in
        deadline = time.time() + 60
        while v.controllers():
            assert time.time() < deadline, "the controller with the old key stayed"
            time.sleep(0.5)
        assert "DH-HMAC-CHAP key changed" in target_log(target)
    finally:
        v.disconnect()


def test_two_workers_authenticate_io_queues(pool):
    """--workers 2: I/O queues on the worker that does not own the controller
    authenticate with the key from the shared registry."""
    state = "/var/lib/zfsng-test/workers-auth-%s.db" % pool
    sock = "/run/zfs-ng/test-workers-auth.sock"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sr_tools", "target", "serve", "--workers", "2", "--listen",
         "127.0.0.1:4431", "--state", state, "--socket", sock, "-v"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True)
    nqn = "nqn.2014-08.org.zfs-ng:%s:workers-auth" % pool
    try:
        wait_started(proc, lambda: os.path.exists(sock), "workers")
        zname = pool + "/workers-auth"
        run("zfs", "create", "-s", "-V", "64M", "-o", "volblocksize=16K", zname)
        path = wait_for_path("/dev/zvol/" + zname)
        ns_uuid = str(uuid.uuid4())
        tcli = [sys.executable, "-m", "sr_tools", "target"]
        run(*(tcli + ["add", "--socket", sock, nqn, path, "--uuid", ns_uuid, "--allow",
                      HOSTNQN, "--require-auth"]), cwd=ROOT)
        key = gen_key("-n", HOSTNQN)
        run(*(tcli + ["host-key", "set", "--socket", sock, HOSTNQN, "--secret", key]), cwd=ROOT)
        for attempt in range(3):      # the kernel spreads 3 connections over 2 workers
            r = subprocess.run(["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", "4431",
                                "-n", nqn, "--nr-io-queues=2", "--dhchap-secret=" + key],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               universal_newlines=True)
            assert r.returncode == 0, r.stdout
            try:
                dev = find_namespace(ns_uuid)
                fio(dev, "--name=w", "--rw=randwrite", "--bs=4k", "--size=2m", "--iodepth=4",
                    "--numjobs=2", "--offset_increment=16m", "--cpus_allowed_policy=split",
                    "--cpus_allowed=0-1", "--verify=crc32c", "--do_verify=1")
            finally:
                disconnect(nqn)
                time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out
    print("cross-worker I/O queues: %s" % ("I/O queues here" in out))


def test_datapath_connect_uses_the_host_key_file(pool, target, tmp_path, monkeypatch):
    """The nvme+tcp datapath (plugins/datapath/nvme_host.connect) reads the
    host's 0600 key file and authenticates, bidirectionally here."""
    sys.path.insert(0, ROOT)
    from plugins.datapath import nvme_host
    v = AuthVol(pool, "dp")
    key, ctrl_key = gen_key("-n", HOSTNQN), gen_key("-n", v.nqn)
    set_key(HOSTNQN, key, "--ctrl-secret", ctrl_key)
    keys = tmp_path / "dhchap-keys.json"
    keys.write_text(json.dumps({HOSTNQN: {"secret": key, "ctrl_secret": ctrl_key}}))
    os.chmod(str(keys), 0o600)
    monkeypatch.setenv("ZFSNG_DHCHAP_KEYS", str(keys))
    mark = dmesg_mark()
    ctrl = nvme_host.connect("127.0.0.1", PORT, v.nqn, HOSTNQN)
    try:
        assert nvme_host.wait_namespace(v.uuid, ctrl)
        assert "qid 0: controller authenticated" in dmesg_since(mark)
    finally:
        assert nvme_host.disconnect(ctrl)
    os.chmod(str(keys), 0o644)                            # others could read it: not used
    with pytest.raises(nvme_host.NvmeError, match="chmod 600"):
        nvme_host.connect("127.0.0.1", PORT, v.nqn, HOSTNQN)
