"""A shared SR on the hosts that are not its storage node: every SR and Volume
call runs on the node.

xapi plugs a shared SR on every host of the pool (a PBD each, all with the
device_config SR.create returned) and runs SR/VDI operations on whichever host
it likes, usually the master.  An SR whose configuration has `node`
([user@]host, plugins/nodes.py) keeps its zpool on that machine:

  * on the node itself everything is local, as for any SR;
  * on another host, SR.attach asks the node to attach the SR (import the pool
    if needed) and to record this host (the SR root's `remote-hosts`, so the
    node's own SR.detach does not export the pool under it), and returns the
    remote SR string  zfs-ng://NODE/POOL.  Every later call carrying that
    string (SR.stat/ls/detach/destroy/set_*, every Volume.*) is sent to the
    node (node op `volume`: the same method table there, with sr = POOL), and the
    volume URIs in its answer are cut down to what this host can attach from
    afar, best first: nvme+tcp when the kernel has nvme-tcp, else nbd+tls
    (ZFSNG_REMOTE_DATAPATHS, a comma list of schemes, overrides the choice).
    SR.create and SR.probe with a remote `node` run on the node too.

SMAPI errors of the node cross unchanged; a node that cannot be reached is
`Node_unreachable` within ZFSNG_NODE_TIMEOUT (nodes.run).  Nothing is kept on
the host: the SR string carries all it needs, so every call is idempotent as
the node's own is.
"""

import os

from plugins import nodes, smapi
from plugins.uri import NBD_TLS, NVME_TCP
from plugins.volume import names
from plugins.volume import sr as sr_mod

PREFIX = "zfs-ng://"
REMOTE_SCHEMES = (NVME_TCP, NBD_TLS)


# -- the remote SR string: one builder, one parser ------------------------------------

def remote_sr(node, pool):
    return "%s%s/%s" % (PREFIX, nodes.check_node(node), names.check_pool(pool))


def parse_remote_sr(sr):
    """(node, pool) of a remote SR string, None for a local one (a pool name)."""
    if not isinstance(sr, str) or not sr.startswith(PREFIX):
        return None
    node, sep, pool = sr[len(PREFIX):].rpartition("/")
    if not sep:
        raise smapi.SrDoesNotExist(sr)
    try:
        return nodes.check_node(node), names.check_pool(pool)
    except smapi.InvalidParameters:
        raise smapi.SrDoesNotExist(sr)


def remote_node(configuration):
    """The SR's node when it is another machine, else None (run locally)."""
    node = configuration.get("node") if isinstance(configuration, dict) else None
    if not node:
        return None
    nodes.check_node(node)
    return None if nodes.node_is_here(node) else node


# -- what this host can attach from afar ------------------------------------------------

def _kernel_has(module):
    if os.path.isdir("/sys/module/" + module.replace("-", "_")):
        return True
    base = "/lib/modules/%s" % os.uname()[2]
    for name in ("modules.dep", "modules.builtin"):
        try:
            with open(os.path.join(base, name)) as f:
                for line in f:
                    if ("/%s.ko" % module) in line.split(":", 1)[0]:
                        return True
        except (OSError, IOError):
            pass
    return False


def host_schemes():
    """The remote datapaths this host can use, best first."""
    raw = os.environ.get("ZFSNG_REMOTE_DATAPATHS")
    if raw:
        out = [s.strip() for s in raw.split(",") if s.strip()]
        bad = [s for s in out if s not in REMOTE_SCHEMES]
        if bad:
            raise smapi.InvalidParameters("ZFSNG_REMOTE_DATAPATHS: unknown scheme(s) %s "
                                          "(known: %s)" % (", ".join(bad),
                                                           ", ".join(REMOTE_SCHEMES)))
        return out
    if _kernel_has("nvme-tcp"):
        return [NVME_TCP, NBD_TLS]
    return [NBD_TLS]     # XCP-ng 8.3's dom0 kernel has no nvme-tcp


def for_this_host(uris, schemes=None):
    """The URIs of a volume this host can attach, in its order of preference."""
    schemes = host_schemes() if schemes is None else schemes
    rank = {s: i for i, s in enumerate(schemes)}
    mine = [u for u in uris if isinstance(u, str) and u.split("://", 1)[0] in rank]
    return sorted(mine, key=lambda u: rank[u.split("://", 1)[0]])


def _rewrite(result, schemes):
    result = smapi.plain(result)     # SR.ls run here when the node is this machine
    if isinstance(result, dict) and isinstance(result.get("uri"), list):
        result = dict(result, uri=for_this_host(result["uri"], schemes))
    elif isinstance(result, list):
        result = [_rewrite(r, schemes) for r in result]
    return result


