"""`zfs-ng vol attach/detach/export/attachments/holders/release`: the datapath
plugins by hand, and a dead host's hold on a volume undone on its node.

The commands run the same code xapi runs through the plugin executables
(plugins.datapath.*), so an admin attach is an ordinary attachment: it shows
in `attachments`, obeys the RO/RW rules, and `detach` undoes it.

They live here, not in vol_cmds.py, because the datapath is its own area;
`add_to(group)` puts them into the `vol` group (vol_cmds.py calls it), and
`group` is a stand-alone group with just these commands.
"""

import click

from plugins import uri as urimod
from sr_tools.output import emit, fail, json_option

DATAPATHS = {"raw": urimod.RAW, "nbd": urimod.NBD, "nvme": urimod.NVME_TCP}
CLI_DOMAIN = "u0_cli"


def _datapath(scheme):
    if scheme == urimod.RAW:
        from plugins.datapath.raw import RawDatapath
        return RawDatapath()
    if scheme == urimod.NBD:
        from plugins.datapath.nbd import NbdDatapath
        return NbdDatapath()
    from plugins.datapath.nvme import NvmeDatapath
    return NvmeDatapath()


def _uri(sr, key, datapath):
    """The volume's own URI for that datapath (from the volume plugin)."""
    from plugins.volume import volume as volumes
    scheme = DATAPATHS[datapath]
    for u in _smapi(volumes.stat, sr, key)["uri"]:
        if u.startswith(scheme + "://"):
            return u
    fail("volume %s has no %s URI (for nvme, set the SR's nvme-node)" % (key, datapath))


def _smapi(fn, *args, **kw):
    from plugins import smapi
    try:
        return fn(*args, **kw)
    except smapi.SmapiError as e:
        fail("%s: %s" % (e.name, e.message))


def _target(sr, key, datapath, uri):
    """(uri, scheme) of the volume: from SR KEY (the SR is on this machine), or
    a URI as published by the volume plugin (nvme+tcp on a host that is not
    the storage node, which it reaches through ZFSNG_NODE_COMMAND)."""
    if uri:
        if sr or key:
            fail("give either SR KEY or --uri, not both")
        try:
            return uri, urimod.parse(uri).scheme
        except urimod.BadUri as e:
            fail(str(e))
    if not (sr and key):
        fail("give SR KEY (or --uri URI)")
    return _uri(sr, key, datapath), DATAPATHS[datapath]


sr_arg = click.argument("sr", required=False)
key_arg = click.argument("key", required=False)
uri_opt = click.option("--uri", help="The volume's URI instead of SR KEY (e.g. nvme+tcp://... "
                                     "on a host without the SR).")
datapath_opt = click.option("--datapath", "-d", type=click.Choice(sorted(DATAPATHS)),
                            default="raw", show_default=True)
domain_opt = click.option("--domain", default=CLI_DOMAIN, show_default=True,
                          help="Domain the attachment is made for (xapi uses domids, u0_... "
                               "for dom0).")


@click.command()
@sr_arg
@key_arg
@datapath_opt
@domain_opt
@click.option("--readonly", is_flag=True, help="activate_readonly (snapshots always are).")
@click.option("--hostnqn", help="nvme: connect as this host NQN (default /etc/nvme/hostnqn).")
@uri_opt
@json_option
def attach(sr, key, datapath, domain, readonly, hostnqn, uri, as_json):
    """Attach and activate volume KEY of SR (or --uri); print where it is."""
    from plugins.datapath import core
    uri, scheme = _target(sr, key, datapath, uri)
    dp = _datapath(scheme)
    kw = {"hostnqn": hostnqn} if scheme == DATAPATHS["nvme"] and hostnqn else {}
    res = _smapi(dp.attach, uri, domain, **kw)
    ro = readonly or not _smapi(dp.check_writable, uri)
    try:
        _smapi(dp.activate_readonly if ro else dp.activate, uri, domain)
    except SystemExit:
        dp.detach(uri, domain)
        raise
    out = {"uri": uri, "domain": domain, "mode": core.RO if ro else core.RW}
    for kind, payload in res["implementations"]:
        if kind == "BlockDevice":
            out["device"] = payload["path"]
        elif kind == "Nbd":
            out["nbd"] = payload["uri"]
    emit(out if not as_json else dict(out, implementations=res["implementations"]), as_json)


@click.command()
@sr_arg
@key_arg
@datapath_opt
@domain_opt
@uri_opt
@json_option
def detach(sr, key, datapath, domain, uri, as_json):
    """Deactivate and detach volume KEY of SR or --uri (never fails)."""
    uri, scheme = _target(sr, key, datapath, uri)
    dp = _datapath(scheme)
    dp.detach(uri, domain)
    emit({"uri": uri, "domain": domain, "detached": True}, as_json)


@click.command()
@click.argument("sr")
@click.argument("key")
@click.option("--to-host", "hostnqn", metavar="HOSTNQN",
              help="Grant this host NQN access over NVMe/TCP (else: serve over NBD).")
