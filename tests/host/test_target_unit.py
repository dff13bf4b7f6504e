"""The systemd unit of the NVMe/TCP target: systemd itself checks the file,
then its ExecStart runs exactly as systemd would (its Environment= lines, then
an EnvironmentFile overriding them) and stops cleanly on systemd's signal,
sent to the whole control group as KillMode=control-group does."""

import configparser
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "nvmeof_target", "zfs-ng-target.service")


def _unit():
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    # repeated Environment= lines: keep them all
    env = {}
    with open(UNIT) as f:
        for line in f:
            if line.startswith("Environment="):
                k, v = line[len("Environment="):].strip().split("=", 1)
                env[k] = v
    cp.read(UNIT)
    return cp, env


def test_systemd_accepts_the_unit():
    # systemd-analyze: scripts/setup-host.sh installs systemd (not as PID 1)
    p = subprocess.run(["systemd-analyze", "verify", UNIT], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    assert p.returncode == 0 and not p.stdout.strip(), p.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_execstart_serves_and_stops_on_sigterm(tmp_path, workers):
    cp, env = _unit()
    svc = cp["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/usr/bin/python3"
    argv[0] = sys.executable              # the venv's interpreter has click
    port = _free_port()
    envfile = {"ZFSNG_TARGET_LISTEN": "127.0.0.1:%d" % port, "ZFSNG_TARGET_WORKERS": workers,
               "ZFSNG_TARGET_STATE": str(tmp_path / "target.db"),
               "ZFSNG_TARGET_SOCKET": str(tmp_path / "target.sock")}
    assert set(env) <= set(envfile)       # every default is one an admin can override
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **envfile),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    try:
        deadline = time.time() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if os.path.exists(envfile["ZFSNG_TARGET_SOCKET"]):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "target did not come up"
            time.sleep(0.1)
        assert os.path.exists(envfile["ZFSNG_TARGET_STATE"])
        t0 = time.time()
        os.killpg(proc.pid, getattr(signal, svc["KillSignal"]))
        rc = proc.wait(timeout=int(svc["TimeoutStopSec"]))
        out = proc.stdout.read()
        assert rc == 0, out
        assert "Traceback" not in out, out
        assert time.time() - t0 < 10
        with pytest.raises(OSError):      # nothing left listening
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
