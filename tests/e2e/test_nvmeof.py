"""Our user-space NVMe/TCP target against the real Linux initiator (nvme-tcp)
and nvme-cli, on zvols of a file-backed pool, inside the test VM.

One target process and one pool for the module (TCG is slow); each test uses
its own volume(s).  Figures are never asserted: only behaviour."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

from conftest import run, wait_for_path
from dp_helpers import wait_started
from kernel_nvmet import connect, disconnect
from user_target import (HOSTNQN, OTHER_HOST, PORT, ROOT, Vol, cli, find_namespace, fio,
                         pool_fixture, target_fixture, wait_used)

pool, target = pool_fixture("nvt"), target_fixture()


def test_discover_lists_only_allowed_subsystems(pool, target):
    mine = Vol(pool, "disc-mine")
    hidden = Vol(pool, "disc-hidden", hosts=(OTHER_HOST,))
    out = run("nvme", "discover", "-t", "tcp", "-a", "127.0.0.1", "-s", str(PORT),
              "-o", "json").stdout
    recs = json.loads(out)["records"]
    nqns = [r["subnqn"] for r in recs]
    assert mine.nqn in nqns and hidden.nqn not in nqns
    rec = recs[nqns.index(mine.nqn)]
    assert rec["trtype"] == "tcp" and rec["traddr"] == "127.0.0.1" and rec["trsvcid"] == "4420"


def test_connect_identify_logs(pool, target):
    v = Vol(pool, "ident")
    dev = v.connect()
    try:
        ctrl = "/dev/" + os.path.basename(dev).rsplit("n", 1)[0]
        listed = run("nvme", "list", "-o", "json").stdout
        assert os.path.basename(dev) in listed
        idc = json.loads(run("nvme", "id-ctrl", ctrl, "-o", "json").stdout)
        assert idc["subnqn"] == v.nqn and idc["kas"] > 0 and idc["vwc"] == 1
        info = json.loads(cli("show", v.nqn, "--json").stdout)
        assert [c["cntlid"] for c in info["controllers"]] == [idc["cntlid"]]
        idns = json.loads(run("nvme", "id-ns", dev, "-o", "json").stdout)
        assert idns["nsze"] == (128 << 20) // 512 and idns["nsze"] == idns["ncap"]
        assert idns["nguid"].replace("-", "") == v.uuid.replace("-", "")
        descs = run("nvme", "ns-descs", dev).stdout
        assert v.uuid in descs
        # SMART: only the I/O counters come from real state (the rest is constant)
        before = _smart(ctrl)
        run("dd", "if=/dev/zero", "of=" + dev, "bs=1M", "count=4", "oflag=direct")
        run("dd", "if=" + dev, "of=/dev/null", "bs=1M", "count=4", "iflag=direct")
        after = _smart(ctrl)
        units = (4 << 20) // 512 // 1000                    # thousands of 512-byte units
        assert after["data_units_written"] - before["data_units_written"] >= units
        assert after["data_units_read"] - before["data_units_read"] >= units
        assert after["host_write_commands"] - before["host_write_commands"] >= 4
        assert after["host_read_commands"] - before["host_read_commands"] >= 4
        dump = run("nvme", "get-log", ctrl, "--log-id=2", "--log-len=512").stdout
        got = _hexdump_bytes(dump)      # the raw page says what smart-log decoded
        assert len(got) == 512, dump[:300]
        assert struct.unpack_from("<Q", got, 48)[0] >= after["data_units_written"]
        assert int(open("/sys/block/%s/size" % os.path.basename(dev)).read()) == (128 << 20) // 512
    finally:
        v.disconnect()


def _smart(ctrl):
    """The I/O counters of the SMART log page, as numbers."""
    log = json.loads(run("nvme", "smart-log", ctrl, "-o", "json").stdout)
    return dict((k, int(log[k])) for k in ("data_units_read", "data_units_written",
                                           "host_read_commands", "host_write_commands"))


def _hexdump_bytes(text):
    """Bytes of nvme-cli's hex dump ('0000: 00 2f 01 ...  "ascii"')."""
    import re
    out = bytearray()
    for line in text.splitlines():
        m = re.match(r"^\s*[0-9a-fA-F]+:\s+((?:[0-9a-fA-F]{2}\s+){1,16})", line + " ")
        if m:
            out += bytes(int(t, 16) for t in m.group(1).split())
    return bytes(out)


def _read_dev(dev, offset, length):
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, length)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


