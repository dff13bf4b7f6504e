"""tap-ctl, the blktap3 control tool of XCP-ng's dom0, driven by argv.

One tapdisk process per attached (volume, domain), as XCP-ng's own tapdisk
datapath does:
    attach:     tap-ctl spawn -> pid; tap-ctl allocate -> /dev/xen/blktap-2/tapdevN;
                tap-ctl attach -m N -p pid
    activate:   tap-ctl open -m N -p pid -a aio:<zvol> [-R]
    deactivate: tap-ctl close -m N -p pid
    detach:     tap-ctl detach -m N -p pid; tap-ctl free -m N
The block device xenopsd hands to tapback is the tapdev node.
"""

import os
import subprocess

TAPDEV_PREFIX = "/dev/xen/blktap-2/tapdev"
_SEARCH = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")


class TapCtlError(RuntimeError):
    pass


def find():
    """Path of tap-ctl, or None where there is none (not a Xen dom0)."""
    override = os.environ.get("ZFSNG_TAP_CTL")
    if override is not None:
        return override or None  # empty: behave as if absent
    for d in _SEARCH:
        p = os.path.join(d, "tap-ctl")
        if os.access(p, os.X_OK):
            return p
    return None


def _run(tapctl, *args):
    argv = [tapctl] + [str(a) for a in args]
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    except OSError as e:
        raise TapCtlError("cannot run %s: %s" % (tapctl, e.strerror))
    out, err = p.communicate()
    if p.returncode != 0:
        raise TapCtlError("%s failed (%d): %s" % (" ".join(argv[:3]), p.returncode,
                                                   (err or out).strip()))
    return out


def parse_pid(output):
    text = output.strip()
    if not text.isdigit():
        raise TapCtlError("tap-ctl spawn returned unexpected output %r" % text)
    return int(text)


def parse_minor(output):
    text = output.strip()
    if not text.startswith(TAPDEV_PREFIX) or not text[len(TAPDEV_PREFIX):].isdigit():
        raise TapCtlError("tap-ctl allocate returned unexpected output %r" % text)
    return int(text[len(TAPDEV_PREFIX):])


def parse_list(output):
    """`tap-ctl list` lines (`pid=1 minor=2 state=0 args=aio:/dev/x`) as dicts."""
    rows = []
    for line in output.splitlines():
        row = {}
        for field in line.split():
            k, sep, v = field.partition("=")
            if sep:
                row[k] = v
        if row:
            rows.append(row)
    return rows


def device(minor):
    return TAPDEV_PREFIX + str(int(minor))


class TapCtl(object):
    def __init__(self, path):
        self.path = path

    def create(self):
        """spawn + allocate + attach; returns {"pid", "minor", "device"}.
        Undone on failure, so no tapdisk or minor is leaked."""
        pid = parse_pid(_run(self.path, "spawn"))
        minor = None
        try:
            minor = parse_minor(_run(self.path, "allocate"))
            _run(self.path, "attach", "-m", minor, "-p", pid)
        except TapCtlError:
            if minor is not None:
                self._quiet("free", "-m", minor)
            try:
                os.kill(pid, 15)
            except OSError:
                pass
            raise
        return {"pid": pid, "minor": minor, "device": device(minor)}

    def open(self, tap, path, readonly):
        args = ["open", "-m", tap["minor"], "-p", tap["pid"], "-a", "aio:" + path]
        if readonly:
            args.append("-R")
        _run(self.path, *args)

    def close(self, tap):
        _run(self.path, "close", "-m", tap["minor"], "-p", tap["pid"])

    def destroy(self, tap):
        """Best effort, for detach (which never fails)."""
        self._quiet("close", "-m", tap["minor"], "-p", tap["pid"])
        self._quiet("detach", "-m", tap["minor"], "-p", tap["pid"])
        self._quiet("free", "-m", tap["minor"])

    def is_open(self, tap):
        try:
            rows = parse_list(_run(self.path, "list", "-m", tap["minor"]))
        except TapCtlError:
            return False
        return any(r.get("args") for r in rows if r.get("minor") == str(tap["minor"]))

    def _quiet(self, *args):
        try:
            _run(self.path, *args)
        except TapCtlError:
            pass
