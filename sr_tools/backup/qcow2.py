"""qcow2 images through qemu's own tools: a finished raw image is converted
with `qemu-img convert` (holes and zeros stay unallocated clusters), and a
qcow2 image is read back by serving it read-only with `qemu-nbd` on a private
unix socket and reading it with nbd_server.client.  Each image of a chain stands
alone (no backing files: a zero cluster of an incremental must not read
through to its parent)."""

import os
import shutil
import subprocess
import tempfile
import time

from sr_tools.backup.manifest import BackupError, fsync_dir


def available():
    return bool(shutil.which("qemu-img") and shutil.which("qemu-nbd"))


def require():
    if not available():
        raise BackupError("qcow2 images need qemu-img and qemu-nbd (Debian: qemu-utils); "
                          "use --format raw")


def convert(raw, out):
    """raw -> qcow2 (atomic: a temporary name, fsync, rename)."""
    require()
    tmp = out + ".tmp"
    p = subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", raw, tmp],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if p.returncode != 0:
        _unlink(tmp)
        raise BackupError("qemu-img convert: %s" % (p.stderr.strip() or p.returncode))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, out)
    fsync_dir(os.path.dirname(out) or ".")


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


class Image(object):
    """A qcow2 image read through qemu-nbd: read(offset, length), size, close()."""

    def __init__(self, path, timeout=60.0):
        require()
        from nbd_server.client import NbdError, Reader
        self.path = path
        self._dir = tempfile.mkdtemp(prefix="zfsng-qcow2-")
        sock = os.path.join(self._dir, "nbd.sock")
        self._proc = subprocess.Popen(
            ["qemu-nbd", "--read-only", "--format=qcow2", "--shared=1", "--socket=" + sock,
             path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        deadline = time.time() + timeout
        self.reader = None
        try:
            while not os.path.exists(sock):
                if self._proc.poll() is not None:
                    raise BackupError("qemu-nbd %s: %s" % (
                        path, self._proc.stderr.read().decode("utf-8", "replace").strip()))
                if time.time() > deadline:
                    raise BackupError("qemu-nbd did not start for %s" % path)
                time.sleep(0.02)
            while self.reader is None:
                try:
                    self.reader = Reader("nbd+unix:///?socket=" + sock)
                except NbdError as e:
                    # qemu-nbd creates the socket (bind) a moment before it
                    # listens: refused until then
                    if self._proc.poll() is not None or time.time() > deadline:
                        raise BackupError(str(e))
                    time.sleep(0.05)
        except BaseException:
            self.close()
            raise
        self.size = self.reader.size
        self._err = NbdError

    def read(self, offset, length):
        try:
            return self.reader.read(offset, length)
        except self._err as e:
            raise BackupError("%s: %s" % (self.path, e))

    def close(self):
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc.stderr.close()
            self._proc = None
        shutil.rmtree(self._dir, ignore_errors=True)
