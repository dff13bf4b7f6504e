"""The NVMe/TCP host side: connect a controller with nvme-cli, find its
namespace by identity in sysfs, disconnect exactly that controller.

Devices are never guessed: /dev/nvmeXnY numbering depends on connect order.
A controller is ours when sysfs shows our subsystem NQN, our host NQN and the
target address; a namespace is ours when its uuid (or nguid) is the one the
storage node announced.  Disconnect goes by controller (`-d nvmeX`), never by
NQN, which would also drop other host NQNs connected to the same subsystem.
"""

import glob
import json
import os
import re
import subprocess
import time
import uuid as uuidlib

SYS_NVME = "/sys/class/nvme"
SYS_BLOCK = "/sys/class/block"
HOSTNQN_FILE = "/etc/nvme/hostnqn"
HOSTID_FILE = "/etc/nvme/hostid"
# DH-HMAC-CHAP secrets of this host's NQNs, mode 0600 (ZFSNG_DHCHAP_KEYS):
# {"HOSTNQN": {"secret": "DHHC-1:..", "ctrl_secret": "DHHC-1:.." (optional)}}
DHCHAP_KEYS_FILE = "/etc/zfs-ng/dhchap-keys.json"
_CTRL = re.compile(r"^nvme[0-9]+\Z")
_NSDEV = re.compile(r"^nvme[0-9]+n[0-9]+\Z")  # heads and plain namespaces, not nvmeXcYnZ paths
_HEX = re.compile(r"^[0-9a-f]{32}\Z")


class NvmeError(RuntimeError):
    pass


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except (OSError, IOError):
        return None


def default_hostnqn():
    nqn = _read(HOSTNQN_FILE)
    if not nqn:
        raise NvmeError("no host NQN: %s is missing or empty" % HOSTNQN_FILE)
    return nqn


def hostid_for(hostnqn):
    """The host id sent with hostnqn.  The kernel refuses two host NQNs with
    one host id, so the configured id goes with the configured NQN only and
    any other NQN gets a stable id of its own."""
    if _read(HOSTNQN_FILE) == hostnqn:
        hid = _read(HOSTID_FILE)
        if hid:
            return hid
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, "zfs-ng-hostnqn:" + hostnqn))


def dhchap_keys(hostnqn, path=None):
    """(secret, ctrl_secret) of hostnqn from the host's key file, (None, None)
    when it has none.  A file others can read is refused, not used."""
    path = path or os.environ.get("ZFSNG_DHCHAP_KEYS", DHCHAP_KEYS_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise NvmeError("cannot read the DH-HMAC-CHAP key file %s: %s" % (path, e.strerror))
    with os.fdopen(fd) as f:
        if os.fstat(f.fileno()).st_mode & 0o077:
            raise NvmeError("%s holds secrets but others may read it: chmod 600 it" % path)
        try:
            doc = json.load(f)
        except ValueError as e:
            raise NvmeError("%s is not JSON: %s" % (path, e))
    ent = doc.get(hostnqn) if isinstance(doc, dict) else None
    if ent is None:
        return None, None
    if isinstance(ent, str):
        ent = {"secret": ent}
    secret, ctrl = (ent.get("secret"), ent.get("ctrl_secret")) if isinstance(ent, dict) else (
        None, None)
    for v in (secret, ctrl):
        if v is not None and not (isinstance(v, str) and v.startswith("DHHC-1:")):
            raise NvmeError("%s: the key of %s is not a DHHC-1 secret" % (path, hostnqn))
    if secret is None:
        raise NvmeError("%s: %s has no \"secret\"" % (path, hostnqn))
    return secret, ctrl


def parse_address(text):
    """sysfs `address` ("traddr=10.0.0.1,trsvcid=4420,src_addr=...") as a dict."""
    out = {}
    for part in (text or "").split(","):
        k, sep, v = part.strip().partition("=")
        if sep:
            out[k] = v
    return out


def normalize_id(value):
    """A uuid or nguid as 32 lowercase hex digits (sysfs prints uuids with
    dashes and nguids without), or None."""
    if not value:
        return None
    v = value.strip().lower().replace("-", "")
    for prefix in ("uuid.", "eui."):
        if v.startswith(prefix):
            v = v[len(prefix):]
    return v if _HEX.match(v) and v != "0" * 32 else None


def controllers(subnqn, hostnqn, host=None, port=None):
    """Live controller names (nvmeX) for this subsystem, host NQN and target."""
    found = []
    for path in sorted(glob.glob(os.path.join(SYS_NVME, "nvme*"))):
        name = os.path.basename(path)
        if not _CTRL.match(name):
            continue
        if _read(os.path.join(path, "subsysnqn")) != subnqn:
            continue
        if _read(os.path.join(path, "hostnqn")) != hostnqn:
            continue
        if _read(os.path.join(path, "transport")) not in (None, "tcp"):
            continue
        addr = parse_address(_read(os.path.join(path, "address")))
        if host is not None and addr.get("traddr") not in (None, host):
            continue
        if port is not None and addr.get("trsvcid") not in (None, str(port)):
            continue
        if _read(os.path.join(path, "state")) in ("deleting", "dead", "deleting (no IO)"):
            continue
        found.append(name)
    return found


def find_namespace(ns_id, ctrl=None):
    """/dev node of the namespace whose uuid/nguid is ns_id, or None.  With
    ctrl, only namespaces reachable through that controller count."""
    want = normalize_id(ns_id)
    if want is None:
        raise NvmeError("invalid namespace id %r" % (ns_id,))
    for path in sorted(glob.glob(os.path.join(SYS_BLOCK, "nvme*n*"))):
        name = os.path.basename(path)
        if not _NSDEV.match(name):
            continue
        ids = {normalize_id(_read(os.path.join(path, f))) for f in ("uuid", "nguid", "wwid")}
        if want not in ids:
            continue
        if ctrl is not None and not _reachable(path, ctrl):
            continue
        return "/dev/" + name
    return None


def _reachable(ns_path, ctrl):
    """Is the namespace (a multipath head or a plain namespace) served by ctrl?
    The controller's sysfs directory lists its namespaces: nvme<ctrl>nN without
    multipath, the path device nvme<subsys>c<ctrl>nN of head nvme<subsys>nN with it."""
    name = os.path.basename(ns_path)
    try:
        children = os.listdir(os.path.join(SYS_NVME, ctrl))
    except OSError:
        return False
    for child in children:
        m = re.match(r"^nvme([0-9]+)c[0-9]+n([0-9]+)\Z", child)
        if m and name == "nvme%sn%s" % m.groups():
            return True
        if child == name:
            return True
    return False


def _run(argv):
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True)
    except OSError as e:
        raise NvmeError("cannot run %s: %s" % (argv[0], e.strerror))
    out, err = p.communicate()
    return p.returncode, out, err


