"""Run one SMAPIv3 method the way xapi-storage-script calls it.

xapi-storage-script executes `<dir>/<Interface>.<method> --json` with one JSON
line of named parameters (always including `dbg`) on stdin.  On success the
result value alone goes to stdout and the exit status is 0; on failure stdout
carries the error JSON

    {"code": "SR_BACKEND_FAILURE", "params": [name, message],
     "backtrace": {"error": str, "files": [str], "lines": [int]}}

and the exit status is 1.  The daemon turns params ["Activated_on_another_host",
uuid] into that IDL error and everything else into a Backend_error (see
xapi-storage-script main.ml, backend_backtrace_error).

Plugins describe their methods with `Method` objects and call `main(methods)`
from their entry script; one script per interface with a symlink per method,
dispatched on basename(argv[0]), case-insensitively as the daemon looks up.
Logging goes to stderr and syslog (LOCAL2 -> /var/log/SMlog on XCP-ng), never
to stdout.
"""

import errno
import json
import os
import sys

API_VERSION = "5.0"


# -- errors -----------------------------------------------------------------

class SmapiError(Exception):
    """An error the caller must see as SR_BACKEND_FAILURE [name, message]."""

    name = "Backend_error"

    def __init__(self, message, name=None):
        Exception.__init__(self, message)
        if name is not None:
            self.name = name

    @property
    def message(self):
        return str(self)

    def params(self):
        return [self.name, self.message]


class BackendError(SmapiError):
    """A named backend failure, e.g. BackendError("Device_in_use", "...")."""

    def __init__(self, name, message):
        SmapiError.__init__(self, message, name)


class InvalidParameters(SmapiError):
    name = "Invalid_parameters"


# The IDL's declared errors (xapi-storage generator common.ml): the message is
# the single string argument the IDL gives them (a key, an SR, a method...).
class SrNotAttached(SmapiError):
    name = "Sr_not_attached"


class SrDoesNotExist(SmapiError):
    name = "SR_does_not_exist"


class VolumeDoesNotExist(SmapiError):
    name = "Volume_does_not_exist"


class Unimplemented(SmapiError):
    name = "Unimplemented"


class Cancelled(SmapiError):
    name = "Cancelled"


class ActivatedOnAnotherHost(SmapiError):
    name = "Activated_on_another_host"


def error_json(exc, tb=None):
    """The error record for exc.  Unknown exceptions become Internal_error with
    their class name, so nothing ever escapes as a Python traceback."""
    if isinstance(exc, SmapiError):
        params = exc.params()
    else:
        params = ["Internal_error", "%s: %s" % (type(exc).__name__, exc)]
    files, lines = [], []
    import traceback
    for frame in traceback.extract_tb(tb) if tb is not None else []:
        files.append(frame[0])
        lines.append(frame[1])
    return {
        "code": "SR_BACKEND_FAILURE",
        "params": [str(p) for p in params],
        "backtrace": {"error": str(params[1]), "files": files, "lines": lines},
    }


# -- parameter checking -------------------------------------------------------

def _type_name(t):
    return {str: "string", int: "int", bool: "bool", dict: "object", list: "list"}[t]


class Param(object):
    """A named parameter: type is str, int, bool, dict (string -> string) or
    list (of strings)."""

    def __init__(self, name, type_, doc="", optional=False):
        self.name = name
        self.type = type_
        self.doc = doc
        self.optional = optional

    def check(self, value):
        t = self.type
        ok = isinstance(value, t)
        if t is int and isinstance(value, bool):
            ok = False
        if ok and t is dict:
            ok = all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        if ok and t is list:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise InvalidParameters("parameter %r must be %s, got %s"
                                    % (self.name, _type_name(t), json.dumps(value)))
        return value


class Encoded(object):
    """A result already encoded as JSON, in parts (a method whose output is
    big and mostly stored as text, SR.ls): written as it is, part by part,
    never joined into one more copy."""

    def __init__(self, parts):
        self.parts = list(parts)

    def text(self):
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def value(self):
        return json.loads(self.text())


