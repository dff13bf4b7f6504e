"""The systemd unit of the NVMe/TCP target: systemd itself checks the file,
then its ExecStart runs exactly as systemd would (its Environment= lines, then
an EnvironmentFile overriding them) and stops cleanly on systemd's signal,
sent to the whole control group as KillMode=control-group does."""

import configparser
import os
import shlex
import socket
import subprocess
import sys

import pytest

from conftest import free_port, run_as_unit

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


@pytest.mark.parametrize("workers", ["1", "2"])
def test_execstart_serves_and_stops_on_sigterm(tmp_path, workers):
    cp, env = _unit()
    svc = cp["Service"]
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == "/usr/bin/python3"
    argv[0] = sys.executable              # the venv's interpreter has click
    port = free_port()
    envfile = {"ZFSNG_TARGET_LISTEN": "127.0.0.1:%d" % port, "ZFSNG_TARGET_WORKERS": workers,
               "ZFSNG_TARGET_STATE": str(tmp_path / "target.db"),
               "ZFSNG_TARGET_SOCKET": str(tmp_path / "target.sock")}
    assert set(env) <= set(envfile)       # every default is one an admin can override
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **envfile),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, start_new_session=True)
    rc, out, took = run_as_unit(proc, port, envfile["ZFSNG_TARGET_SOCKET"], svc)
    assert rc == 0 and "Traceback" not in out, out
    assert took < 10
    assert os.path.exists(envfile["ZFSNG_TARGET_STATE"])
    with pytest.raises(OSError):          # nothing left listening
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
