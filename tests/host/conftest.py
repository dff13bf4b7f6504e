"""Shared by the host tests.

- The targets they start (in-process, or `zfs-ng target serve`, which inherits
  the environment) serve image files under pytest's temporary directory and
  tempfile's: ZFSNG_TARGET_FILE_DIRS names them (blockio/volpath.py:
  otherwise only block devices are served).
- `target`: a running `zfs-ng target serve` (nvme_peer.TargetProcess; the
  NVMe/TCP host and the other peers of the tests are in nvme_peer.py), killed
  after the test.
- `nvme_target(*args, gc=True)`: a running `zfs-ng target serve` with more
  options (nvme_peer.TargetProcess), stopped after the test; gc=False
  runs it with Python's cycle collector off, so memory only a cycle holds
  shows up as a leak.
- `nbd_server(exports, gc=True, **options)`: a running NBD server
  (nbd_server.run.start, as the datapaths start it), stopped after the test;
  gc=False: with the cycle collector off, as above.
- `rss(pid)`: resident memory in bytes, from /proc/PID/status.
- `python36()`: a working python3.6 interpreter, or None; ROOT: the checkout.
- `free_port()`: a TCP port free on 127.0.0.1 now; `wait_for(cond)`: cond()'s
  first true value within the timeout (else its last value).
- `run_as_unit(proc, port, sock, service)`: a target started as its systemd
  unit would (own session, output piped): up on 127.0.0.1:port and its control
  socket, then stopped with the unit's KillSignal within its TimeoutStopSec;
  returns (exit status, output, seconds the stop took).
"""

import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from blockio.volpath import FILE_DIRS_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GC_OFF = (sys.executable, "-c", "import gc; gc.disable(); from sr_tools.cli import main; main()")


@pytest.fixture(scope="session", autouse=True)
def image_dir(tmp_path_factory):
    base = str(tmp_path_factory.getbasetemp())
    old = os.environ.get(FILE_DIRS_ENV)
    os.environ[FILE_DIRS_ENV] = os.pathsep.join((base, tempfile.gettempdir()))
    yield base
    if old is None:
        os.environ.pop(FILE_DIRS_ENV, None)
    else:
        os.environ[FILE_DIRS_ENV] = old


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def old_index_schema(*dropped):
    """plugins/volume/metadata.py's SCHEMA as an earlier version wrote it:
    without the volumes columns named (added since, in place, by Index())."""
    from plugins.volume import metadata
    schema = metadata.SCHEMA
    for col in dropped:
        schema, n = re.subn(r",\n    %s\b[^,\n]*" % col, "", schema)
        assert n == 1, col
    return schema


def wait_for(cond, timeout=10.0, step=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


def run_as_unit(proc, port, sock, service, timeout=30.0):
    import signal
    try:
        deadline = time.time() + timeout
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if os.path.exists(sock):
                    break
            except OSError:
                pass
            assert time.time() < deadline, "target did not come up"
            time.sleep(0.1)
        t0 = time.time()
        os.killpg(proc.pid, getattr(signal, service["KillSignal"]))
        rc = proc.wait(timeout=int(service["TimeoutStopSec"]))
        return rc, proc.stdout.read(), time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def python36():
    """A working python3.6 (pyenv shims that cannot run it do not count)."""
    candidates = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.6*/bin/python3.6")))
    candidates += [p for p in [shutil.which("python3.6")] if p]
    for py in candidates:
        ok = subprocess.run([py, "-c", "import sys; assert sys.version_info[:2] == (3, 6)"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if ok.returncode == 0:
            return py
    return None


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


@pytest.fixture
def target(tmp_path):
    from nvme_peer import TargetProcess
    t = TargetProcess(tmp_path).start()
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


@pytest.fixture
def nvme_target(tmp_path):
    from nvme_peer import TargetProcess
    started = []

    def start(*args, **kw):
        gc = kw.pop("gc", True)
        assert not kw, kw
        t = TargetProcess(tmp_path, args, **({} if gc else {"launcher": GC_OFF}))
        started.append(t.start())
        return t

    yield start
    for t in started:
        if t.proc.poll() is None:
            t.proc.kill()
            t.proc.wait()


@pytest.fixture
def nbd_server(tmp_path):
    from nbd_server import run
    pids = []

    def start(exports, gc=True, **options):
        options.setdefault("log_path", str(tmp_path / "nbd.log"))
        old = os.environ.get("PYTHONPATH")
        if not gc:          # run.start spawns `python -m nbd_server`: a sitecustomize turns gc off
            d = tmp_path / "gc-off"
            d.mkdir(exist_ok=True)
            (d / "sitecustomize.py").write_text("import gc\ngc.disable()\n")
            os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(d), old) if x)
        try:
            pids.append(run.start(exports, **options))
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
        return pids[-1]

    yield start
    for pid in pids:
        run.stop(pid)