def test_blkdiscard_and_zeroout(pool, target):
    v = Vol(pool, "discard")
    dev = v.connect()
    try:
        # incompressible data, or lz4 makes "used" meaningless
        run("dd", "if=/dev/urandom", "of=" + dev, "bs=1M", "count=16", "oflag=direct")
        keep = _read_dev(dev, 12 << 20, 1 << 20)
        wait_used(v.zname, pool, lambda u: u >= 15 << 20, "16 MiB written")
        run("blkdiscard", "-o", "0", "-l", str(8 << 20), dev)
        run("blkdiscard", "-z", "-o", str(8 << 20), "-l", str(4 << 20), dev)
        assert _read_dev(dev, 0, 1 << 20) == bytes(1 << 20)
        assert _read_dev(dev, (8 << 20), 1 << 20) == bytes(1 << 20)
        assert _read_dev(dev, (12 << 20), 1 << 20) == keep
        # 12 of the 16 MiB deallocated: the zvol really freed them
        wait_used(v.zname, pool, lambda u: u < 8 << 20, "after discard")
    finally:
        v.disconnect()


def test_resize_is_seen_by_the_host(pool, target):
    v = Vol(pool, "resize")
    dev = v.connect()
    try:
        sysfs = "/sys/block/%s/size" % os.path.basename(dev)
        assert int(open(sysfs).read()) == (128 << 20) // 512
        run("zfs", "set", "volsize=192M", v.zname)
        time.sleep(0.5)
        out = json.loads(cli("resize", v.nqn, "--json").stdout)
        assert out["notified_controllers"] == 1
        deadline = time.time() + 30
        while int(open(sysfs).read()) != (192 << 20) // 512:
            assert time.time() < deadline, "host never saw the new size"
            time.sleep(0.2)
    finally:
        v.disconnect()


def test_host_not_allowed_is_refused(pool, target):
    v = Vol(pool, "private", hosts=(OTHER_HOST,))
    r = subprocess.run(["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", str(PORT),
                        "-n", v.nqn], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    assert r.returncode != 0
    assert not [p for p in os.listdir("/sys/class/nvme")
                if open("/sys/class/nvme/%s/subsysnqn" % p).read().strip() == v.nqn]
    cli("allow", v.nqn, HOSTNQN)
    v.connect()
    v.disconnect()


def test_two_workers_serve_one_controller(pool):
    """--workers 2: the host's I/O queues (one per CPU) land on both processes
    (the kernel hashes each connection to a worker; the test reconnects until
    some I/O queue is on the other worker than its admin queue: all three on
    one worker happens 1 time in 4, twelve times in a row 1 in 16 million),
    then fio from both CPUs verifies through all of them."""
    state = "/var/lib/zfsng-test/workers-%s.db" % pool
    sock = "/run/zfs-ng/test-workers.sock"
    log = state + ".log"
    env = dict(os.environ, PYTHONPATH=ROOT)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sr_tools", "target", "serve", "--workers", "2", "--listen",
             "127.0.0.1:4430", "--state", state, "--socket", sock, "-v"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_started(proc, lambda: os.path.exists(sock), "workers", log_path=log)
        zname = pool + "/workers"
        run("zfs", "create", "-s", "-V", "128M", "-o", "volblocksize=16K", zname)
        path = wait_for_path("/dev/zvol/" + zname)
        nqn, ns_uuid = "nqn.2014-08.org.zfs-ng:%s:workers" % pool, str(uuid.uuid4())
        run(sys.executable, "-m", "sr_tools", "target", "add", "--socket", sock, nqn, path,
            "--uuid", ns_uuid, "--allow", HOSTNQN, cwd=ROOT)
        for _attempt in range(12):
            crossed_before = _cross_worker_controllers(log)
            connect(nqn, 4430, extra=["--nr-io-queues=2"])
            dev = find_namespace(ns_uuid)
            if _cross_worker_controllers(log) > crossed_before:
                break
            disconnect(nqn)
        else:
            pytest.fail("12 connections, never an I/O queue on the other worker")
        try:
            fio(dev, "--name=w", "--rw=randwrite", "--bs=4k", "--size=4m", "--iodepth=8",
                "--numjobs=2", "--offset_increment=16m", "--cpus_allowed_policy=split",
                "--cpus_allowed=0-1", "--verify=crc32c", "--do_verify=1")
        finally:
            disconnect(nqn)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    text = open(log).read()
    assert proc.returncode == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def _cross_worker_controllers(log):
    """How many times a worker took I/O queues of a controller another worker
    owns (target.py logs it at -v when the first such queue connects)."""
    return open(log).read().count(": I/O queues here")
