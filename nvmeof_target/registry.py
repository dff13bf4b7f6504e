"""The target's registry of volumes (one subsystem each), persisted in sqlite3.

A volume nobody is connected to costs one table row and nothing else: no
object, no fd.  Connect looks its row up by NQN (primary key), discovery by
host NQN (index), so startup does not depend on how many volumes there are."""

import os
import sqlite3
import uuid as uuidlib
from urllib.parse import quote as urlquote

from . import auth
from .nqn import DISCOVERY_NQN, check_nqn

SCHEMA = """
CREATE TABLE IF NOT EXISTS subsystem (
    nqn TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    uuid TEXT NOT NULL UNIQUE,
    readonly INTEGER NOT NULL DEFAULT 0,
    allow_any INTEGER NOT NULL DEFAULT 0,
    block_size INTEGER NOT NULL DEFAULT 512
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS host (
    nqn TEXT NOT NULL REFERENCES subsystem(nqn) ON DELETE CASCADE,
    hostnqn TEXT NOT NULL,
    PRIMARY KEY (nqn, hostnqn)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS host_by_hostnqn ON host(hostnqn);
CREATE TABLE IF NOT EXISTS host_key (
    hostnqn TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    ctrl_secret TEXT,
    hash TEXT NOT NULL DEFAULT 'sha256',
    dhgroup TEXT NOT NULL DEFAULT 'ffdhe2048'
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS auth_required (
    nqn TEXT PRIMARY KEY
) WITHOUT ROWID;
"""
ALL = "*"               # auth_required row: every subsystem

BLOCK_SIZES = (512, 1024, 2048, 4096)


def default_path():
    return os.environ.get("ZFSNG_TARGET_STATE", "/var/lib/zfs-ng/target.db")


def served_nqns(path=None):
    """The subsystem NQNs in a registry file, read-only and without the
    target running (the volume plugin asks at boot which zvols the target
    will serve again); [] when there is no registry."""
    path = path or default_path()
    if not os.path.exists(path):
        return []
    try:
        db = sqlite3.connect("file:%s?mode=ro" % urlquote(os.path.abspath(path)), uri=True)
    except sqlite3.Error:
        return []
    try:
        return [r[0] for r in db.execute("SELECT nqn FROM subsystem")]
    except sqlite3.Error:
        return []
    finally:
        db.close()


class Volume(object):
    __slots__ = ("nqn", "path", "uuid", "readonly", "allow_any", "block_size")

    def __init__(self, nqn, path, uuid, readonly, allow_any, block_size):
        self.nqn, self.path, self.uuid = nqn, path, uuid
        self.readonly, self.allow_any, self.block_size = bool(readonly), bool(allow_any), block_size

    def as_dict(self):
        return {k: getattr(self, k) for k in self.__slots__}


def check_volume(nqn, path, uuid, block_size):
    check_nqn(nqn, "subsystem NQN")
    if nqn == DISCOVERY_NQN:
        raise ValueError("the discovery NQN cannot name a volume")
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise ValueError("volume path must be an absolute path: %r" % (path,))
    try:
        uuid = str(uuidlib.UUID(str(uuid)))
    except ValueError:
        raise ValueError("invalid volume UUID %r" % (uuid,))
    if block_size not in BLOCK_SIZES:
        raise ValueError("block size must be one of %s" % (BLOCK_SIZES,))
    return uuid


