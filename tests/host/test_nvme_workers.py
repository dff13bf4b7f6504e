"""Several worker processes on one port (SO_REUSEPORT): the I/O queues of one
controller land on whichever worker the kernel picks, all serve the same
namespace, and closing the admin queue (on its owner) tears down the I/O
queues held by the other workers too."""

import os
import signal
import struct
import subprocess
import sys
import time
import uuid

import pytest

from nvmeof_target.control import Client
from nvmeof_target.workers import SharedControllers
from conftest import ROOT, free_port
from nvme_peer import HOSTNQN, Host, SocketTransport, sparse, wait_for_target

NQN = "nqn.2014-08.org.zfs-ng:sr1:workers"


def test_shared_table_matches_nqns():
    t = SharedControllers()
    assert t.lookup(5, NQN, HOSTNQN) is None
    t.publish(5, NQN, HOSTNQN, 4)
    assert t.lookup(5, NQN, HOSTNQN) == 4
    assert t.lookup(5, NQN, HOSTNQN + "x") is None
    t.clear(5)
    assert t.lookup(5, NQN, HOSTNQN) is None


@pytest.fixture
def workers(tmp_path):
    port = free_port()
    sock = str(tmp_path / "t.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sr_tools", "target", "serve", "--workers", "2", "--listen",
         "127.0.0.1:%d" % port, "--state", str(tmp_path / "t.db"), "--socket", sock, "-v"],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stderr=subprocess.PIPE,
        universal_newlines=True)
    wait_for_target(proc, sock, 10, proc.stderr.read)
    yield port, sock, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def _controller_with_queues(port, n=8):
    admin = Host(SocketTransport(("127.0.0.1", port)))
    admin.icreq()
    cntlid = admin.connect(NQN)
    admin.enable()
    # I/O on other workers is invisible to the owner: no traffic-based keep-alive
    assert not struct.unpack_from("<I", admin.identify(1), 96)[0] & (1 << 6)
    assert admin.set_features(0x07, ((n - 1) << 16) | (n - 1)) == ((n - 1) << 16) | (n - 1)
    ios = []
    for qid in range(1, n + 1):
        h = Host(SocketTransport(("127.0.0.1", port)))
        h.icreq()
        assert h.connect(NQN, qid=qid, cntlid=cntlid, kato=0) == cntlid
        ios.append(h)
    return admin, ios


def test_io_queues_spread_over_workers(workers, tmp_path):
    port, sock, proc = workers
    path = sparse(tmp_path)
    Client(sock).add(NQN, path, str(uuid.uuid4()), allowed_hosts=[HOSTNQN])
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], stdout=subprocess.PIPE,
                              universal_newlines=True).stdout.split()
    assert len(children) == 2
    # The kernel hashes connections over the workers: 9 landing on one worker
    # happens 1 time in 256, so try again rather than fail on chance.
    for _ in range(4):
        admin, ios = _controller_with_queues(port)
        holders = [c for c in children if _tcp_fds(int(c), port)]
        if len(holders) == 2:
            break
        for h in [admin] + ios:
            h.t.close()
    assert len(holders) == 2, "connections never spread over both workers"
    blocks = {}
    for i, h in enumerate(ios):
        data = os.urandom(8192)
        h.write(i * 16, data)
        blocks[i * 16] = data
    for h in ios:                 # every queue reads what every other one wrote
        for lba, data in blocks.items():
            assert h.read(lba, 16) == data
    admin.t.close()
    deadline = time.time() + 5
    for h in ios:                 # all of them go away, on both workers
        h.t.sock.settimeout(max(0.1, deadline - time.time()))
        with pytest.raises((EOFError, ConnectionError)):
            while True:
                h.t.recv()


def _tcp_fds(pid, port):
    """Established sockets of pid on our port (from /proc/net/tcp by inode)."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local_port = int(parts[1].split(":")[1], 16)
            if local_port == port and parts[3] == "01" and parts[9] in inodes:
                n += 1
    return n

