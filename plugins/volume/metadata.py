"""Volume metadata: what the pool carries, and the local index that makes
listing fast.

In the pool (authoritative; survives `zpool export`/`import` on another host),
as ZFS user properties whose values are JSON text (so quotes, tabs, newlines
and unicode never break `zfs get -H` parsing):

    on POOL/zfs-ng (SR root)    org.zfs-ng:sr-uuid, :sr-name, :sr-description,
                                :generation (int, bumped BEFORE every mutation),
                                :created-pool (true: SR.destroy destroys the pool),
                                :datapath, :nvme-node, :journal (journal.py)
    on volumes and snapshots    org.zfs-ng:name, :description, :keys ({str: str}),
                                :sharable (bool); zfs-ng-cbt:enabled (cbt.py)
    data-destroyed snapshots    bookmarks DS#KEY, metadata on DS (bookmarks.py)

The volume key is the ZFS name component (dataset name for volumes, snapshot
name for snapshots), so keys and snapshot relations (origin, `ds@key`) need no
property at all.

Locally: one sqlite file per SR under /var/lib/zfs-ng/ (ZFSNG_STATE_DIR), a
cache of the above plus sizes.  It records the pool generation it reflects; a
different generation on the pool (a mutation in progress, a crash mid-way, or
another host) makes it stale.  The pool's journal (journal.py) names every
dataset changed since its base: an index at or past that base reads those
alone again (sr.SR.catch_up_local -> carried.catch_up: read_datasets,
Index.replace_under); a host without such an index takes the copy the pool
carries (carried.py: a whole copy and deltas, export_doc/adopt_doc/
adopt_delta) and then those datasets; failing both, the index is rebuilt
from every dataset under the SR lock (sr.SR.reconcile).  Sizes: a volume's
usage changes only while its device is active, so activate_device marks it
(`touched`) and SR.ls reads those again; `sweep` marks what a killed call may
have left for SR.attach's sweeps, which otherwise walk the SR only when the
index is stale.
Beside it, <state dir>/cbt/<sr-uuid>/ caches CBT maps (cbt_state_dir).
"""

import binascii
import contextlib
import json
import os
import sqlite3
import time

from plugins import smapi, zfs
from plugins.volume import bookmarks
from plugins.volume import cbt
from plugins.volume import names

STATE_DIR = os.environ.get("ZFSNG_STATE_DIR", "/var/lib/zfs-ng")


def cbt_state_dir(sr_uuid):
    """The file cache of an SR's CBT maps (cbt.py's state_dir)."""
    return os.path.join(STATE_DIR, "cbt", sr_uuid)


VOLUME_PROPS = ["name", "description", "keys", "sharable"]
ROOT_PROPS = ["sr-uuid", "sr-name", "sr-description", "generation", "created-pool",
              "datapath", "nvme-node", "nbd-node", "nvme-auth", "remote-hosts", "journal"]
