"""The index that travels with the pool, so a host that never saw the pool
(a clean move, or a crash of the host before it) reads only what it must.

In POOL/zfs-ng/index, a filesystem mounted only while it is read or written:

    index.json.gz          a whole copy of the local index at generation F
                           (metadata.Index.export_doc): SR.detach writes one
                           before `zpool export`, and so does a mutation when
                           the deltas below pile up (MAX_DELTAS)
    delta-B-G.json.gz      from generation B to G: every row under some
                           datasets at G (the journal's datasets of B..G and
                           the clones of their snapshots: a rename moves a
                           clone's origin), written by a mutation when the
                           pool's journal is full: its size is the journal's,
                           not the SR's

Each write starts the pool's journal (journal.py) again at its generation,
so the journal's base is always where the copy and its deltas lead.  A new
host (adopt_carried) takes the whole copy, the deltas from F to the
journal's base (from each generation the delta to the furthest one not past
the base: `chain`), then reads again from ZFS the datasets the journal names
(catch_up).  What does not chain (a kill between a write and the journal's
reset, a file from elsewhere) is not used, and anything not sound
(metadata._sound_rows) makes the host read every dataset instead.

Files are written to a temporary name, fsync'ed and renamed: a kill leaves
the old state or the new, and a host that finds the filesystem still mounted
(a kill mid-way) unmounts it first.
"""

import contextlib
import json
import os
import re

from plugins import smapi, zfs
from plugins.volume import journal
from plugins.volume import lock
from plugins.volume import metadata
from plugins.volume import names
from plugins.volume import vdi

WHOLE = "index.json.gz"
# deltas after a whole copy before the next mutation writes a whole copy
# again (a new host reads them all); ZFSNG_JOURNAL_DELTAS: fewer (the VM tests)
MAX_DELTAS = min(32, int(os.environ.get("ZFSNG_JOURNAL_DELTAS", "32")))
_DELTA = re.compile(r"\Adelta-([0-9]{1,18})-([0-9]{1,18})\.json\.gz\Z")


def delta_name(base, generation):
    return "delta-%d-%d.json.gz" % (base, generation)


def parse_delta_name(name):
    """(base, generation) of a delta's file name, or None."""
    m = _DELTA.match(name)
    if m is None or int(m.group(1)) >= int(m.group(2)):
        return None
    return int(m.group(1)), int(m.group(2))


def chain(start, links, stop):
    """The (base, generation) links that lead from generation start to stop:
    from each generation the link to the furthest one not past stop (it holds
    every change up to there).  [] when start == stop; None if stop is not
    reached."""
    path, at = [], start
    while at != stop:
        ahead = [g for b, g in links if b == at and at < g <= stop]
        if not ahead:
            return None
        path.append((at, max(ahead)))
        at = max(ahead)
    return path


def index_dataset(pool):
    return "%s/index" % names.sr_root(pool)


def _mount_point(pool):
    return os.path.join(lock.RUN_DIR, "carried-%s" % pool)


def unmount(pool):
    """Unmount what a killed call left mounted (it would block the export)."""
    if os.path.ismount(_mount_point(pool)):
        zfs.run(["umount", _mount_point(pool)], check=False)


@contextlib.contextmanager
def _mounted(pool):
    where = _mount_point(pool)
    if not os.path.isdir(where):
        os.makedirs(where, 0o700)
    unmount(pool)
    zfs.run(["mount", "-t", "zfs", index_dataset(pool), where])
    try:
        yield where
    finally:
        zfs.run(["umount", where], check=False)


def _write(where, name, doc):
    import gzip   # only here and in _read
    # level 1: a copy is written inside a mutation now and then
    data = gzip.compress(json.dumps(doc).encode("utf-8"), 1)
    tmp = os.path.join(where, name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(where, name))


def _read(where, name):
    """A carried file's JSON; ValueError for anything not sound as gzip'ed
    JSON text (a torn or foreign file)."""
    import gzip
    import zlib
    with open(os.path.join(where, name), "rb") as f:
        data = f.read()
    try:
        return json.loads(gzip.decompress(data).decode("utf-8"))
    except (EOFError, OSError, zlib.error) as e:    # OSError: gzip's BadGzipFile
        raise ValueError("%s: %s" % (name, e))


def _deltas(where):
    """{(base, generation): file name} of the deltas in the mounted copy."""
    out = {}
    for name in os.listdir(where):
        link = parse_delta_name(name)
        if link is not None:
            out[link] = name
    return out