def connect(host, port, subnqn, hostnqn, timeout=30.0, nvme="nvme"):
    """Connect (idempotently) and return the controller name."""
    existing = controllers(subnqn, hostnqn, host, port)
    if existing:
        return existing[0]
    argv = [nvme, "connect", "-t", "tcp", "-a", host, "-s", str(port), "-n", subnqn,
            "--hostnqn", hostnqn, "--hostid", hostid_for(hostnqn),
            # fail fast rather than retrying forever behind xapi's back
            "--ctrl-loss-tmo", "30", "--reconnect-delay", "2"]
    secret, ctrl_secret = dhchap_keys(hostnqn)
    if secret:                  # NVMe in-band authentication (the node has this key)
        argv.append("--dhchap-secret=" + secret)
    if ctrl_secret:             # ... and this host checks the node back
        argv.append("--dhchap-ctrl-secret=" + ctrl_secret)
    rc, out, err = _run(argv)
    if rc != 0:
        # A concurrent call of ours may have won the race.
        existing = controllers(subnqn, hostnqn, host, port)
        if existing:
            return existing[0]
        msg = (err or out).strip().splitlines()
        raise NvmeError("nvme connect to %s:%s %s as %s failed: %s"
                        % (host, port, subnqn, hostnqn, msg[-1] if msg else "exit %d" % rc))
    deadline = time.time() + timeout
    while True:
        existing = controllers(subnqn, hostnqn, host, port)
        if existing:
            return existing[0]
        if time.time() > deadline:
            raise NvmeError("nvme connect to %s reported success but no controller appeared"
                            % subnqn)
        time.sleep(0.1)


def wait_namespace(ns_id, ctrl, timeout=30.0):
    deadline = time.time() + timeout
    while True:
        dev = find_namespace(ns_id, ctrl)
        if dev is not None and os.path.exists(dev):
            return dev
        if time.time() > deadline:
            raise NvmeError("no namespace with id %s appeared on %s within %.0f s"
                            % (ns_id, ctrl, timeout))
        time.sleep(0.1)


def disconnect(ctrl, nvme="nvme"):
    """Best effort (detach never fails): True when the controller is gone."""
    if not _CTRL.match(ctrl or ""):
        return True
    if not os.path.exists(os.path.join(SYS_NVME, ctrl)):
        return True
    _run([nvme, "disconnect", "-d", ctrl])
    deadline = time.time() + 10
    while os.path.exists(os.path.join(SYS_NVME, ctrl)) and time.time() < deadline:
        time.sleep(0.1)
    return not os.path.exists(os.path.join(SYS_NVME, ctrl))