class FileText(object):
    """A part of an Encoded result that is a file's UTF-8 text from offset
    on (SR.ls's listing kept in /run): the kernel copies it to stdout
    (sendfile), no Python string of it is made.  Owns the open file."""

    def __init__(self, f, offset):
        self.f = f
        self.offset = offset

    def text(self):
        self.f.seek(self.offset)
        return self.f.read().decode("utf-8")

    def write_to(self, stdout):
        try:
            out = stdout.fileno()
        except (AttributeError, ValueError, OSError):     # io.StringIO: no fd
            stdout.write(self.text())
            return
        stdout.flush()
        src = self.f.fileno()
        end = os.fstat(src).st_size
        at = self.offset
        while at < end:
            try:
                n = os.sendfile(out, src, at, min(end - at, 1 << 30))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS) or at != self.offset:
                    raise
                break                   # no sendfile to this fd: copied below
            if n == 0:
                return
            at += n
        while at < end:
            chunk = os.pread(src, min(end - at, 1 << 20), at)
            if not chunk:
                return
            mv = memoryview(chunk)
            while mv:
                mv = mv[os.write(out, mv):]
            at += len(chunk)


def plain(result):
    """A method's result as a JSON value (an Encoded one parsed): for callers
    that look inside it, e.g. the node op answering another host."""
    return result.value() if isinstance(result, Encoded) else result


def encoded_list(body):
    """Encoded of a JSON list from its items' texts joined by commas."""
    return Encoded(["[", body, "]"])


class Method(object):
    """An SMAPIv3 method: `fn(**params)` returns the JSON-able result (or
    an Encoded one)."""

    def __init__(self, interface, name, fn, params=(), doc=""):
        self.interface = interface
        self.name = name
        self.fn = fn
        self.params = list(params)
        self.doc = doc

    @property
    def full_name(self):
        return "%s.%s" % (self.interface, self.name)

    def bind(self, args):
        """Checked keyword arguments from the decoded stdin object."""
        if not isinstance(args, dict):
            raise InvalidParameters("%s expects a JSON object of parameters" % self.full_name)
        known = {p.name for p in self.params} | {"dbg"}
        out = {}
        for p in self.params:
            if p.name not in args:
                if p.optional:
                    continue
                raise InvalidParameters("%s: missing parameter %r" % (self.full_name, p.name))
            out[p.name] = p.check(args[p.name])
        unknown = sorted(set(args) - known)
        if unknown:
            # Newer xapi may send more; log, do not fail.
            log.info("%s: ignoring unknown parameters %s", self.full_name, ", ".join(unknown))
        return out

    def help(self):
        lines = ["usage: %s --json < PARAMS   or   %s [name=value ...]" % (self.full_name,
                                                                             self.full_name)]
        if self.doc:
            lines += ["", self.doc]
        lines += ["", "parameters (JSON object on one stdin line, `dbg` always accepted):"]
        for p in self.params:
            lines.append("  %-16s %-7s %s%s" % (p.name, _type_name(p.type), p.doc,
                                                " (optional)" if p.optional else ""))
        return "\n".join(lines) + "\n"


def _parse_kv(method, argv):
    """Hand use: name=value arguments; values of non-string parameters are JSON."""
    types = {p.name: p.type for p in method.params}
    args = {}
    for a in argv:
        if "=" not in a:
            raise InvalidParameters("expected name=value, got %r" % a)
        k, v = a.split("=", 1)
        if types.get(k, str) is not str:
            try:
                v = json.loads(v)
            except ValueError:
                raise InvalidParameters("parameter %r: %r is not JSON" % (k, v))
        args[k] = v
    args.setdefault("dbg", "cli")
    return args


# -- logging and the entry point ---------------------------------------------

