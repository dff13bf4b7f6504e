"""The Linux kernel's own NVMe/TCP target (nvmet-tcp), set up through configfs.

It is the reference peer: the harness smoke test uses it, and the benchmarks
measure our user-space target against it on the same zvol.
"""

import glob
import os
import re
import subprocess
import time
import uuid as uuidlib

NVMET = "/sys/kernel/config/nvmet"


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


class KernelTarget:
    """One subsystem with one namespace on one TCP port (loopback)."""

    def __init__(self, device, nqn=None, port=4420, addr="127.0.0.1", port_id=None):
        self.device = device
        self.nqn = nqn or "nqn.2014-08.org.zfs-ng:kernel-ref-%s" % uuidlib.uuid4().hex[:8]
        self.ns_uuid = str(uuidlib.uuid4())
        self.port = port
        self.addr = addr
        self.port_id = str(port_id or port)
        self.subsys = os.path.join(NVMET, "subsystems", self.nqn)
        self.portdir = os.path.join(NVMET, "ports", self.port_id)

    def start(self):
        os.mkdir(self.subsys)
        _write(os.path.join(self.subsys, "attr_allow_any_host"), 1)
        ns = os.path.join(self.subsys, "namespaces", "1")
        os.mkdir(ns)
        _write(os.path.join(ns, "device_path"), self.device)
        _write(os.path.join(ns, "device_uuid"), self.ns_uuid)
        _write(os.path.join(ns, "enable"), 1)
        os.mkdir(self.portdir)
        for k, v in (("addr_trtype", "tcp"), ("addr_adrfam", "ipv4"),
                     ("addr_traddr", self.addr), ("addr_trsvcid", self.port)):
            _write(os.path.join(self.portdir, k), v)
        os.symlink(self.subsys, os.path.join(self.portdir, "subsystems", self.nqn))
        return self

    def stop(self):
        link = os.path.join(self.portdir, "subsystems", self.nqn)
        if os.path.islink(link):
            os.unlink(link)
        if os.path.isdir(self.portdir):
            os.rmdir(self.portdir)
        ns = os.path.join(self.subsys, "namespaces", "1")
        if os.path.isdir(ns):
            _write(os.path.join(ns, "enable"), 0)
            os.rmdir(ns)
        if os.path.isdir(self.subsys):
            os.rmdir(self.subsys)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def find_namespace(ns_uuid, timeout=30.0):
    """/dev node of the connected namespace with this UUID, found by its
    identity: the multipath head nvmeXnY, never a hidden per-path nvmeXcYnZ
    (same uuid, no /dev node: opening it would create a regular file)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in glob.glob("/sys/class/block/nvme*n*/uuid"):
            name = path.split("/")[-2]
            try:
                if re.match(r"^nvme\d+n\d+$", name) and open(path).read().strip() == ns_uuid \
                        and os.path.exists("/dev/" + name):
                    return "/dev/" + name
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError("no NVMe namespace with uuid %s" % ns_uuid)


def connect(nqn, port, addr="127.0.0.1", extra=()):
    subprocess.run(["nvme", "connect", "-t", "tcp", "-a", addr, "-s", str(port), "-n", nqn]
                   + list(extra), check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def disconnect(nqn):
    subprocess.run(["nvme", "disconnect", "-n", nqn], stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)
