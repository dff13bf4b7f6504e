"""Another host of the pool, as a network namespace of the test VM.

The storage node is the VM's root network namespace; a host is a namespace
behind a veth pair, with its own /etc/nvme/hostnqn + hostid
(/etc/netns/NAME/nvme, which `ip netns exec` bind-mounts over /etc/nvme).
Its plugin calls run inside it (`ip netns exec`), as xapi-storage-script runs
them on that host, with the host's own environment (HostNs.env): HostNs.call,
and its shorthands volume(METHOD) and datapath(METHOD, uri=URI).  Block devices and sysfs are not per-namespace, so tests
read the node's zvols directly to check data.

NODE_COMMAND is the stand-in for ssh to the node: nsenter into pid 1's network
and mount namespaces with a clean environment (ssh carries none of the
host's variables), running `python3 -m plugins.node_ops OP` from the
checkout (PYTHONPATH: on a real node the package is installed).
"""

import json
import os
import shutil
import subprocess

from conftest import run
from dp_helpers import DATAPATH, PluginError
from volume_calls import PLUGIN_DIR, check_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def node_command(**env):
    """The argv prefix that runs a node op in the root namespaces; env: the
    node's own variables (e.g. ZFSNG_TARGET_SOCKET)."""
    return (["nsenter", "--net=/proc/1/ns/net", "--mount=/proc/1/ns/mnt", "--",
             "env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME=/root", "PYTHONPATH=" + ROOT] + ["%s=%s" % kv for kv in sorted(env.items())] +
            ["python3", "-m", "plugins.node_ops"])


def _quiet(*argv):
    subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def disconnect_all(hostnqn):
    """`nvme disconnect` every controller connected as hostnqn."""
    for d in os.listdir("/sys/class/nvme") if os.path.isdir("/sys/class/nvme") else []:
        try:
            with open("/sys/class/nvme/%s/hostnqn" % d) as f:
                if f.read().strip() == hostnqn:
                    _quiet("nvme", "disconnect", "-d", d)
        except OSError:
            pass


class HostNs(object):
    """A host namespace `name` at host_ip, the node's end at node_ip (/24);
    env: the host's variables for its plugin calls (None: unset)."""

    def __init__(self, name, node_ip, host_ip, hostnqn, hostid, env=None):
        self.name = name
        self.node_ip, self.host_ip = node_ip, host_ip
        self.hostnqn, self.hostid = hostnqn, hostid
        self.env = dict(env or {})
        short = name[-8:]
        self.node_if, self.host_if = "n-" + short, "h-" + short
        self.etc = "/etc/netns/%s/nvme" % name

    def run(self, *argv, **kw):
        return run("ip", "netns", "exec", self.name, *argv, **kw)

    def environ(self, env=None):
        """os.environ with the host's variables, then env's, set (None: unset)."""
        e = dict(os.environ)
        for k, v in dict(self.env, **(env or {})).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return e

    def teardown(self):
        disconnect_all(self.hostnqn)
        _quiet("ip", "link", "del", self.node_if)       # deletes its peer too
        _quiet("ip", "netns", "del", self.name)
        shutil.rmtree("/etc/netns/%s" % self.name, ignore_errors=True)

    def setup(self):
        self.teardown()                                  # what a killed earlier run left
        run("ip", "netns", "add", self.name)
        run("ip", "link", "add", self.node_if, "type", "veth", "peer", "name", self.host_if)
        run("ip", "link", "set", self.host_if, "netns", self.name)
        run("ip", "addr", "add", self.node_ip + "/24", "dev", self.node_if)
        run("ip", "link", "set", self.node_if, "up")
        run("ip", "-n", self.name, "addr", "add", self.host_ip + "/24", "dev", self.host_if)
        run("ip", "-n", self.name, "link", "set", self.host_if, "up")
        run("ip", "-n", self.name, "link", "set", "lo", "up")
        os.makedirs(self.etc)
        with open(os.path.join(self.etc, "hostnqn"), "w") as f:
            f.write(self.hostnqn + "\n")
        with open(os.path.join(self.etc, "hostid"), "w") as f:
            f.write(self.hostid + "\n")
        assert self.run("cat", "/etc/nvme/hostnqn").stdout.strip() == self.hostnqn
        return self

    def call(self, exe, fails=False, env=None, timeout=300, **params):
        """A plugin call on this host, as xapi-storage-script makes it: exe
        (a plugin executable) in the namespace with the host's environment
        (and env's variables).  Its result; a failure raises PluginError, or
        with fails=True is returned (the error JSON), its shape checked."""
        params.setdefault("dbg", "test")
        p = subprocess.run(["ip", "netns", "exec", self.name, exe, "--json"],
                           input=json.dumps(params) + "\n", stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=True,
                           env=self.environ(env), timeout=timeout)
        assert "Traceback" not in p.stdout, p.stdout
        try:
            doc = json.loads(p.stdout)
        except ValueError:
            raise AssertionError("%s: not JSON on stdout (rc %d): %r\nstderr: %s"
                                 % (exe, p.returncode, p.stdout, p.stderr))
        if fails:
            assert p.returncode != 0, (exe, params, doc)
        if p.returncode != 0:
            check_error(doc)
            if not fails:
                raise PluginError(dict(doc, stderr=p.stderr))
        return doc

    def volume(self, method, **params):
        """A volume plugin call on this host (call's fails, env, timeout)."""
        return self.call(os.path.join(PLUGIN_DIR, method), **params)

    def datapath(self, method, uri, **params):
        """A call of the datapath plugin of uri's scheme on this host."""
        scheme = uri.split("://", 1)[0]
        return self.call(os.path.join(DATAPATH, scheme, method), uri=uri, **params)
