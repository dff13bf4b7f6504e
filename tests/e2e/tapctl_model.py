#!/usr/bin/python3 -S
"""A stand-in for blktap's `tap-ctl` in the test VM, which has no blktap.

It models the command line of XCP-ng 8.3's tap-ctl (blktap 3.x: read at
xapi-project/blktap v3.55.5, control/tap-ctl.c and control/tap-ctl-*.c): the
same sub-commands, options, output and bookkeeping between them, so that
zfs-ng's raw datapath (plugins/datapath/tapctl.py, pointed here with
ZFSNG_TAP_CTL=<this file>) sees what it would see on a dom0:

    spawn                         starts an idle process standing for a tapdisk;
                                  prints its pid (tap_cli_spawn, stdout not a tty)
    allocate                      the lowest free minor N: mknods the block node
                                  /dev/xen/blktap-2/tapdevN (major TAPDEV_MAJOR,
                                  minor N), prints its path (tap_ctl_allocate)
    attach  -p PID -m N           binds minor N to that tapdisk
    open    -p PID -m N -a aio:PATH [-R] [-D]
                                  the tapdisk "opens" PATH: checked by opening it
                                  read-only (-R) or read-write, O_DIRECT unless -D,
                                  then closed again; recorded
    close   -p PID -m N           forgets the open image
    detach  -p PID -m N           unbinds the minor (EBUSY while open); the
                                  tapdisk, serving nothing, exits
    free    -m N                  releases the minor, removes its node (EBUSY
                                  while attached)
    destroy -p PID -m N           close + detach + free (tap_ctl_destroy)
    create  -a aio:PATH [-R] [-D] spawn + allocate + attach + open; prints the node
    pause / unpause -p PID -m N   accepted (no data path to quiesce)
    list [-p PID] [-m N] [-t TYPE] [-f FILE]
                                  a line per live tapdisk / allocated minor, in
                                  tap_cli_list_dict's format:
                                  `pid=P minor=N state=0 args=aio:/path`

tapback does not run tap-ctl: it links libtapctl.  tap_ctl_list() and
tap_ctl_info() below are that library side, for the toolstack model's tapback
(tests/e2e/toolstack.py).

State (tapdisks, minors, open images) is one small text file,
ZFSNG_TAPCTL_STATE (default /run/zfsng-tapctl/state), updated under an flock.
A tapdisk whose process is gone is not listed (tap_ctl_list finds live
tapdisks only); its minor stays allocated until freed.

What it does NOT model: there is no data path at all.  No tapdisk reads or
writes anything, and the block node it makes has a major no driver
registered, so opening it fails (ENXIO).  The toolstack model's tapback finds
the tapdisk of a VBD by minor (as blktap's tapback/backend.c find_tapdisk
does) and serves the path that tapdisk records as open.  No blktap kernel
driver, no ring device, no `tap-ctl stats`, no vhd, no encryption, no
secondary/mirror images, no read caching (-r), no timeouts.  blktap 4.x
(2025) dropped the tapdev nodes altogether (tap-ctl allocate prints
/run/blktap-control/tapdisk/tapdisk-N); this models 3.x, what XCP-ng 8.3
ships.

Started with -S and few imports: it runs many times per VM start in a slow
(TCG) guest.
"""

import errno
import fcntl
import os
import sys

# A block major no driver in the test VM registers (its /proc/devices lists
# 2 fd, 43 nbd, 230 zvol, 254 virtblk, 259 blkext; dynamic majors are handed
# out from 254 down).  On a dom0 it is the blktap driver's "tapdev" major,
# which tapback reads from /proc/devices (tapback/tapback.c get_tapdev_major).
TAPDEV_MAJOR = int(os.environ.get("ZFSNG_TAPCTL_MAJOR", "241"))
TAPDEV_DIR = "/dev/xen/blktap-2"
TAPDEV_PREFIX = TAPDEV_DIR + "/tapdev"
DEFAULT_STATE = "/run/zfsng-tapctl/state"


class Fail(Exception):
    def __init__(self, err, msg):
        Exception.__init__(self, msg)
        self.err = err


def state_path(path=None):
    return path or os.environ.get("ZFSNG_TAPCTL_STATE") or DEFAULT_STATE