# what reconcile reads for every volume and snapshot, in one `zfs get -r`
ZFS_PROPS = ["volsize", "referenced", "origin", "createtxg", "volblocksize"] + \
    [zfs.uprop(p) for p in VOLUME_PROPS] + [cbt.PROP_ENABLED]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS volumes (
    key TEXT PRIMARY KEY,
    zname TEXT NOT NULL UNIQUE,      -- POOL/zfs-ng/KEY or POOL/zfs-ng/DS@KEY
    kind TEXT NOT NULL,              -- volume | snapshot | bookmark (data-destroyed)
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    keys TEXT NOT NULL,              -- JSON object
    sharable INTEGER NOT NULL,
    virtual_size INTEGER NOT NULL,
    physical_utilisation INTEGER NOT NULL,
    volblocksize INTEGER NOT NULL,
    origin TEXT NOT NULL,            -- clone origin snapshot, '' if none
    createtxg INTEGER NOT NULL,
    cbt_enabled INTEGER NOT NULL DEFAULT 0,
    rendered TEXT                    -- SR.ls's JSON of the row (NULL: not made yet)
);
-- keys this host destroyed, so a repeated Volume.destroy succeeds (xapi
-- repeats calls; VDI.destroy of a clone-on-boot VDI calls it twice)
CREATE INDEX IF NOT EXISTS volumes_origin ON volumes (origin);
CREATE INDEX IF NOT EXISTS volumes_order ON volumes (createtxg, key);   -- SR.ls's order
CREATE TABLE IF NOT EXISTS destroyed (key TEXT PRIMARY KEY, at INTEGER NOT NULL);
-- volumes whose device was activated since SR.ls last read their usage: only
-- they can have been written, so only they are read again (volume.ls)
CREATE TABLE IF NOT EXISTS touched (key TEXT PRIMARY KEY);
-- work a killed call may have left for SR.attach's sweep (sr.collect_garbage,
-- sr.drop_interrupted) although the generation says the index is fresh
CREATE TABLE IF NOT EXISTS sweep (id TEXT PRIMARY KEY, why TEXT NOT NULL);
"""

# How long a destroyed key is remembered.
DESTROYED_TTL = 7 * 86400

COLUMNS = ["key", "zname", "kind", "name", "description", "keys", "sharable", "virtual_size",
           "physical_utilisation", "volblocksize", "origin", "createtxg", "cbt_enabled"]

_KEYS, _SHARABLE, _CBT = (COLUMNS.index(c) for c in ("keys", "sharable", "cbt_enabled"))


def entry_from_props(pool, zname, props):
    """An index entry from one dataset's `zfs get` values, or None if zname is
    not a visible volume (hidden, revert leftovers, read-only devices...)."""
    kind, key = names.classify(zname, pool)
    if kind not in ("volume", "snapshot"):
        return None

    def user(p, default):
        v = props.get(zfs.uprop(p))
        return default if v is None else zfs.decode(v)

    keys = user("keys", {})
    if not isinstance(keys, dict):
        keys = {}
    origin = props.get("origin", "-")
    return {
        "key": key,
        "zname": zname,
        "kind": kind,
        "name": str(user("name", "")),
        "description": str(user("description", "")),
        "keys": dict((str(k), str(v)) for k, v in keys.items()),
        "sharable": bool(user("sharable", False)),
        "virtual_size": int(props.get("volsize", 0)),
        "physical_utilisation": int(props.get("referenced", 0)),
        "volblocksize": int(props.get("volblocksize", 16384) or 16384),
        "origin": "" if origin in ("-", "") else origin,
        "createtxg": int(props.get("createtxg", 0)),
        "cbt_enabled": props.get(cbt.PROP_ENABLED) == "on",  # snapshots inherit it
    }


def read_entries(pool, targets=None):
    """Entries read from ZFS: the whole SR (targets=None) or the given names."""
    return _entries(pool, _read(pool, targets), targets)


def read_all(pool):
    """(entries, rows) of the whole SR from one walk: read_entries(pool), and
    [name, origin] of every volume and snapshot read, hidden ones included
    (what zfs.list_names(root, ("name", "origin")) lists, for SR.attach's
    sweeps: one walk instead of three)."""
    got = _read(pool, None)
    rows = [[name, props.get("origin", "-")] for name, props in got.items()]
    return _entries(pool, got, None), rows


def read_datasets(pool, datasets):
    """read_all's (entries, rows) for part of the SR: the given datasets, with
    their snapshots and data-destroyed snapshots, those that exist (a new
    host's catch-up from the journal: carried.catch_up)."""
    got = {}
    for i in range(0, len(datasets), _ARGV_BATCH):
        got.update(zfs.get(datasets[i:i + _ARGV_BATCH], ZFS_PROPS, recursive=True,
                           types="volume,snapshot", missing_ok=True))
    rows = [[name, props.get("origin", "-")] for name, props in got.items()]
    out = [e for e in (entry_from_props(pool, z, p) for z, p in got.items()) if e is not None]
    seen = set(e["key"] for e in out)
    out += [e for e in bookmarks.entries_of(pool, datasets) if e["key"] not in seen]
    return out, rows


# names per zfs command line where a list of names may be long
_ARGV_BATCH = 512


def _read(pool, targets):
    if targets is None:
        return zfs.get([names.sr_root(pool)], ZFS_PROPS, recursive=True, types="volume,snapshot")
    snaps = [t for t in targets if "#" not in t]
    return zfs.get(snaps, ZFS_PROPS) if snaps else {}


def _entries(pool, got, targets):
    out = []
    for zname, props in got.items():
        e = entry_from_props(pool, zname, props)
        if e is not None:
            out.append(e)
    # a bookmark beside its snapshot is an interrupted data_destroy: the snapshot wins
    seen = set(e["key"] for e in out)
    out += [e for e in bookmarks.entries(pool, targets) if e["key"] not in seen]
    return out


def _prefix_range(prefix):
    """(lo, hi): the strings starting with prefix are lo <= s < hi (sqlite
    compares text bytewise, so the index on the column serves the range where
    a LIKE would scan the whole table; at 100k volumes that is per call)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


# The rows under a dataset DS: DS itself, its snapshots DS@* and its
# data-destroyed snapshots DS#* (each range served by the zname index).
_UNDER = " WHERE zname=? OR (zname>=? AND zname<?) OR (zname>=? AND zname<?)"


def _under(ds):
    return (ds,) + _prefix_range(ds + "@") + _prefix_range(ds + "#")


# The types a carried row's columns may have (as JSON decodes them).
_INT = frozenset((int, bool))
_STR = frozenset((str,))
_TYPES = {"key": _STR, "zname": _STR, "kind": _STR, "name": _STR, "description": _STR,
          "keys": frozenset((dict,)), "sharable": _INT, "virtual_size": _INT,
          "physical_utilisation": _INT, "volblocksize": _INT, "origin": _STR,
          "createtxg": _INT, "cbt_enabled": _INT}


def _sound_rows(rows, pool):
    """Rows from outside (a carried index: the file comes from a pool) are
    lists of our columns with our types, and each is what its ZFS name says:
    a volume POOL/zfs-ng/KEY, a snapshot POOL/zfs-ng/DS@KEY, a bookmark
    POOL/zfs-ng/DS#KEY, KEY a volume key.  Checked a column at a time (C
    loops: SR.attach on a new host takes 100k of them)."""
    if not set(map(type, rows)) <= {list} or not set(map(len, rows)) <= {len(COLUMNS)}:
        return False
    if not rows:
        return True
    cols = dict(zip(COLUMNS, zip(*rows)))
    if any(not set(map(type, cols[c])) <= t for c, t in _TYPES.items()):
        return False
    if not set(cols["kind"]) <= {"volume", "snapshot", "bookmark"} or \
            not names.all_keys(cols["key"]):
        return False
    for keys in cols["keys"]:
        if keys and not set(map(type, keys.values())) <= _STR:     # JSON keys are str
            return False
    return names.all_named(pool, cols["key"], cols["zname"], cols["kind"])


# The rows' version moves on with any change to a row's columns, whoever
# writes (a change of a rendered text alone does not): SR.ls's listing kept
# in a file is good while it names that version (Index.listing).  INSERT and
# DELETE first: replace_all drops and remakes those two.
_VERSION_TRIGGERS = (("insert", "INSERT"), ("delete", "DELETE"),
                     ("update", "UPDATE OF " + ",".join(COLUMNS)))
_NEXT_VERSION = "UPDATE meta SET v=CAST(v AS INTEGER)+1 WHERE k='rows-version'"


def _version_trigger(name, event, if_not_exists=""):
    return "CREATE TRIGGER %svolumes_version_%s AFTER %s ON volumes BEGIN %s; END" % (
        if_not_exists, name, event, _NEXT_VERSION)


def _insert(columns):
    return "INSERT OR REPLACE INTO volumes (%s) VALUES (%s)" % (
        ",".join(columns), ",".join("?" * len(columns)))


def _drop_dead_writers(path):
    """Remove path.PID.tmp files whose writer is gone (a killed SR.ls): /run
    is RAM, and at 100k volumes a listing is ~50 MB."""
    d, base = os.path.split(path)
    try:
        found = os.listdir(d or ".")
    except OSError:
        return
    for n in found:
        pid = n[len(base) + 1:-len(".tmp")]
        if not (n.startswith(base + ".") and n.endswith(".tmp") and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
            continue                    # still writing (or the pid reused: left)
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(os.path.join(d, n))
        except OSError:
            pass


class Index(object):
    """The local sqlite cache of one SR's volumes."""

    def __init__(self, path):
        d = os.path.dirname(path)
        if d and not os.path.isdir(d):
            os.makedirs(d, 0o700)
        self.path = path
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        cols = [r[1] for r in self.db.execute("PRAGMA table_info(volumes)")]
        if "cbt_enabled" not in cols:  # an index from before CBT: add it, rebuild
            self.db.execute("ALTER TABLE volumes ADD COLUMN cbt_enabled INTEGER NOT NULL "
                            "DEFAULT 0")
            self.invalidate()
        if "rendered" not in cols:  # an index from before SR.ls kept its records
            try:
                self.db.execute("ALTER TABLE volumes ADD COLUMN rendered TEXT")
            except sqlite3.OperationalError:
                pass                # a concurrent call added it first
        # a rendered record is dropped by any change to its row, whoever makes it
        self.db.execute("CREATE TRIGGER IF NOT EXISTS volumes_unrender AFTER UPDATE OF %s "
                        "ON volumes BEGIN UPDATE volumes SET rendered=NULL "
                        "WHERE key=NEW.key; END" % ",".join(COLUMNS))
        # and moves the rows' version on (_VERSION_TRIGGERS)
        for name, event in _VERSION_TRIGGERS:
            self.db.execute(_version_trigger(name, event, "IF NOT EXISTS "))
        if self.db.execute("SELECT count(*) FROM meta WHERE k IN ('index-id', 'rows-version')"
                           ).fetchone()[0] != 2:
            self.db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('index-id', ?)",
                            (binascii.hexlify(os.urandom(16)).decode(),))
            self.db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('rows-version', '0')")

    @classmethod
    def for_sr(cls, sr_uuid, state_dir=None):
        return cls(os.path.join(state_dir or STATE_DIR, "%s.sqlite" % names.check_uuid(sr_uuid)))

    def close(self):
        self.db.close()

    @contextlib.contextmanager
    def _write(self):
        """One write transaction: committed, or rolled back on an error."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.db.execute("COMMIT")
        except Exception:
            self.db.execute("ROLLBACK")
            raise

    # generation --------------------------------------------------------------
    def generation(self):
        r = self.db.execute("SELECT v FROM meta WHERE k='generation'").fetchone()
        return None if r is None else int(r[0])

    def _set_generation(self, gen):
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('generation', ?)", (str(gen),))

    # reads -------------------------------------------------------------------
    @staticmethod
    def _row(r):
        e = dict(zip(COLUMNS, r))
        e["keys"] = {} if e["keys"] == "{}" else json.loads(e["keys"])  # most have none
        e["sharable"] = bool(e["sharable"])
        e["cbt_enabled"] = bool(e["cbt_enabled"])
        return e

    def get(self, key):
        r = self.db.execute("SELECT %s FROM volumes WHERE key=?" % ",".join(COLUMNS),
                            (key,)).fetchone()
        return None if r is None else self._row(r)

    def all(self):
        return [self._row(r) for r in self.db.execute(
            "SELECT %s FROM volumes ORDER BY createtxg, key" % ",".join(COLUMNS))]

    def rendered(self, render_key, render):
        """Every row's record as JSON text, joined by commas (the inside of a
        JSON list): render(entry) makes the text of a row that has none yet,
        and it is kept with the row until the row changes (a trigger drops it)
        or render_key does (it names what else the text depends on: the SR's
        settings, the record format).  So a warm SR.ls of 100k volumes is one
        group_concat in SQLite, not 100k records built in Python.  The order is
        all()'s as far as group_concat keeps its subquery's; SR.ls's callers
        need none."""
        return self._rendered(render_key, render)[0]

    def _rendered(self, render_key, render):
        """(rendered()'s text, the version of the rows it shows or None):
        what rendered() and listing() both make."""
        with self._write():
            r = self.db.execute("SELECT v FROM meta WHERE k='render-key'").fetchone()
            if r is None or r[0] != render_key:
                self.db.execute("UPDATE volumes SET rendered=NULL")
                self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('render-key', ?)",
                                (render_key,))
        after = 0
        while after is not None:
            after = self._render_some(render, after)
        self.db.execute("BEGIN")        # one read: the version is the texts'
        try:
            version = self._version(render_key)
            body, missing = self.db.execute(
                "SELECT group_concat(rendered, ','), count(*) - count(rendered) FROM "
                "(SELECT rendered FROM volumes ORDER BY createtxg, key)").fetchone()
        finally:
            self.db.execute("COMMIT")
        if not missing:
            return body or "", version
        out = []                         # a row changed since its render: made now, not kept
        for key, text in self.db.execute(
                "SELECT key, rendered FROM volumes ORDER BY createtxg, key").fetchall():
            if text is None:
                e = self.get(key)
                if e is None:
                    continue
                text = render(e)
            out.append(text)
        return ",".join(out), None

    def _version(self, render_key):
        """What names the listing of the rows as they are now: this index
        (a new one after a deleted file), its rows' version, the render key."""
        got = dict(self.db.execute("SELECT k, v FROM meta WHERE k IN ('index-id', 'rows-version')"))
        return json.dumps([got.get("index-id"), got.get("rows-version"), render_key]).encode()

    def listing(self, render_key, render, path):
        """SR.ls's JSON list of every row's record (rendered()), as
        smapi.Encoded: the file at path if it holds the listing of this
        version of the rows, else made and kept there for the next call.  So
        a warm SR.ls of 100k volumes with nothing changed copies one file to
        stdout (sendfile), and a change costs one listing made again.  path is
        on /run (tmpfs): a crash never leaves a torn listing to be taken."""
        try:
            f = open(path, "rb")
        except (IOError, OSError):
            f = None
        if f is not None:
            head = f.readline(1 << 16)
            if head == self._version(render_key) + b"\n":
                return smapi.Encoded([smapi.FileText(f, len(head))])
            f.close()
        body, version = self._rendered(render_key, render)
        if version is None:
            return smapi.encoded_list(body)
        _drop_dead_writers(path)
        tmp = "%s.%d.tmp" % (path, os.getpid())
        try:
            # the names of every VDI: readable by root only, like the index
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                           "wb") as out:
                out.write(version + b"\n[")
                out.write(body.encode("utf-8"))
                out.write(b"]")
            os.rename(tmp, path)
        except (IOError, OSError) as e:  # /run full: this call still answers
            smapi.log.info("SR.ls listing not kept in %s: %s", path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return smapi.encoded_list(body)

    def _render_some(self, render, after, batch=2000):
        """Render up to batch rows that have no text and come after row
        `after` (a rowid), in one write transaction (so no row changes between
        reading and keeping it).  Returns the last rowid rendered, None when
        there was nothing left: each row is looked at once, in table order."""
        with self._write():
            got = self.db.execute(
                "SELECT rowid, %s FROM volumes WHERE rowid>? AND rendered IS NULL "
                "ORDER BY rowid LIMIT ?" % ",".join(COLUMNS), (after, batch)).fetchall()
            self.db.executemany("UPDATE volumes SET rendered=? WHERE rowid=?",
                                [(render(self._row(r[1:])), r[0]) for r in got])
        return got[-1][0] if got else None

    def count(self):
        return self.db.execute("SELECT count(*) FROM volumes").fetchone()[0]

    def was_destroyed(self, key):
        """Did Volume.destroy remove this key (within DESTROYED_TTL)?"""
        return self.db.execute("SELECT 1 FROM destroyed WHERE key=?", (key,)).fetchone() is not None

    def by_dataset(self, dataset):
        """Snapshots whose parent dataset is `dataset`, and the volume itself."""
        lo, hi = _prefix_range(dataset + "@")
        return [self._row(r) for r in self.db.execute(
            "SELECT %s FROM volumes WHERE zname=? OR (zname>=? AND zname<?)"
            % ",".join(COLUMNS), (dataset, lo, hi))]

    def with_clones(self, datasets):
        """datasets and those of the clones of their snapshots (clones_of),
        sorted: what a rename of one of them changes (a clone's origin)."""
        return sorted(set(datasets) | set(c["zname"] for ds in datasets
                                          for c in self.clones_of(ds)))

    def clones_of(self, dataset):
        lo, hi = _prefix_range(dataset + "@")
        return [self._row(r) for r in self.db.execute(
            "SELECT %s FROM volumes WHERE origin>=? AND origin<?" % ",".join(COLUMNS),
            (lo, hi))]

    # usage of volumes written since it was read (not part of the generation) ----
    def touch(self, key):
        """Key's device was activated: its usage may change until SR.ls reads
        it with the device gone."""
        self.db.execute("INSERT OR IGNORE INTO touched (key) VALUES (?)", (key,))

    def touched(self):
        return [r[0] for r in self.db.execute("SELECT key FROM touched ORDER BY key")]

    def devices_tracked(self):
        """Has every device activation since a full crash reset been marked
        (touched)?  False for an index from before the marks, or adopted
        from one: a crash reset must then walk every volume once."""
        return self.db.execute("SELECT 1 FROM meta WHERE k='devices-tracked'").fetchone() \
            is not None

    def set_devices_tracked(self):
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('devices-tracked', '1')")

    def set_usage(self, usage, done):
        """usage {key: physical_utilisation} read from ZFS; done: keys whose
        device is gone, so that reading was their last change."""
        with self._write():
            # only where it changed: an update is a row's new version
            self.db.executemany("UPDATE volumes SET physical_utilisation=? WHERE key=? "
                                "AND physical_utilisation<>?", [(v, k, v) for k, v in usage.items()])
            self.db.executemany("DELETE FROM touched WHERE key=?", [(k,) for k in done])

    # leftovers for SR.attach's sweep ---------------------------------------------
    def want_sweep(self, why):
        """Record that a sweep may be needed (before making something a kill
        would leave behind); returns the mark for swept()."""
        mark = binascii.hexlify(os.urandom(8)).decode()
        self.db.execute("INSERT INTO sweep (id, why) VALUES (?, ?)", (mark, why))
        return mark

    def sweeps_wanted(self):
        return [r[0] for r in self.db.execute("SELECT why FROM sweep ORDER BY why")]

    def swept(self, mark=None):
        """The work behind one mark (or, after a full sweep, every mark) is done."""
        if mark is None:
            self.db.execute("DELETE FROM sweep")
        else:
            self.db.execute("DELETE FROM sweep WHERE id=?", (mark,))

    # the copy that travels in the pool (carried.py) ----------------------------------
    CARRIED_FORMAT = 1

    def export_doc(self, sr_uuid):
        """Everything but the destroyed keys (this host's memory), as JSON-able."""
        return {"format": self.CARRIED_FORMAT, "sr-uuid": sr_uuid,
                "generation": self.generation(),
                "volumes": self.export_rows(),
                "touched": self.touched(), "sweep": self.sweeps_wanted(),
                "devices-tracked": self.devices_tracked()}

    def export_rows(self, datasets=None):
        """The rows (all, or those under datasets: DS, DS@*, DS#*) as the
        carried files hold them: as stored, but keys as the object
        _sound_rows checks.  No per-row dict: at 100k rows _row's dicts were
        most of a copy's cost (1.1-2.3 s natively)."""
        query = "SELECT %s FROM volumes" % ",".join(COLUMNS)
        if datasets is None:
            rows = [list(r) for r in self.db.execute(query + " ORDER BY createtxg, key")]
        else:
            rows = []
            for ds in datasets:
                rows += [list(r) for r in self.db.execute(query + _UNDER, _under(ds))]
        for r in rows:
            r[_KEYS] = {} if r[_KEYS] == "{}" else json.loads(r[_KEYS])
        return rows

    @staticmethod
    def _carried_values(rows):
        """Carried rows (sound: _sound_rows) as _values writes them, a column
        at a time."""
        if not rows:
            return []
        cols = [list(c) for c in zip(*rows)]
        cols[_KEYS] = [json.dumps(k, sort_keys=True) if k else "{}" for k in cols[_KEYS]]
        cols[_SHARABLE] = [1 if v else 0 for v in cols[_SHARABLE]]
        cols[_CBT] = [1 if v else 0 for v in cols[_CBT]]
        return [list(r) for r in zip(*cols)]

    def adopt_delta(self, doc, pool, sr_uuid, base, generation):
        """Apply a carried delta from generation base (the index's) to
        generation (carried.py): the rows under its datasets replaced by its
        rows.  False (nothing changed) unless it is of this SR, between those
        generations, its datasets directly under the SR root and its rows
        sound and under them."""
        root = names.sr_root(pool)
        try:
            if doc.get("format") != self.CARRIED_FORMAT or doc.get("sr-uuid") != sr_uuid \
                    or doc.get("base") != base or doc.get("generation") != generation \
                    or self.generation() != base:
                return False
            targets, rows = doc["datasets"], doc["volumes"]
            if not isinstance(targets, list) or not isinstance(rows, list) or \
                    not all(names.component(root, t) for t in targets) \
                    or not _sound_rows(rows, pool):
                return False
            whys = [str(w) for w in doc["sweep"]]
        except (AttributeError, KeyError, TypeError, ValueError):
            return False
        under = set(targets)
        if any(names.dataset_of(r[1]) not in under for r in rows):
            return False
        self.replace_under(targets, self._carried_values(rows), generation)
        for why in whys:
            self.want_sweep(why)
        return True

    def adopt_doc(self, doc, pool, sr_uuid, generation, renderer=None):
        """Take a carried copy if it is of this SR at this generation and every
        entry is what its ZFS name says; False (nothing changed) otherwise.
        renderer: as replace_all's (the texts are made here, not carried: a
        text is only as sound as the row it is made from)."""
        try:
            if doc.get("format") != self.CARRIED_FORMAT or doc.get("sr-uuid") != sr_uuid \
                    or doc.get("generation") != generation:
                return False
            rows = doc["volumes"]
            if not isinstance(rows, list) or not _sound_rows(rows, pool):
                return False
            touched = [k for k in doc["touched"] if names.is_key(k)]
            whys = [str(w) for w in doc["sweep"]]
        except (AttributeError, KeyError, TypeError, ValueError):
            return False
        self._replace_rows(self._carried_values(rows), generation, renderer)
        for k in touched:
            self.touch(k)
        for why in whys:
            self.want_sweep(why)
        self.db.execute("DELETE FROM meta WHERE k='devices-tracked'")
        if doc.get("devices-tracked") is True:
            self.set_devices_tracked()
        return True

    # writes: each one transaction that also records the generation -------------
    @staticmethod
    def _values(e):
        vals = [e.get(c) for c in COLUMNS]
        keys = e["keys"]
        vals[_KEYS] = json.dumps(keys, sort_keys=True) if keys else "{}"   # most have none
        vals[_SHARABLE] = 1 if e["sharable"] else 0
        vals[_CBT] = 1 if e.get("cbt_enabled") else 0
        return vals

    def _upsert(self, entries):
        """Insert or replace entries: REPLACE also drops a row holding the
        same zname under another key (zname is UNIQUE), as after a revert."""
        self.db.executemany(_insert(COLUMNS), [self._values(e) for e in entries])

    def commit(self, generation, upsert=(), delete=(), rename=(), destroyed=()):
        """Apply changes and record `generation` atomically.  rename is a list of
        (old dataset, new dataset) moving the snapshots under it; destroyed are
        deleted keys remembered for was_destroyed()."""
        with self._write():
            for key in delete:
                self.db.execute("DELETE FROM volumes WHERE key=?", (key,))
            if destroyed:
                now = int(time.time())
                self.db.execute("DELETE FROM destroyed WHERE at < ?", (now - DESTROYED_TTL,))
                self.db.executemany("INSERT OR REPLACE INTO destroyed (key, at) VALUES (?, ?)",
                                    [(k, now) for k in destroyed])
            for old, new in rename:
                n = len(old)
                for sep in ("@", "#"):              # its snapshots, then its bookmarks
                    self.db.execute("UPDATE volumes SET zname = ? || substr(zname, ?) "
                                    "WHERE zname>=? AND zname<?",
                                    (new, n + 1) + _prefix_range(old + sep))
                self.db.execute("UPDATE volumes SET origin = ? || substr(origin, ?) "
                                "WHERE origin>=? AND origin<?",
                                (new, n + 1) + _prefix_range(old + "@"))
            self._upsert(upsert)
            self._set_generation(generation)

    def replace_under(self, datasets, rows, generation):
        """Every row under datasets (DS, DS@*, DS#*) replaced by rows (as
        _values makes them), at generation (carried.catch_up: read again
        from those datasets; adopt_delta: a carried delta's)."""
        with self._write():
            for ds in datasets:
                self.db.execute("DELETE FROM volumes" + _UNDER, _under(ds))
            self.db.executemany(_insert(COLUMNS), rows)
            self._set_generation(generation)

    def set_built(self, how):
        """Note how the rows were last made whole (SR.attach's log and tests)."""
        self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('built', ?)", (how,))

    def built(self):
        r = self.db.execute("SELECT v FROM meta WHERE k='built'").fetchone()
        return None if r is None else r[0]

    def replace_all(self, entries, generation, renderer=None):
        """Every row at once.  renderer (render key, render: vdi.renderer)
        also keeps each row's SR.ls text, made here from the row as _row
        reads it back, so the first SR.ls after an adopt or a rebuild joins
        stored texts (Index.rendered) instead of reading every row again to
        render it."""
        self._replace_rows([self._values(e) for e in entries], generation, renderer)

    def _replace_rows(self, rows, generation, renderer):
        """replace_all of rows as _values makes them.  The per-row version
        triggers of INSERT and DELETE are dropped inside the transaction and
        made again before it commits, the version moved once instead: at 100k
        rows they were half the time of this call (4.65 s -> 2.35 s
        natively).  Other connections see the triggers all along (the change
        is one transaction)."""
        columns = COLUMNS
        if renderer is not None:
            render_key, render = renderer
            rows = [v + [render(self._row(v))] for v in rows]
            columns = COLUMNS + ["rendered"]
        with self._write():
            for name, _ in _VERSION_TRIGGERS[:2]:
                self.db.execute("DROP TRIGGER IF EXISTS volumes_version_%s" % name)
            self.db.execute("DELETE FROM volumes")
            self.db.executemany(_insert(columns), rows)
            if renderer is not None:
                self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('render-key', ?)",
                                (render_key,))
            self.db.execute(_NEXT_VERSION)
            for name, event in _VERSION_TRIGGERS[:2]:
                self.db.execute(_version_trigger(name, event))
            self._set_generation(generation)

    def invalidate(self):
        self.db.execute("DELETE FROM meta WHERE k='generation'")