@click.option("--stop", is_flag=True, help="Undo a previous export.")
@json_option
def export(sr, key, hostnqn, stop, as_json):
    """Export volume KEY of SR: over NBD on a unix socket (read-only for
    snapshots), or to one remote host over NVMe/TCP with --to-host."""
    if hostnqn:
        from plugins.datapath import node
        uri = _uri(sr, key, "nvme")
        subnqn = uri.split("/", 3)[3]
        if stop:
            node.revoke(subnqn, hostnqn)
            emit({"uri": uri, "hostnqn": hostnqn, "exported": False}, as_json)
            return
        got = _smapi(node.grant, subnqn, hostnqn)
        emit({"uri": uri, "hostnqn": hostnqn, "namespace_uuid": got["uuid"],
              "readonly": got["readonly"], "exported": True}, as_json)
        return
    uri = _uri(sr, key, "nbd")
    dp = _datapath(urimod.NBD)
    domain = "u0_export"
    if stop:
        dp.detach(uri, domain)
        emit({"uri": uri, "exported": False}, as_json)
        return
    res = _smapi(dp.attach, uri, domain, kernel_device=False)
    nbd = [p["uri"] for k, p in res["implementations"] if k == "Nbd"][0]
    emit({"uri": uri, "nbd": nbd, "exported": True}, as_json)


@click.command()
@json_option
def attachments(as_json):
    """Volumes attached on this host, by domain."""
    from plugins import state
    rows = []
    for st in state.list_states():
        for domain, rec in sorted((st.get("attached") or {}).items()):
            rows.append({"volume": st.get("volume"), "domain": domain,
                         "datapath": rec.get("scheme"),
                         "active": (st.get("active") or {}).get(domain, "-"),
                         "device": rec.get("device") or rec.get("sock") or "-"})
    emit(rows, as_json, columns=["volume", "domain", "datapath", "active", "device"])


def _node_record(sr, key):
    """(sr_uuid, subnqn, {who: {"transport", "granted", "active"}}) of volume
    KEY of SR on this node: its one node record (records.volume_lock: NVMe/TCP
    hosts granted, every activation) and its NBD grants (node_nbd)."""
    from plugins import records
    from plugins.datapath import node, node_nbd
    from plugins.volume import sr as srmod
    sr_uuid = (_smapi(srmod.read_root_props, sr) or {}).get("sr-uuid")
    if not sr_uuid:
        fail("%s is not a zfs-ng SR attached on this node" % sr)
    subnqn = urimod.subnqn_for(sr_uuid, key)
    out = {}

    def row(who, transport):
        return out.setdefault(who, {"holder": who, "transport": transport, "granted": False,
                                    "active": "-"})
    with records.volume_lock(subnqn) as st:
        for h in st.shared.get("hosts", []):
            row(h, urimod.NVME_TCP)["granted"] = True
        for who, mode in st.active.items():
            transport = ("local" if who.startswith(node.LOCAL) else
                         urimod.NVME_TCP if ":" in who else urimod.NBD_TLS)
            row(who, transport)["active"] = mode
    for cn in node_nbd.clients(sr_uuid, key):
        row(cn, urimod.NBD_TLS)["granted"] = True
    return sr_uuid, subnqn, out


@click.command()
@click.argument("sr")
@click.argument("key")
@json_option
def holders(sr, key, as_json):
    """Who holds volume KEY of SR, on its storage node: hosts granted it over
    NVMe/TCP (host NQN) or NBD with TLS (certificate CN), and who has it
    active (rw/ro).  A host that died holding it read-write keeps every other
    host out (Activated_on_another_host) until `release`d."""
    _, _, rows = _node_record(sr, key)
    emit([rows[w] for w in sorted(rows)], as_json,
         columns=["holder", "transport", "granted", "active"])


@click.command()
@click.argument("sr")
@click.argument("key")
@click.argument("holder")
@json_option
def release(sr, key, holder, as_json):
    """Take volume KEY of SR away from HOLDER (a host NQN, an NBD client CN,
    or a local: activation of this node), as `holders` names it: its
    activation and grant go, and its open connection is cut (NVMe/TCP: the
    target drops the host; NBD: within a second).  For a host that died or
    must be fenced; a live host loses its disk.  Idempotent."""
    from plugins import records
    from plugins.datapath import node, node_nbd
    sr_uuid, subnqn, rows = _node_record(sr, key)
    if holder not in rows:
        emit({"holder": holder, "released": False, "why": "holds nothing"}, as_json)
        return
    transport = rows[holder]["transport"]
    if transport == "local":
        with records.volume_lock(subnqn) as st:
            st.active.pop(holder, None)
    elif transport == urimod.NVME_TCP:
        node.revoke(subnqn, holder)
    else:
        node_nbd.nbd_revoke(sr_uuid, key, holder)
    left = _node_record(sr, key)[2].get(holder)
    if left and (left["granted"] or left["active"] != "-"):
        fail("%s still holds %s: %s (see the log)" % (holder, key, left))
    emit({"holder": holder, "transport": transport, "released": True}, as_json)


COMMANDS = (attach, detach, export, attachments, holders, release)


def add_to(grp):
    for c in COMMANDS:
        grp.add_command(c)
    return grp


@click.group()
def group():
    """Attach volumes on this host, export them (datapath plugins)."""


add_to(group)