class State(object):
    """tapdisks: {pid: {"minor", "args", "ro", "o_direct"}}; minors: {N: pid or None}.
    File lines: `T pid minor|- ro o_direct args|-` and `M minor pid|-`."""

    def __init__(self, path=None, write=True):
        self.path = state_path(path)
        self.write = write

    def __enter__(self):
        d = os.path.dirname(self.path)
        if not os.path.isdir(d):
            os.makedirs(d, exist_ok=True)
        self._lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX if self.write else fcntl.LOCK_SH)
        self.tapdisks, self.minors = {}, {}
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            p = line.split(" ", 5)
            if p[0] == "T" and len(p) == 6:
                self.tapdisks[int(p[1])] = {
                    "minor": None if p[2] == "-" else int(p[2]), "ro": p[3] == "1",
                    "o_direct": p[4] == "1", "args": None if p[5] == "-" else p[5]}
            elif p[0] == "M" and len(p) == 3:
                self.minors[int(p[1])] = None if p[2] == "-" else int(p[2])
        return self

    def __exit__(self, kind, value, tb):
        try:
            if kind is None and self.write:
                out = []
                for pid, t in sorted(self.tapdisks.items()):
                    out.append("T %d %s %d %d %s" % (
                        pid, "-" if t["minor"] is None else t["minor"], t["ro"], t["o_direct"],
                        t["args"] or "-"))
                for m, pid in sorted(self.minors.items()):
                    out.append("M %d %s" % (m, "-" if pid is None else pid))
                tmp = self.path + ".tmp"
                with open(tmp, "w") as f:
                    f.write("\n".join(out) + "\n")
                os.rename(tmp, self.path)
        finally:
            os.close(self._lock)


def alive(pid):
    try:
        with open("/proc/%d/stat" % int(pid)) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError, ValueError):
        return False


def block_major_registered(major):
    try:
        with open("/proc/devices") as f:
            text = f.read()
    except OSError:
        return False
    block = text.split("Block devices:", 1)[-1]
    return any(line.split()[:1] == [str(major)] for line in block.splitlines())


def parse_opts(args, spec):
    """getopt-style: spec maps option letters to True when they take a value."""
    out = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("-") or len(a) < 2 or a[1] not in spec:
            raise Fail(errno.EINVAL, "unknown option %r" % a)
        if spec[a[1]]:
            if len(a) > 2:
                out[a[1]] = a[2:]
            elif i + 1 < len(args):
                i += 1
                out[a[1]] = args[i]
            else:
                raise Fail(errno.EINVAL, "option -%s needs a value" % a[1])
        else:
            out[a[1]] = True
        i += 1
    return out


def need_int(opts, k, usage):
    try:
        return int(opts[k])
    except (KeyError, ValueError):
        raise Fail(errno.EINVAL, "usage: " + usage)


def pair(st, opts, usage):
    pid, minor = need_int(opts, "p", usage), need_int(opts, "m", usage)
    td = st.tapdisks.get(pid)
    if td is None or not alive(pid):
        raise Fail(errno.ESRCH, "no tapdisk with pid %d" % pid)
    if td["minor"] != minor:
        raise Fail(errno.ENOENT, "tapdisk %d does not serve minor %d" % (pid, minor))
    return pid, minor, td


# -- commands -----------------------------------------------------------------------

def cmd_spawn(st, args):
    parse_opts(args, {})
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawnp("sleep", ["sleep", "infinity"], os.environ, setsid=True,
                              file_actions=[(os.POSIX_SPAWN_DUP2, null, 0),
                                            (os.POSIX_SPAWN_DUP2, null, 1),
                                            (os.POSIX_SPAWN_DUP2, null, 2)])
    finally:
        os.close(null)
    st.tapdisks[pid] = {"minor": None, "args": None, "ro": False, "o_direct": True}
    return "%d" % pid


def cmd_allocate(st, args):
    parse_opts(args, {})
    if block_major_registered(TAPDEV_MAJOR):
        raise Fail(errno.EEXIST, "the stand-in's tapdev major %d is a real driver's here; "
                   "set ZFSNG_TAPCTL_MAJOR" % TAPDEV_MAJOR)
    minor = 0
    while minor in st.minors:
        minor += 1
    if not os.path.isdir(TAPDEV_DIR):
        os.makedirs(TAPDEV_DIR, exist_ok=True)
    node = TAPDEV_PREFIX + str(minor)
    try:
        os.unlink(node)
    except OSError:
        pass
    import stat
    os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(TAPDEV_MAJOR, minor))
    st.minors[minor] = None
    return node


