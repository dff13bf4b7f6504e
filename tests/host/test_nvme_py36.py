"""The NVMe/TCP target on a real Python 3.6 (XCP-ng 8.3's dom0): the server
runs under python3.6 (stdlib only: no click, and the pure-Python CRC32C since
the crc32c package is absent there), volumes go in through the control socket,
and the test initiator does Connect, Identify and I/O with digests over TCP.
vermin checks the syntax; this checks the interpreter's behaviour."""

import os
import signal
import struct
import subprocess
import uuid

import pytest

from nvmeof_target.control import Client
from conftest import ROOT, free_port, python36
from nvme_peer import HOSTNQN, Host, SocketTransport, sparse, wait_for_target

SERVE = r'''
import logging, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO)
from nvmeof_target.service import serve
sys.exit(serve([("127.0.0.1", int(sys.argv[2]))], sys.argv[3], sys.argv[4]))
'''


def test_target_runs_on_python36(tmp_path):
    py = python36()
    if py is None:
        pytest.skip("no python3.6 interpreter on this machine (vermin still checks the syntax)")
    script = tmp_path / "serve36.py"
    script.write_text(SERVE)
    port, sock = free_port(), str(tmp_path / "t.sock")
    proc = subprocess.Popen([py, str(script), ROOT, str(port), str(tmp_path / "t.db"), sock],
                            stderr=subprocess.PIPE, universal_newlines=True)
    try:
        wait_for_target(proc, sock, 20, proc.stderr.read)
        nqn = "nqn.2014-08.org.zfs-ng:sr36:vol"
        path = sparse(tmp_path)
        Client(sock).add(nqn, path, str(uuid.uuid4()), allowed_hosts=[HOSTNQN])
        admin = Host(SocketTransport(("127.0.0.1", port)), hdgst=True, ddgst=True)
        admin.icreq()
        cntlid = admin.connect(nqn)
        admin.enable()
        assert admin.identify(1)[768:768 + len(nqn)] == nqn.encode()
        admin.set_features(0x07, 0)
        io = Host(SocketTransport(("127.0.0.1", port)), hdgst=True, ddgst=True)
        io.icreq()
        io.connect(nqn, qid=1, cntlid=cntlid, kato=0)
        data = os.urandom(64 << 10)
        io.write(64, data)                      # R2T + H2CData
        io.write(0, data[:4096])                # in-capsule
        assert io.read(64, 128) == data and io.read(0, 8) == data[:4096]
        io.ok(dict(opcode=0x09, nsid=1, cdw11=4), struct.pack("<IIQ", 0, 8, 0) + bytes(4080))
        assert io.read(0, 8) == bytes(4096)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(20)
        err = proc.stderr.read()
    assert rc == 0, err
    assert "Traceback" not in err, err