class Registry(object):
    def __init__(self, path=":memory:"):
        if path != ":memory:":
            d = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(d):
                os.makedirs(d, 0o700)
        self.path = path
        if path != ":memory:":
            _private(path)          # it holds DH-HMAC-CHAP secrets
        self.db = sqlite3.connect(path, isolation_level=None)   # autocommit; BEGIN explicit
        self.db.execute("PRAGMA foreign_keys = ON")
        if path != ":memory:":
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    # ---- changes -------------------------------------------------------------------
    def add(self, nqn, path, uuid, readonly=False, allowed_hosts=(), allow_any_host=False,
            block_size=512, require_auth=False):
        uuid = check_volume(nqn, path, uuid, block_size)
        hosts = [check_nqn(h, "host NQN") for h in allowed_hosts]
        with _Txn(self.db):
            if self.get(nqn) is not None:
                raise ValueError("subsystem %s already exists" % nqn)
            if self.db.execute("SELECT 1 FROM subsystem WHERE uuid = ?", (uuid,)).fetchone():
                raise ValueError("UUID %s is already used by another subsystem" % uuid)
            self.db.execute("INSERT INTO subsystem VALUES (?, ?, ?, ?, ?, ?)",
                            (nqn, path, uuid, int(bool(readonly)), int(bool(allow_any_host)),
                             block_size))
            self.db.executemany("INSERT OR IGNORE INTO host VALUES (?, ?)",
                                [(nqn, h) for h in hosts])
            if require_auth:
                self.db.execute("INSERT OR IGNORE INTO auth_required VALUES (?)", (nqn,))
        return self.get(nqn)

    def add_many(self, rows):
        """Bulk insert of (nqn, path, uuid, readonly, allow_any, block_size) rows,
        validated like add(); one transaction."""
        checked = []
        for nqn, path, uuid, ro, anyhost, bs in rows:
            checked.append((nqn, path, check_volume(nqn, path, uuid, bs), int(ro), int(anyhost), bs))
        with _Txn(self.db):
            self.db.executemany("INSERT INTO subsystem VALUES (?, ?, ?, ?, ?, ?)", checked)

    def remove(self, nqn):
        with _Txn(self.db):
            if self.get(nqn) is None:
                raise KeyError("no subsystem %s" % nqn)
            self.db.execute("DELETE FROM host WHERE nqn = ?", (nqn,))
            self.db.execute("DELETE FROM auth_required WHERE nqn = ?", (nqn,))
            self.db.execute("DELETE FROM subsystem WHERE nqn = ?", (nqn,))

    def allow(self, nqn, hostnqn):
        check_nqn(hostnqn, "host NQN")
        self._must(nqn)
        self.db.execute("INSERT OR IGNORE INTO host VALUES (?, ?)", (nqn, hostnqn))

    def deny(self, nqn, hostnqn):
        self._must(nqn)
        self.db.execute("DELETE FROM host WHERE nqn = ? AND hostnqn = ?", (nqn, hostnqn))

    def set_allow_any(self, nqn, value):
        self._must(nqn)
        self.db.execute("UPDATE subsystem SET allow_any = ? WHERE nqn = ?", (int(bool(value)), nqn))

    # ---- DH-HMAC-CHAP (auth.py) -------------------------------------------------------
    def set_host_key(self, hostnqn, secret, ctrl_secret=None, hash_name="sha256",
                     dhgroup="ffdhe2048"):
        """A host's secret (DHHC-1), optionally the controller's for
        bidirectional authentication; with a key the host always authenticates."""
        check_nqn(hostnqn, "host NQN")
        auth.HostAuth(hostnqn, secret, ctrl_secret, hash_name, dhgroup)     # validates
        if ctrl_secret is not None and ctrl_secret.strip() == secret.strip():
            raise ValueError("the controller secret must differ from the host secret")
        self.db.execute("INSERT OR REPLACE INTO host_key VALUES (?, ?, ?, ?, ?)",
                        (hostnqn, secret.strip(), ctrl_secret.strip() if ctrl_secret else None,
                         hash_name, dhgroup))

    def remove_host_key(self, hostnqn):
        if self.db.execute("DELETE FROM host_key WHERE hostnqn = ?", (hostnqn,)).rowcount == 0:
            raise KeyError("no DH-HMAC-CHAP key for %s" % hostnqn)

    def host_auth(self, hostnqn):
        """auth.HostAuth of this host, None if it has no key."""
        row = self.db.execute("SELECT secret, ctrl_secret, hash, dhgroup FROM host_key "
                              "WHERE hostnqn = ?", (hostnqn,)).fetchone()
        return auth.HostAuth(hostnqn, *row) if row else None

    def host_keys(self):
        """The hosts with a key, without the secrets."""
        return [{"hostnqn": h, "bidirectional": c is not None, "hash": hs, "dhgroup": g}
                for h, c, hs, g in self.db.execute(
                    "SELECT hostnqn, ctrl_secret, hash, dhgroup FROM host_key ORDER BY hostnqn")]

    def set_auth_required(self, nqn, value=True):
        """Hosts without a key are refused by subsystem nqn (ALL: every one)."""
        if nqn != ALL:
            self._must(nqn)
        if value:
            self.db.execute("INSERT OR IGNORE INTO auth_required VALUES (?)", (nqn,))
        else:
            self.db.execute("DELETE FROM auth_required WHERE nqn = ?", (nqn,))

    def auth_required(self, nqn):
        return self.db.execute("SELECT 1 FROM auth_required WHERE nqn = ? OR nqn = ?",
                               (nqn, ALL)).fetchone() is not None

    # ---- lookups --------------------------------------------------------------------
    def _must(self, nqn):
        vol = self.get(nqn)
        if vol is None:
            raise KeyError("no subsystem %s" % nqn)
        return vol

    def get(self, nqn):
        row = self.db.execute("SELECT nqn, path, uuid, readonly, allow_any, block_size "
                              "FROM subsystem WHERE nqn = ?", (nqn,)).fetchone()
        return Volume(*row) if row else None

    def hosts(self, nqn):
        return [r[0] for r in self.db.execute(
            "SELECT hostnqn FROM host WHERE nqn = ? ORDER BY hostnqn", (nqn,))]

    def host_allowed(self, vol, hostnqn):
        if vol.allow_any:
            return True
        return self.db.execute("SELECT 1 FROM host WHERE nqn = ? AND hostnqn = ?",
                               (vol.nqn, hostnqn)).fetchone() is not None

    def visible(self, hostnqn):
        """Subsystem NQNs this host may connect to (for its discovery log)."""
        return [r[0] for r in self.db.execute(
            "SELECT nqn FROM host WHERE hostnqn = ? UNION "
            "SELECT nqn FROM subsystem WHERE allow_any = 1 ORDER BY 1", (hostnqn,))]

    def count(self):
        return self.db.execute("SELECT count(*) FROM subsystem").fetchone()[0]

    def list(self):
        hosts = {}
        for nqn, h in self.db.execute("SELECT nqn, hostnqn FROM host ORDER BY nqn, hostnqn"):
            hosts.setdefault(nqn, []).append(h)
        required = {r[0] for r in self.db.execute("SELECT nqn FROM auth_required")}
        out = []
        for row in self.db.execute("SELECT nqn, path, uuid, readonly, allow_any, block_size "
                                   "FROM subsystem ORDER BY nqn"):
            d = Volume(*row).as_dict()
            d["allowed_hosts"] = hosts.get(d["nqn"], [])
            d["require_auth"] = d["nqn"] in required or ALL in required
            out.append(d)
        return out


def _private(path):
    """Create the registry (and sqlite's -wal/-shm beside it, which copy its
    mode) readable by its owner only, and tighten an older one."""
    d = os.path.dirname(os.path.abspath(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for side in ("-wal", "-shm"):
        try:
            os.chmod(os.path.join(d, os.path.basename(path) + side), 0o600)
        except OSError:
            pass


class _Txn(object):
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
