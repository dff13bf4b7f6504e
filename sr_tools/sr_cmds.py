"""`zfs-ng sr ...`: SRs (one zpool each), through the same library functions as
the SMAPIv3 plugin (plugins/volume/sr.py)."""

import uuid as uuid_mod

import click

from sr_tools.output import emit, fail, json_option

COLUMNS = ["sr", "name", "uuid", "health", "free_space", "total_space"]


def _lib():
    from plugins.volume import sr
    return sr


def call(fn, *args):
    """Run a library function; its errors become one clear line, exit 1."""
    from plugins.smapi import SmapiError
    try:
        return fn(*args)
    except SmapiError as e:
        fail("%s: %s" % (e.name, e.message))


def _row(st):
    row = dict(st)
    row["health"] = st["health"][0] + (" (%s)" % st["health"][1] if st["health"][1] else "")
    return row


@click.group()
def group():
    """Storage repositories: create, attach, inspect and destroy zfs-ng SRs."""


@group.command()
@click.option("--device", "devices", multiple=True, metavar="PATH",
              help="A disk (or file) for the new pool; repeat for several.")
@click.option("--vdev", default="", metavar="SPEC",
              help="stripe (default), mirror, raidz1, raidz2, raidz3, mirror:2, 'mirror 0 1 mirror 2 3'.")
@click.option("--zpool", default="", metavar="POOL", help="Adopt this imported pool instead.")
@click.option("--name", default="zfs-ng SR", show_default=True)
@click.option("--description", default="")
@click.option("--compression", default="lz4", show_default=True)
@click.option("--ashift", default="12", show_default=True)
@click.option("--autotrim", default="on", show_default=True, type=click.Choice(["on", "off"]))
@click.option("--datapath", default="raw", show_default=True,
              type=click.Choice(["raw", "nbd", "nvme"]))
@click.option("--nvme-node", default="", metavar="HOST:PORT")
@click.option("--uuid", "sr_uuid", default=None, help="SR uuid (default: a new one).")
@json_option
def create(devices, vdev, zpool, name, description, compression, ashift, autotrim, datapath,
           nvme_node, sr_uuid, as_json):
    """Create an SR (a new pool on --device, or --zpool) and attach it."""
    sr = _lib()
    conf = {"compression": compression, "datapath": datapath}
    if zpool:
        conf["zpool"] = zpool
    else:
        conf.update({"device": ",".join(devices), "ashift": ashift, "autotrim": autotrim})
        if vdev:
            conf["vdev"] = vdev
    if nvme_node:
        conf["nvme-node"] = nvme_node
    out = call(sr.create, sr_uuid or str(uuid_mod.uuid4()), conf, name, description)
    call(sr.attach, out)
    emit(out, as_json)


@group.command("ls")
@json_option
def ls(as_json):
    """SRs attached on this host."""
    sr = _lib()
    rows = [_row(call(sr.stat, p)) for p in call(sr.attached)]
    emit(rows, as_json, COLUMNS)


@group.command()
@click.argument("sr_name", metavar="SR")
@json_option
def stat(sr_name, as_json):
    """Health and space of SR (its pool name)."""
    st = call(_lib().stat, sr_name)
    emit(st if as_json else _row(st), as_json)


@group.command()
@click.argument("pool")
@click.option("--device", "devices", multiple=True, metavar="PATH",
              help="Where to look for the pool's devices (repeatable).")
@json_option
def attach(pool, devices, as_json):
    """Import (if needed) and attach the SR on POOL."""
    conf = {"pool": pool}
    if devices:
        conf["device"] = ",".join(devices)
    emit(call(_lib().attach, conf), as_json)


@group.command()
@click.argument("sr_name", metavar="SR")
def detach(sr_name):
    """Detach SR (export the pool if zfs-ng created it)."""
    call(_lib().detach, sr_name)


@group.command()
@click.argument("sr_name", metavar="SR")
@click.option("--yes", is_flag=True, help="Really destroy every volume of SR.")
def destroy(sr_name, yes):
    """Destroy SR and all its volumes."""
    if not yes:
        fail("destroying %s deletes every volume on it; pass --yes" % sr_name)
    call(_lib().destroy, sr_name)


@group.command()
@click.option("--device", "devices", multiple=True, metavar="PATH")
@json_option
def probe(devices, as_json):
    """zfs-ng SRs on the given devices (imported or importable)."""
    conf = {"device": ",".join(devices)} if devices else {}
    found = call(_lib().probe, conf)
    emit(found if as_json else [dict(r["configuration"], imported=r["extra_info"]["imported"])
                                for r in found], as_json)
