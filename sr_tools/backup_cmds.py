"""`zfs-ng backup full|incr|restore|verify|ls`: the CLI over sr_tools.backup."""

import click

from sr_tools.output import emit, fail, json_option


class _Bar(object):
    """engine.Progress as a click progress bar on stderr (quiet with --json)."""

    def __init__(self, enabled):
        self.enabled = enabled
        self.bar = None

    def begin(self, label, total):
        if self.enabled and total:
            self.bar = click.progressbar(length=total, label=label, show_eta=True,
                                         file=click.get_text_stream("stderr"))
            self.bar.__enter__()

    def advance(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def end(self):
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _run(fn, *a, **kw):
    from sr_tools.backup.manifest import BackupError
    try:
        return fn(*a, **kw)
    except BackupError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to resume")


def _summary(m, d=None):
    st = m.get("stats", {})
    cbt = st.get("cbt") or {}
    return {"id": m["id"], "kind": m["kind"], "state": m["state"],
            "volume": m["source"]["volume"], "parent": (m["parent"] or {}).get("id"),
            "anchor": m["anchor"].get("bookmark") or m["anchor"].get("snapshot")
            or m["anchor"].get("label") or m["anchor"].get("path"),
            "size": m["size"], "bytes_read": st.get("bytes_read", 0),
            "bytes_written": st.get("bytes_written", 0), "seconds": st.get("seconds"),
            "extents": len(m["extents"]), "chunks": st.get("chunks"),
            "resumed_at_chunk": st.get("resumed_at_chunk"),
            "cbt_stream_bytes": cbt.get("stream_bytes"), "dir": d,
            "image": m.get("image"), "image_format": m.get("image_format")}


@click.group()
def group():
    """Full and incremental backups of volumes, restore, verify."""


def _backup(kind, volume, repo, nbd, bitmap, keep_snapshot, state_dir, image_format, as_json):
    import os
    from sr_tools.backup import engine
    m = _run(engine.backup, kind, volume, repo, nbd=nbd, bitmap=bitmap,
             keep_snapshot=keep_snapshot, state_dir=state_dir, image_format=image_format,
             progress=_Bar(not as_json))
    emit(_summary(m, os.path.join(repo, m["id"])), as_json)


_common = [
    click.argument("volume"),
    click.argument("repo", type=click.Path(file_okay=False)),
    click.option("--nbd", metavar="URI", help="Read from this NBD export (nbd+unix:///NAME?"
                 "socket=PATH or nbd://HOST:PORT/NAME) instead of a local snapshot; VOLUME "
                 "then only names the chain."),
    click.option("--keep-snapshot", is_flag=True, help="Keep the anchor snapshot (default: "
                 "turn it into a bookmark once the backup is complete)."),
    click.option("--state-dir", type=click.Path(file_okay=False), default=None,
                 help="CBT map cache directory."),
    click.option("--format", "image_format", type=click.Choice(["raw", "qcow2"]),
                 default="raw", show_default=True,
                 help="Image format (qcow2: converted by qemu-img when complete)."),
    json_option,
]


def _with_common(fn):
    for deco in reversed(_common):
        fn = deco(fn)
    return fn


@group.command()
@_with_common
def full(volume, repo, nbd, keep_snapshot, state_dir, image_format, as_json):
    """Back up all allocated data of VOLUME into repository REPO.

    VOLUME: SR:KEY, a ZFS volume POOL/PATH, or a /path read as it is.
    An interrupted backup resumes when the command is run again."""
    _backup("full", volume, repo, nbd, None, keep_snapshot, state_dir, image_format, as_json)


@group.command()
@_with_common
@click.option("--bitmap", metavar="NAME", help="With --nbd: the qemu:dirty-bitmap:NAME "
              "context holding the changes since the previous backup.")
def incr(volume, repo, nbd, keep_snapshot, state_dir, image_format, as_json, bitmap):
    """Back up only what changed in VOLUME since its newest backup in REPO."""
    _backup("incr", volume, repo, nbd, bitmap, keep_snapshot, state_dir, image_format, as_json)


@group.command()
@click.argument("backup_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("target")
@click.option("--zvol", is_flag=True, help="TARGET is a new ZFS volume to create (POOL/PATH).")
@click.option("--force", is_flag=True, help="Overwrite an existing image file.")
@click.option("--no-verify", is_flag=True, help="Do not check chunk checksums while reading.")
@json_option
def restore(backup_dir, target, zvol, force, no_verify, as_json):
    """Rebuild the point of BACKUP_DIR (and its chain) into TARGET: a block
    device, an image file, an SR volume SR:KEY (not attached; at least the
    backup's size), or with --zvol a new zvol POOL/PATH."""
    from sr_tools.backup import engine, manifest, zvol as zv
    undo = None
    if zvol:
        m = _run(manifest.load, backup_dir)
        target = _run(zv.create_volume, target, m["size"])
    elif ":" in target and not target.startswith("/"):
        target, undo = _run(zv.sr_volume_device, target, force)
    try:
        s = _run(engine.restore, backup_dir, target, progress=_Bar(not as_json),
                 verify=not no_verify, force=force)
    finally:
        if undo:
            _run(undo)
    emit(s, as_json)


@group.command()
@click.argument("backup_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--no-chain", is_flag=True, help="Only this backup, not its parents.")
@json_option
def verify(backup_dir, no_chain, as_json):
    """Recompute the checksums of BACKUP_DIR and its chain (or of every backup
    of a repository) and check the chain links; exit 1 on damage."""
    import os
    from sr_tools.backup import engine, manifest
    if os.path.exists(os.path.join(backup_dir, manifest.MANIFEST)):
        s = _run(engine.verify, backup_dir, chain=not no_chain, progress=_Bar(not as_json))
    else:       # a repository: every backup in it
        s = _run(engine.verify_repo, backup_dir, progress=_Bar(not as_json))
    emit(s, as_json)
    if not s["ok"]:
        fail("%d problem(s) found in %s" % (len(s["bad"]), backup_dir))


@group.command("ls")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@json_option
def ls_(repo, as_json):
    """Backups in REPO, oldest first."""
    from sr_tools.backup import manifest
    rows = [_summary(m, d) for d, m in _run(manifest.backups, repo)]
    emit(rows, as_json, ["id", "kind", "state", "volume", "parent", "size", "bytes_read",
                         "extents"])