class Log(object):
    """The plugins' log: one line per record, "zfs-ng[PID] message", to stderr
    and, once `setup` found /dev/log, to syslog as LOCAL2 (XCP-ng's rsyslog
    sends local2 to /var/log/SMlog, where SM's own plugins log).

    Not the logging package: every plugin call is a new interpreter, and
    logging with its handlers (traceback, threading, socket, string, ...) was
    the largest import of a call that does no more than this (Plugin.Query in
    the TCG test VM: logging 0.28 s of 1.4 s of imports, python -X importtime).
    The long-running nvmeof_target keeps logging."""

    INFO, WARNING, ERROR = 6, 4, 3   # syslog priorities (LOG_INFO, ...)

    def __init__(self, name):
        self.name = name
        self._syslog = None

    def setup(self):
        """Send records to syslog too, when this host has one (idempotent)."""
        if self._syslog is None and os.path.exists("/dev/log"):
            import syslog
            syslog.openlog(self.name, syslog.LOG_PID, syslog.LOG_LOCAL2)
            self._syslog = syslog

    def _emit(self, priority, fmt, args):
        msg = fmt % args if args else fmt
        try:
            sys.stderr.write("%s[%d] %s\n" % (self.name, os.getpid(), msg))
            sys.stderr.flush()
        except (OSError, IOError, ValueError):
            pass   # a closed stderr must not turn a result into a failure
        if self._syslog is not None:
            for line in msg.splitlines() or [""]:
                self._syslog.syslog(priority, line)

    def info(self, fmt, *args):
        self._emit(self.INFO, fmt, args)

    def warning(self, fmt, *args):
        self._emit(self.WARNING, fmt, args)

    def error(self, fmt, *args):
        self._emit(self.ERROR, fmt, args)

    def exception(self, fmt, *args):
        """error() with the traceback of the exception being handled."""
        import traceback
        self._emit(self.ERROR, "%s\n%s", (fmt % args if args else fmt,
                                            traceback.format_exc().rstrip()))


log = Log("zfs-ng")


def setup_logging():
    log.setup()


def find_method(methods, argv0):
    want = os.path.basename(argv0).lower()
    for m in methods:
        if m.full_name.lower() == want:
            return m
    return None


def call(method, args):
    """Run method on already-decoded args: (exit status, stdout text in a
    list of parts)."""
    try:
        kw = method.bind(args)
        log.info("%s %s", method.full_name, json.dumps(args, sort_keys=True))
        result = method.fn(**kw)
        if isinstance(result, Encoded):
            return 0, result.parts
        return 0, [json.dumps(result)]
    except Exception as e:  # the contract: every failure is error JSON
        if not isinstance(e, SmapiError):
            import traceback
            log.error("%s failed:\n%s", method.full_name, traceback.format_exc())
        else:
            log.info("%s: %s %s", method.full_name, e.name, e.message)
        return 1, [json.dumps(error_json(e, sys.exc_info()[2]))]


def main(methods, argv=None, stdin=None, stdout=None):
    """Entry point of a plugin script; returns the exit status."""
    argv = sys.argv if argv is None else argv
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    setup_logging()
    method = find_method(methods, argv[0])
    if method is None:
        names = ", ".join(sorted(m.full_name for m in methods))
        err = Unimplemented(os.path.basename(argv[0]))
        stdout.write(json.dumps(error_json(err)) + "\n")
        sys.stderr.write("unknown method %r; this script implements: %s\n"
                         % (os.path.basename(argv[0]), names))
        return 1
    rest = argv[1:]
    if "--help" in rest or "-h" in rest:
        stdout.write(method.help())
        return 0
    try:
        if rest and rest[0] == "--json":
            line = stdin.readline()
            try:
                args = json.loads(line)
            except ValueError as e:
                raise InvalidParameters("stdin is not one JSON line: %s" % e)
        else:
            args = _parse_kv(method, rest)
    except SmapiError as e:
        stdout.write(json.dumps(error_json(e)) + "\n")
        return 1
    status, out = call(method, args)
    for part in out:
        if isinstance(part, str):
            stdout.write(part)
        else:
            part.write_to(stdout)
    stdout.write("\n")
    stdout.flush()
    return status
