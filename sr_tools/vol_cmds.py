"""`zfs-ng vol ...`: volumes of an SR, through the same library functions as the
SMAPIv3 plugin (plugins/volume/volume.py)."""

import re

import click

from sr_tools.output import emit, fail, json_option
from sr_tools.sr_cmds import call

COLUMNS = ["key", "name", "read_write", "virtual_size", "physical_utilisation", "description"]
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text):
    """Bytes from 4096, 512M, 10G, 1.5T (binary units)."""
    m = re.match(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)i?b?\s*\Z", text, re.I)
    if not m:
        raise click.BadParameter("%r is not a size (e.g. 4096, 512M, 10G)" % text)
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        return parse_size(value)


def _lib():
    from plugins.volume import volume
    return volume


def _options(*decorators):
    """One decorator applying click decorators in the order written."""
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


sr_arg = click.argument("sr")
volume_args = _options(sr_arg, click.argument("key"))   # SR KEY
one_volume = _options(volume_args, json_option)         # SR KEY [--json]


@click.group()
def group():
    """Volumes (zvols) of an SR: create, snapshot, clone, resize, destroy."""


@group.command()
@sr_arg
@click.option("--size", type=Size(), required=True, help="e.g. 10G (rounded up to 16 KiB).")
@click.option("--name", default="", help="Volume name.")
@click.option("--description", default="")
@click.option("--sharable", is_flag=True)
@json_option
def create(sr, size, name, description, sharable, as_json):
    """Create a sparse volume on SR."""
    emit(call(_lib().create, sr, name, description, size, sharable), as_json)


@group.command()
@one_volume
def snapshot(sr, key, as_json):
    """Snapshot volume KEY (read-only; of a snapshot: the same data)."""
    emit(call(_lib().snapshot, sr, key), as_json)


@group.command()
@one_volume
def clone(sr, key, as_json):
    """A writable clone of KEY (a snapshot or a live volume)."""
    emit(call(_lib().clone, sr, key), as_json)


@group.command()
@sr_arg
@click.argument("keys", nargs=-1, required=True)
def destroy(sr, keys):
    """Destroy volumes or snapshots."""
    lib = _lib()
    if len(keys) > 3:
        with click.progressbar(keys, label="destroying", file=click.get_text_stream("stderr")) \
                as bar:
            for k in bar:
                call(lib.destroy, sr, k)
    else:
        for k in keys:
            call(lib.destroy, sr, k)


@group.command()
@volume_args
@click.argument("size", type=Size())
def resize(sr, key, size):
    """Grow volume KEY to SIZE (shrinking is refused)."""
    call(_lib().resize, sr, key, size)


@group.command("ls")
@sr_arg
@json_option
def ls(sr, as_json):
    """Volumes and snapshots of SR."""
    emit(call(_lib().ls, sr).value(), as_json, COLUMNS)


@group.command()
@one_volume
def stat(sr, key, as_json):
    """One volume."""
    emit(call(_lib().stat, sr, key), as_json)


@group.command("set")
@volume_args
@click.option("--name", default=None)
@click.option("--description", default=None)
@click.option("--key", "pairs", multiple=True, metavar="K=V", help="Set a key (repeatable).")
@click.option("--unset", "unset", multiple=True, metavar="K", help="Remove a key (repeatable).")
def set_(sr, key, name, description, pairs, unset):
    """Change a volume's name, description or keys."""
    lib = _lib()
    if name is None and description is None and not pairs and not unset:
        fail("nothing to set (use --name, --description, --key K=V or --unset K)")
    for p in pairs:
        if "=" not in p:
            fail("--key expects K=V, got %r" % p)
    if name is not None:
        call(lib.set_name, sr, key, name)
    if description is not None:
        call(lib.set_description, sr, key, description)
    for p in pairs:
        k, v = p.split("=", 1)
        call(lib.set_key, sr, key, k, v)
    for k in unset:
        call(lib.unset_key, sr, key, k)


# attach/detach/export/attachments belong to the datapath area
from sr_tools.vol_attach_cmds import add_to as _add_datapath_commands  # noqa: E402

_add_datapath_commands(group)