# -- the host side ----------------------------------------------------------------------

def _node_call(node, op, here, **args):
    """Node op `op` (plugins/node_ops.py) on node; `here` runs it when the node
    is this machine after all (nodes.call)."""
    return nodes.call(node, op, args, here)


def _method_here(fn):
    """What node op `volume` runs for method fn when the node is this machine."""
    return lambda method, params: fn(**params)


def forward(node, full_name, params, fn):
    """Run SMAPI method full_name (fn here) on the node with params (sr
    already the pool)."""
    schemes = host_schemes()          # checked before the node is asked anything
    result = _node_call(node, "volume", _method_here(fn), method=full_name, params=params)
    return _rewrite(result, schemes)


def routed(full_name, fn):
    """fn, or the same method on the node when its `sr` is a remote SR string."""
    def run(**kw):
        where = parse_remote_sr(kw.get("sr"))
        if where is None:
            return fn(**kw)
        node, pool = where
        return forward(node, full_name, dict(kw, sr=pool), fn)
    run.__name__ = getattr(fn, "__name__", full_name)
    run.__doc__ = fn.__doc__
    return run


def attach(configuration):
    node = remote_node(configuration)
    if node is None:
        return sr_mod.attach(configuration)
    got = _node_call(node, "sr_attach", op_sr_attach, configuration=configuration,
                     host=nodes.identity())
    if not isinstance(got, dict) or not names.is_pool(got.get("pool", "")):
        raise smapi.BackendError("Node_unreachable", "node %s: bad SR.attach answer" % node)
    if not (got.get("nvme-node") or got.get("nbd-node")):
        raise smapi.BackendError(
            "SR_not_shareable", "SR %s on node %s has neither nvme-node nor nbd-node: "
            "other hosts cannot reach its volumes (set one at SR.create)"
            % (got.get("sr_uuid", "?"), node))
    return remote_sr(node, got["pool"])


def detach(sr):
    where = parse_remote_sr(sr)
    if where is None:
        return sr_mod.detach(sr)
    node, pool = where
    try:
        _node_call(node, "sr_detach", op_sr_detach, pool=pool, host=nodes.identity())
    except smapi.SmapiError as e:
        # PBD.unplug must not fail on a node that is gone; the node keeps this
        # host in remote-hosts (its own SR.detach then leaves the pool imported)
        smapi.log.error("SR.detach %s: the node keeps this host recorded: %s %s",
                        sr, e.name, e.message)
    return None


def create(uuid, configuration, name, description):
    node = remote_node(configuration)
    if node is None:
        return sr_mod.create(uuid, configuration, name, description)
    out = _node_call(node, "volume", _method_here(sr_mod.create), method="SR.create",
                     params={"uuid": uuid, "configuration": configuration, "name": name,
                             "description": description})
    if isinstance(out, dict):
        out.setdefault("node", configuration["node"])
    return out


def probe(configuration):
    node = remote_node(configuration)
    if node is None:
        return sr_mod.probe(configuration)
    results = _node_call(node, "volume", _method_here(sr_mod.probe), method="SR.probe",
                         params={"configuration": configuration})
    for r in results if isinstance(results, list) else []:
        if isinstance(r, dict) and isinstance(r.get("configuration"), dict):
            r["configuration"].setdefault("node", configuration["node"])
    return results


# -- the node side (ops of plugins/node_ops.py; `volume` is there) ----------------------

def op_sr_attach(configuration, host):
    """Node op `sr_attach`: attach here, record host; the SR's network endpoints."""
    if not isinstance(configuration, dict):
        raise smapi.InvalidParameters("configuration must be an object")
    host = names.check_text(host, "host") if isinstance(host, str) and host else None
    if host is None:
        raise smapi.InvalidParameters("host must be a non-empty string")
    pool = sr_mod.attach(configuration)
    with sr_mod.lock.sr_lock(pool):
        sr_mod.set_remote_host(pool, host, True)
        props = sr_mod.read_root_props(pool) or {}
    return {"pool": pool, "sr_uuid": props.get("sr-uuid"),
            "nvme-node": props.get("nvme-node"), "nbd-node": props.get("nbd-node")}


def op_sr_detach(pool, host):
    """Node op `sr_detach`: host no longer uses the SR (the pool stays imported)."""
    pool = names.check_pool(pool)
    if not isinstance(host, str) or not host:
        raise smapi.InvalidParameters("host must be a non-empty string")
    with sr_mod.lock.sr_lock(pool):
        if sr_mod.read_root_props(pool) is not None:
            sr_mod.set_remote_host(pool, host, False)
    return None