def carry_index(handle, whole=False):
    """Write the index into the pool at the handle's generation and start the
    pool's journal again from it (caller holds the SR lock): a delta of the
    journal's datasets where the journal leads from a copy in the pool and
    fewer than MAX_DELTAS follow it, else (and with whole: SR.detach) a whole
    copy, the deltas removed.  False if it could not: that only costs the
    next host a full read (the journal then names nothing)."""
    idx = handle.index()
    if idx.generation() != handle.generation:
        return False
    base, changed = journal.parse(handle.props.get("journal"), handle.generation)
    try:
        if not zfs.exists(index_dataset(handle.pool)):
            zfs.zfs("create", "-o", "mountpoint=legacy", "-o", "compression=off",
                    index_dataset(handle.pool))
        with _mounted(handle.pool) as d:
            deltas = _deltas(d)
            # a delta needs a generation to lead from (not the pool's own:
            # then only devices were named since, and a whole copy has them)
            if whole or base is None or base == handle.generation and changed or \
                    len(deltas) >= MAX_DELTAS or not os.path.exists(os.path.join(d, WHOLE)):
                _write(d, WHOLE, idx.export_doc(handle.uuid))
                for name in deltas.values():
                    os.unlink(os.path.join(d, name))
            elif base != handle.generation:
                targets = idx.with_clones(journal.datasets(handle.root, changed))
                _write(d, delta_name(base, handle.generation), {
                    "format": idx.CARRIED_FORMAT, "sr-uuid": handle.uuid, "base": base,
                    "generation": handle.generation, "datasets": targets,
                    "volumes": idx.export_rows(targets), "sweep": idx.sweeps_wanted()})
        # what is carried is at the pool's generation: nothing changed since
        value = journal.build(handle.generation, (), handle.generation)
        zfs.set_prop(handle.root, zfs.uprop("journal"), zfs.encode(value))
        handle.props["journal"] = value
    except (zfs.ZfsError, OSError) as e:
        smapi.log.error("%s: index not carried in the pool: %s", handle.pool, e)
        return False
    return True


def adopt_carried(handle):
    """Take the index the pool carries: the whole copy, the deltas that lead
    to the journal's base (or, without a journal, to the pool's generation),
    then the journal's datasets read again (catch_up).  None if it cannot be
    used (the caller reads every dataset); else the datasets read again, with
    [name, origin] of what they hold: the scope of SR.attach's sweeps ([], []
    when nothing was read)."""
    if not zfs.exists(index_dataset(handle.pool)):
        return None
    base, changed = journal.parse(handle.props.get("journal"), handle.generation)
    if base is None:
        base, changed = handle.generation, frozenset()
    idx = handle.index()
    try:
        with _mounted(handle.pool) as d:
            doc = _read(d, WHOLE)
            deltas = _deltas(d)
            start = doc.get("generation") if isinstance(doc, dict) else None
            path = chain(start, list(deltas), base) if type(start) is int else None
            if path is None or not idx.adopt_doc(doc, handle.pool, handle.uuid, start,
                                                 vdi.renderer(handle)):
                smapi.log.info("%s: carried index at generation %s not used (pool at %d, "
                               "journal from %d)", handle.pool, start, handle.generation, base)
                return None
            for link in path:
                delta = _read(d, deltas[link])
                if not idx.adopt_delta(delta, handle.pool, handle.uuid, *link):
                    smapi.log.info("%s: carried delta %s not sound", handle.pool, deltas[link])
                    return None
                _touch(handle, delta["datasets"])
    except (zfs.ZfsError, OSError, ValueError) as e:
        smapi.log.info("%s: no carried index: %s", handle.pool, e)
        return None
    how = "carried at %d%s" % (start, " and %d deltas to %d" % (len(path), base) if path else "")
    if base == handle.generation and not changed:
        idx.set_built(how)
        smapi.log.info("%s: index taken: %s", handle.pool, how)
        return [], []
    return catch_up(handle, how, journal.datasets(handle.root, changed))


def _touch(handle, datasets):
    """Devices and usage that may have changed: the keys of datasets are
    looked at again (SR.ls's usage, SR.attach's reset of devices)."""
    idx = handle.index()
    for zname in datasets:
        kind, key = names.classify(zname, handle.pool)
        if key is not None and kind != "snapshot":
            idx.touch(key)


def catch_up(handle, how, datasets):
    """Bring an index adopted at the journal's base to the pool's generation:
    read again the journal's datasets (with their snapshots and data-destroyed
    snapshots) and the clones of their snapshots (a rename moves a clone's
    origin), finish any interrupted revert among them, and replace every row
    under those datasets.  Returns (datasets read, [name, origin] rows)."""
    idx = handle.index()
    targets = set(idx.with_clones(datasets))
    entries, rows = metadata.read_datasets(handle.pool, sorted(targets))
    reverting = [names.classify(r[0], handle.pool) for r in rows]
    reverting = [key for kind, key in reverting if kind == "reverting"]
    if reverting:   # the revert's volume is read too, to know whether it is still there
        targets |= set(names.volume_dataset(handle.pool, key) for key in reverting)
        entries, rows = metadata.read_datasets(handle.pool, sorted(targets))
        if handle.finish_reverts(set(r[0] for r in rows)):
            entries, rows = metadata.read_datasets(handle.pool, sorted(targets))
    idx.replace_under(sorted(targets), [idx._values(e) for e in entries], handle.generation)
    _touch(handle, targets)
    how = "%s, %d datasets read again at %d" % (how, len(targets), handle.generation)
    idx.set_built(how)
    smapi.log.info("%s: index taken: %s", handle.pool, how)
    return sorted(targets), rows