def cmd_attach(st, args):
    usage = "attach <-p pid> <-m minor>"
    opts = parse_opts(args, {"p": True, "m": True})
    pid, minor = need_int(opts, "p", usage), need_int(opts, "m", usage)
    td = st.tapdisks.get(pid)
    if td is None or not alive(pid):
        raise Fail(errno.ESRCH, "no tapdisk with pid %d" % pid)
    if minor not in st.minors:
        raise Fail(errno.ENODEV, "minor %d is not allocated" % minor)
    if st.minors[minor] not in (None, pid) or td["minor"] not in (None, minor):
        raise Fail(errno.EBUSY, "minor %d or tapdisk %d is already attached" % (minor, pid))
    st.minors[minor] = pid
    td["minor"] = minor


def cmd_open(st, args):
    usage = "open <-p pid> <-m minor> <-a type:/path/to/file> [-R] [-D]"
    opts = parse_opts(args, {"p": True, "m": True, "a": True, "R": False, "D": False,
                             "e": True, "r": False, "2": True, "s": False, "t": True,
                             "C": True})
    if "a" not in opts:
        raise Fail(errno.EINVAL, "usage: " + usage)
    pid, minor, td = pair(st, opts, usage)
    if td["args"]:
        raise Fail(errno.EBUSY, "tapdisk %d minor %d already has %s open"
                   % (pid, minor, td["args"]))
    kind, sep, path = opts["a"].partition(":")
    if not sep or kind != "aio" or not path or " " in path:
        raise Fail(errno.EINVAL, "the stand-in models aio:PATH images only, not %r" % opts["a"])
    ro = bool(opts.get("R"))
    o_direct = not opts.get("D")
    flags = (os.O_RDONLY if ro else os.O_RDWR) | (getattr(os, "O_DIRECT", 0) if o_direct else 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise Fail(e.errno, "tapdisk %d: cannot open %s %s: %s"
                   % (pid, path, "read-only" if ro else "read-write", e.strerror))
    os.close(fd)
    td.update({"args": "aio:" + path, "ro": ro, "o_direct": o_direct})


def cmd_close(st, args):
    usage = "close <-p pid> <-m minor> [-f force] [-t timeout secs]"
    opts = parse_opts(args, {"p": True, "m": True, "f": False, "t": True})
    _pid, _minor, td = pair(st, opts, usage)
    td["args"] = None


def cmd_detach(st, args):
    usage = "detach <-p pid> <-m minor>"
    opts = parse_opts(args, {"p": True, "m": True})
    pid, minor, td = pair(st, opts, usage)
    if td["args"]:
        raise Fail(errno.EBUSY, "tapdisk %d minor %d still has %s open" % (pid, minor, td["args"]))
    st.minors[minor] = None
    del st.tapdisks[pid]
    try:
        os.kill(pid, 15)   # a tapdisk serving nothing exits
    except OSError:
        pass


def cmd_free(st, args):
    usage = "free <-m minor>"
    opts = parse_opts(args, {"m": True})
    minor = need_int(opts, "m", usage)
    if minor not in st.minors:
        raise Fail(errno.ENODEV, "minor %d is not allocated" % minor)
    pid = st.minors[minor]
    if pid is not None and alive(pid):
        raise Fail(errno.EBUSY, "minor %d is attached to tapdisk %d" % (minor, pid))
    del st.minors[minor]
    try:
        os.unlink(TAPDEV_PREFIX + str(minor))
    except OSError:
        pass


def cmd_destroy(st, args):
    usage = "destroy <-p pid> <-m minor> [-t timeout secs]"
    opts = parse_opts(args, {"p": True, "m": True, "t": True})
    pid, minor = need_int(opts, "p", usage), need_int(opts, "m", usage)
    pm = ["-p", str(pid), "-m", str(minor)]
    cmd_close(st, pm)
    cmd_detach(st, pm)
    cmd_free(st, ["-m", str(minor)])


def cmd_create(st, args):
    opts = parse_opts(args, {"a": True, "R": False, "D": False, "d": True, "e": True,
                             "r": False, "2": True, "s": False, "t": True, "C": True})
    if "a" not in opts:
        raise Fail(errno.EINVAL, "usage: create <-a type:/path/to/file> [-R] [-D]")
    pid = cmd_spawn(st, [])
    node = cmd_allocate(st, [])
    minor = node[len(TAPDEV_PREFIX):]
    cmd_attach(st, ["-p", pid, "-m", minor])
    more = (["-R"] if opts.get("R") else []) + (["-D"] if opts.get("D") else [])
    cmd_open(st, ["-p", pid, "-m", minor, "-a", opts["a"]] + more)
    return node


def cmd_pause(st, args):
    opts = parse_opts(args, {"p": True, "m": True, "t": True, "a": True, "2": True, "c": True})
    pair(st, opts, "pause|unpause <-p pid> <-m minor>")


def entries(st):
    """tap_ctl_list: (pid, minor, state, type, path) of live tapdisks, then of
    allocated minors no live tapdisk serves."""
    out, served = [], set()
    for pid, td in sorted(st.tapdisks.items()):
        if not alive(pid):
            continue
        typ, path = None, None
        if td["args"]:
            typ, _, path = td["args"].partition(":")
        out.append((pid, td["minor"], 0, typ, path))
        if td["minor"] is not None:
            served.add(td["minor"])
    for minor in sorted(st.minors):
        if minor not in served:
            out.append((None, minor, None, None, None))
    return out


def cmd_list(st, args):
    opts = parse_opts(args, {"p": True, "m": True, "t": True, "f": True})
    want_pid = int(opts["p"]) if "p" in opts else None
    want_minor = int(opts["m"]) if "m" in opts else None
    lines = []
    for pid, minor, state, typ, path in entries(st):
        if want_minor is not None and minor != want_minor:
            continue
        if want_pid is not None and pid != want_pid:
            continue
        if "t" in opts and typ != opts["t"]:
            continue
        if "f" in opts and path != opts["f"]:
            continue
        fields = []
        if pid is not None:
            fields.append("pid=%d" % pid)
        if minor is not None:
            fields.append("minor=%d" % minor)
        if state is not None:
            fields.append("state=%s" % (hex(state) if state else "0"))   # "%#x"
        if typ and path:
            fields.append("args=%s:%s" % (typ, path))
        lines.append(" ".join(fields))
    return "\n".join(lines) if lines else None


COMMANDS = {
    "spawn": cmd_spawn, "allocate": cmd_allocate, "attach": cmd_attach, "open": cmd_open,
    "close": cmd_close, "detach": cmd_detach, "free": cmd_free, "destroy": cmd_destroy,
    "create": cmd_create, "pause": cmd_pause, "unpause": cmd_pause, "list": cmd_list,
}
READ_ONLY = ("list",)


# -- libtapctl, as tapback uses it ----------------------------------------------------

def tap_ctl_list(path=None):
    """[{"pid", "minor", "state", "type", "path"}] (control/tap-ctl-list.c)."""
    with State(path, write=False) as st:
        return [dict(zip(("pid", "minor", "state", "type", "path"), e)) for e in entries(st)]


def tap_ctl_info(pid, minor, path=None):
    """What tapback asks the tapdisk serving minor (tap_ctl_info: size and
    flags, VDISK_READONLY among them): here whether the image is open and
    read-only; Fail(ENODEV) when nothing is open."""
    with State(path, write=False) as st:
        td = st.tapdisks.get(int(pid))
        if td is None or td["minor"] != int(minor) or not alive(pid):
            raise Fail(errno.ESRCH, "no tapdisk %s serving minor %s" % (pid, minor))
        if not td["args"]:
            raise Fail(errno.ENODEV, "tapdisk %s minor %s has no image open" % (pid, minor))
        return {"args": td["args"], "readonly": td["ro"], "o_direct": td["o_direct"]}


def tapdisk_pids(path=None):
    """Pids of the idle processes this stand-in spawned and still records
    (for test cleanup: only those are ever signalled)."""
    try:
        with State(path, write=False) as st:
            return list(st.tapdisks)
    except OSError:
        return []


def main(argv):
    if not argv or argv[0] not in COMMANDS:
        sys.stderr.write("usage: tap-ctl <%s> [options]\n" % "|".join(sorted(COMMANDS)))
        return errno.EINVAL
    try:
        with State(write=argv[0] not in READ_ONLY) as st:
            out = COMMANDS[argv[0]](st, argv[1:])
    except Fail as e:
        sys.stderr.write("tap-ctl %s: %s\n" % (argv[0], e))
        return e.err or 1
    if out:
        sys.stdout.write(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
