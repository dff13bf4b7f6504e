"""The storage node of an SR, and how another host of the pool reaches it.

An SR whose configuration names a `node` ([user@]host) keeps its zpool on that
machine.  Every host of the XCP-ng pool plugs the SR (a PBD per host); the one
whose own addresses include the node's runs everything locally, the others
send what needs the pool to the node (plugins/volume/remote.py) and attach
volumes over the network (nvme+tcp, nbd+tls).

Who is the node: `is_local(host)`, decided by the address alone: the name
resolves to an address a socket on this host can bind (one of its own
interfaces, in its own network namespace), or to loopback.

Transport (call): an op runs in-process when the node is this machine (the
caller hands over the op's function), else one op per process,
`python3 -m plugins.node_ops OP` on the node (plugins/node_ops.py: the table),
one JSON object of arguments on stdin, one JSON line out: `{"result": ...}`
or `{"error": [name, message]}` (SMAPI errors cross unchanged).  The
argv prefix is ZFSNG_NODE_COMMAND (a JSON list, the host's explicit choice:
tests use nsenter into the node's namespaces) or else ssh to the node:
`ssh -o BatchMode=yes -o ConnectTimeout=10 [user@]host python3 -m ...`
(root when no user is given; keys set up by the admin, see the README).
A node that cannot be run, answers garbage or does not answer within
ZFSNG_NODE_TIMEOUT seconds (default 120) is `Node_unreachable`; the whole
process group of the transport is killed then.
"""

import json
import os
import re
import signal
import subprocess

from plugins import smapi

NODE_MODULE = ["python3", "-m", "plugins.node_ops"]
SSH = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]

_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
_HOSTNAME = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\Z")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]{2,45}\Z")


# -- the `node` configuration key: one parser, one builder ------------------------

def split_node(node):
    """(user or None, host) of a `node` value "[user@]host"; InvalidParameters
    for anything else (it reaches ssh's argv)."""
    if not isinstance(node, str):
        raise smapi.InvalidParameters("node must be a string [user@]host")
    user, sep, host = node.rpartition("@")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if sep and not _USER.match(user):
        raise smapi.InvalidParameters("node %r: invalid user %r" % (node, user))
    if not (_HOSTNAME.match(host) or (":" in host and _IPV6.match(host))):
        raise smapi.InvalidParameters("node %r must be [user@]host" % (node,))
    return (user if sep else None), host


def check_node(node):
    split_node(node)
    return node


def node_string(user, host):
    """The `node` value of user (or None) at host."""
    return check_node("%s@%s" % (user, host) if user else host)


def ssh_destination(node):
    user, host = split_node(node)
    return "%s@%s" % (user or "root", host)


# -- who is the node ---------------------------------------------------------------

def _addresses(host):
    import socket   # here: most plugin calls never ask who the node is
    try:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return [(i[0], i[4][0]) for i in infos]


def is_local(host):
    """True when host names this machine (in its network namespace)."""
    import socket
    for family, addr in _addresses(host):
        if family == socket.AF_INET and addr.startswith("127."):
            return True
        if family == socket.AF_INET6 and addr == "::1":
            return True
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            s.bind((addr, 0))
            return True
        except OSError:
            pass
        finally:
            s.close()
    return False


def node_is_here(node):
    """Whether the SR node `node` ([user@]host) is this machine."""
    return is_local(split_node(node)[1])


def identity():
    """This host's name in the node's records (ZFSNG_HOST_ID, else the NVMe host
    NQN, else the host name): stable per host, distinct between hosts."""
    v = os.environ.get("ZFSNG_HOST_ID")
    if v:
        return v
    try:
        with open("/etc/nvme/hostnqn") as f:
            v = f.read().strip()
    except (OSError, IOError):
        v = ""
    import socket
    return v or socket.gethostname()


# -- transport ---------------------------------------------------------------------

def override():
    """ZFSNG_NODE_COMMAND as an argv prefix, or None."""
    raw = os.environ.get("ZFSNG_NODE_COMMAND")
    if not raw:
        return None
    try:
        argv = json.loads(raw)
    except ValueError:
        argv = None
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise smapi.InvalidParameters("ZFSNG_NODE_COMMAND must be a JSON list of strings")
    return argv


def command(node=None):
    """The argv prefix that runs a node op on `node`; None: run it in-process.
    node None: ZFSNG_NODE_COMMAND if set, else in-process (the node is here)."""
    if node is not None:
        if node_is_here(node):
            return None
        return override() or (SSH + ["--", ssh_destination(node)] + NODE_MODULE)
    return override()


def timeout():
    """ZFSNG_NODE_TIMEOUT seconds (default 120) for one remote node op."""
    try:
        t = int(os.environ.get("ZFSNG_NODE_TIMEOUT", "120"))
    except ValueError:
        raise smapi.InvalidParameters("ZFSNG_NODE_TIMEOUT must be a number of seconds")
    if t <= 0:
        raise smapi.InvalidParameters("ZFSNG_NODE_TIMEOUT must be positive")
    return t


def _kill_group(p):
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pass    # the pipes die with the group; never wait on them forever


def call(node, op, args, here):
    """Run node op `op` with args (a dict) on `node` ([user@]host, or None: the
    ZFSNG_NODE_COMMAND node if set, else this machine): here(**args) in-process
    when the node is this machine (`here` is the function node_ops.OPS[op] names
    for it), else through command(node); SMAPI errors cross as such."""
    argv = command(node)
    if argv is None:
        return here(**args)
    return run(argv, op, args)


def run(argv, op, args):
    """Run node op `op` through the argv prefix; its result, or its SMAPI error raised."""
    limit = timeout()          # checked before anything runs
    try:
        # its own session: a timeout kills the whole group (ssh, sudo, wrappers),
        # not just the child while a grandchild keeps the pipes open
        p = subprocess.Popen(argv + [op], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True,
                             start_new_session=True)
    except OSError as e:
        raise smapi.BackendError("Node_unreachable", "cannot run %s: %s" % (argv[0], e.strerror))
    try:
        out, err = p.communicate(json.dumps(args) + "\n", timeout=limit)
    except subprocess.TimeoutExpired:
        # a hung ssh or node must not hang xapi's call (and the volume's lock) forever
        _kill_group(p)
        raise smapi.BackendError("Node_unreachable", "node op %s: no answer from %s within "
                                 "%d s" % (op, argv[0], limit))
    try:
        resp = json.loads(out.strip().splitlines()[-1])
        if not isinstance(resp, dict):
            raise ValueError(resp)
    except (ValueError, IndexError):
        raise smapi.BackendError("Node_unreachable", "node op %s failed: %s"
                                 % (op, err.strip()[-2000:] or "no answer"))
    if "error" in resp:
        try:
            name, msg = resp["error"]
        except (TypeError, ValueError):
            raise smapi.BackendError("Node_unreachable", "node op %s: bad answer" % op)
        raise smapi.SmapiError(str(msg), str(name))
    return resp.get("result")
