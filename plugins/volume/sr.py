"""SRs: one zpool each (created by SR.create or adopted with zpool=), with the
SR root dataset POOL/zfs-ng holding every volume (see names.py for the layout
and metadata.py for the properties).  The SR string xapi passes around is the
pool name.

`SR` is the handle every volume operation goes through: it checks the SR is
there, keeps the local index in step with the pool generation, and wraps each
mutation in the SR lock with the generation bumped first (`mutate`), naming
the datasets it may change in the pool's journal in the same `zfs set`
(journal.py), so a host taking the pool after a crash re-reads those alone.

SR.attach also clears what crashes and killed calls leave: hidden datasets
nothing needs (collect_garbage), snapshots of interrupted CBT calls
(drop_interrupted) and, after an import or the first attach since boot,
devices no datapath records (reset_stale_devices, from plugins/records.py).
"""

import contextlib
import errno
import os
import stat as stat_mod
import subprocess

from plugins import nodes, records, smapi, zfs
from plugins.smapi import BackendError, InvalidParameters
from plugins.volume import bookmarks
from plugins.volume import carried
from plugins.volume import cbt
from plugins.volume import journal
from plugins.volume import lock
from plugins.volume import metadata
from plugins.volume import names
from plugins.volume import vdi

# configuration keys SR.create/attach understand (Plugin.query lists them)
CONFIGURATION = {
    "device": "comma-separated block devices (or files) for a new pool",
    "file-uri": "the same as file:///dev/sdb URIs, comma-separated",
    "vdev": "layout: stripe (default), mirror, raidz1, raidz2, raidz3, "
            "mirror:2 (stripes of 2-way mirrors), or 'mirror 0 1 mirror 2 3'",
    "zpool": "adopt this existing imported pool instead of creating one",
    "compression": "lz4 (default), zstd, zstd-N or off",
    "ashift": "sector size exponent for a new pool (9..16, default 12)",
    "autotrim": "on (default) or off",
    "datapath": "raw (default), nbd or nvme: which volume URI comes first",
    "nvme-node": "host:port of the NVMe/TCP target serving this SR's volumes",
    "nbd-node": "host:port of the node's NBD-over-TLS endpoint serving this SR's volumes",
    "nvme-auth": "required: hosts attaching over nvme+tcp must authenticate with "
                 "DH-HMAC-CHAP (a key per host: zfs-ng target host-key set on the node, "
                 "/etc/zfs-ng/dhchap-keys.json on the host); off (default)",
    "node": "[user@]host of the storage node that holds the pool: every other host "
            "of the pool reaches it over ssh and attaches over nvme-node/nbd-node",
}
_CREATE_ONLY = ("device", "file-uri", "vdev", "ashift", "autotrim")

# Keys SR.create and SR.probe add to the configuration (xapi stores SR.create's
# result as every PBD's device_config and passes it back to SR.attach).
# xapi-storage-script reads the SR uuid of a probe result as "sr_uuid"
# (main.ml, SRImpl.sr_probe_impl: a result with an SR stat and no sr_uuid fails
# the whole probe); "sr-uuid" is what PBDs made before 0.2 carry.
SR_UUID = "sr_uuid"
_OLD_SR_UUID = "sr-uuid"
_ADDED = ("pool", SR_UUID, _OLD_SR_UUID)


def configured_uuid(configuration):
    """The SR uuid a configuration names (either spelling), or None."""
    return configuration.get(SR_UUID) or configuration.get(_OLD_SR_UUID) or None


def sr_configuration(pool, sr_uuid, **more):
    """The configuration of an SR as SR.create and SR.probe hand it to xapi."""
    out = {"pool": pool, SR_UUID: sr_uuid}
    out.update(more)
    return out


# -- the handle -----------------------------------------------------------------

class Txn(object):
    """What one mutation changed, applied to the index after the ZFS work."""

    def __init__(self):
        self.refresh = []   # ZFS names to (re)read into the index
        self.entries = []   # index entries known without reading ZFS
        self.delete = []    # keys gone
        self.destroyed = []  # keys Volume.destroy removed (a repeat succeeds)
        self.rename = []    # (old dataset, new dataset)


class SR(object):
    def __init__(self, pool, props):
        self.pool = pool
        self.root = names.sr_root(pool)
        self.props = props
        self._index = None

    @classmethod
    def open(cls, sr):
        """The handle for an attached SR, or the IDL error saying why not."""
        if not isinstance(sr, str) or not names.is_pool(sr):
            raise smapi.SrDoesNotExist(str(sr))
        props = read_root_props(sr)
        if props is None:
            if sr in zfs.pools():
                raise smapi.SrDoesNotExist(sr)
            raise smapi.SrNotAttached(sr)
        return cls(sr, props)

    @property
    def uuid(self):
        return self.props.get("sr-uuid", "")

    @property
    def generation(self):
        return int(self.props.get("generation", 0))

    def index(self):
        if self._index is None:
            self._index = metadata.Index.for_sr(self.uuid)
        return self._index

    def reload(self):
        self.props = read_root_props(self.pool)
        if self.props is None:
            raise smapi.SrNotAttached(self.pool)

    # freshness -----------------------------------------------------------------
    def fresh_index(self):
        """The index, rebuilt from the pool first if its generation differs."""
        idx = self.index()
        if idx.generation() == self.generation:
            return idx
        with lock.sr_lock(self.pool):
            self.reload()
            if idx.generation() != self.generation:
                self.refresh()
        return idx

    def refresh(self):
        """The index brought to the pool's generation (caller holds the lock):
        from the journal where it can (catch_up_local), else read whole
        (reconcile).  Either way the next SR.attach sweeps (a mutation may
        have been cut short)."""
        if self.catch_up_local() is None:
            self.reconcile()
        else:
            self.index().want_sweep("index caught up at generation %d" % self.generation)

    def catch_up_local(self):
        """Where the pool's journal leads from a generation the index is at or
        past (a mutation on this host stopped between its bump and its index
        update, or another one on this pool since), only the journal's
        datasets are read again (carried.catch_up): returns what catch_up
        does, or None where the journal does not lead from the index."""
        base, changed = journal.parse(self.props.get("journal"), self.generation)
        at = self.index().generation()
        if base is None or at is None or not base <= at < self.generation:
            return None
        return carried.catch_up(self, "index at %d" % at, journal.datasets(self.root, changed))

    def reconcile(self):
        """Rebuild the index from ZFS (caller holds the lock).  Finishes or undoes
        an interrupted revert first, so a crash never loses or invents a volume.
        A stale index means a mutation may have been cut short: the next
        SR.attach sweeps (a mark, Index.want_sweep).  Returns [name, origin] of
        every volume and snapshot (metadata.read_all), which those sweeps take
        instead of walking the SR again."""
        self.index().want_sweep("index rebuilt at generation %d" % self.generation)
        entries, rows = metadata.read_all(self.pool)
        if self.finish_reverts(set(r[0] for r in rows)):
            entries, rows = metadata.read_all(self.pool)    # renamed: read again
        self.index().replace_all(entries, self.generation, vdi.renderer(self))
        self.index().set_built("rebuilt at %d" % self.generation)
        return rows

    def finish_reverts(self, present):
        """r-KEY left by an interrupted revert: destroyed if KEY is still
        there, else renamed to KEY.  True if there was any."""
        done = False
        for zname in sorted(present):
            kind, key = names.classify(zname, self.pool)
            if kind != "reverting":
                continue
            target = names.volume_dataset(self.pool, key)
            if target in present:
                zfs.zfs("destroy", zname)
            else:
                zfs.zfs("rename", zname, target)
            done = True
        return done

    # mutations -------------------------------------------------------------------
    @contextlib.contextmanager
    def mutate(self, *znames):
        """Bump the pool generation (so a crash before the index is updated is
        seen as stale) with znames, every ZFS name whose dataset the mutation
        may change, in the pool's journal (one `zfs set`: self.journal), yield
        a Txn, then apply it to the index.  The caller holds the SR lock and
        opened the handle under it (see `locked`)."""
        idx = self.index()
        if idx.generation() != self.generation:
            self.refresh()
        gen = self.generation + 1
        self.journal(znames, bump=True)
        txn = Txn()
        yield txn
        upsert = list(txn.entries)
        if txn.refresh:
            upsert += metadata.read_entries(self.pool, txn.refresh)
        idx.commit(gen, upsert=upsert, delete=txn.delete, rename=txn.rename,
                   destroyed=txn.destroyed)

    def journal(self, znames, bump=False):
        """Name the datasets of znames in the pool's journal before they change
        (journal.py), and with bump move the generation on in the same `zfs
        set`.  A journal that would overflow, or that has no carried copy to
        start from, starts again from a copy of the index carried now
        (carried.py): a new host then reads every dataset if no copy could be
        made.  Caller holds the SR lock with self.props read under it."""
        base, have = journal.parse(self.props.get("journal"), self.generation)
        add = frozenset(n for n in (journal.name_of(self.root, z) for z in znames) if n)
        at = self.generation + 1 if bump else self.generation
        if base is None or not journal.fits(base, have | add, at):
            # a copy of the index as it is: only while it is at the pool's
            # generation (not inside a mutation, after its bump); else no
            # journal until the next mutation carries one
            base = self.generation if carried.carry_index(self) else None
            have = frozenset()
        value = journal.build(base, have | add, at)
        props = {}
        if value != self.props.get("journal"):
            props[zfs.uprop("journal")] = zfs.encode(value)
        if bump:
            props[zfs.uprop("generation")] = str(self.generation + 1)
        if props:
            # in-process (libzfs) where it loads: every mutation pays this, and a
            # zfs process took 0.3-0.46 s of a 1.3 s Volume.create in the TCG VM
            zfs.set_props(self.root, props)
            self.props["journal"] = value
            if bump:
                self.props["generation"] = self.generation + 1

    def find(self, key, what="key"):
        """Index lookup without a freshness check (inside mutate)."""
        names.check_key(key, what)
        e = self.index().get(key)
        if e is None:
            raise smapi.VolumeDoesNotExist(key)
        return e

    def lookup(self, key, what="key"):
        names.check_key(key, what)
        e = self.fresh_index().get(key)
        if e is None:
            raise smapi.VolumeDoesNotExist(key)
        return e


@contextlib.contextmanager
def locked(sr):
    """The handle of SR sr opened under its lock, index fresh: check
    preconditions with handle.find(), then change things in handle.mutate()."""
    if not isinstance(sr, str) or not names.is_pool(sr):
        raise smapi.SrDoesNotExist(str(sr))
    with lock.sr_lock(sr):
        handle = SR.open(sr)
        if handle.index().generation() != handle.generation:
            handle.refresh()
        yield handle


def attached_pool(sr_uuid):
    """The pool of the attached SR sr_uuid (SrNotAttached)."""
    for pool in attached():
        props = read_root_props(pool) or {}
        if props.get("sr-uuid") == sr_uuid:
            return pool
    raise smapi.SrNotAttached(sr_uuid)


def read_root_props(pool):
    try:
        got = zfs.local_user_props(names.sr_root(pool),
                                   [zfs.uprop(p) for p in metadata.ROOT_PROPS])
    except zfs.NotFound:
        return None
    props = {}
    for k, v in got.items():
        props[k[len(zfs.PREFIX):]] = zfs.decode(v)
    if "sr-uuid" not in props:
        return None  # a dataset of that name that we did not make
    return props


# -- SR.create ------------------------------------------------------------------

def _devices(configuration):
    devs = []
    for d in configuration.get("device", "").split(","):
        if d.strip():
            devs.append(d.strip())
    for u in configuration.get("file-uri", "").split(","):
        u = u.strip()
        if not u:
            continue
        if not u.startswith("file://"):
            raise InvalidParameters("file-uri %r must be file:///path" % u)
        devs.append(u[len("file://"):])
    return [names.check_device(d) for d in devs]


def disk_of(path):
    """The whole disk behind a path (zpool partitions whole disks: -part1)."""
    real = os.path.realpath(path)
    sys_dir = "/sys/class/block/%s" % os.path.basename(real)
    if os.path.exists(os.path.join(sys_dir, "partition")):
        return "/dev/" + os.path.basename(os.path.dirname(os.path.realpath(sys_dir)))
    return real


def search_paths(devs):
    """`zpool import -d` paths for devs: a whole disk's labels are on the
    partition zpool made, so its partitions are searched too."""
    out = []
    for d in devs:
        out.append(d)
        real = os.path.realpath(d)
        sys_dir = "/sys/class/block/%s" % os.path.basename(real)
        try:
            parts = sorted(n for n in os.listdir(sys_dir)
                           if os.path.exists(os.path.join(sys_dir, n, "partition")))
        except OSError:
            continue
        out += ["/dev/" + n for n in parts]
    return out


def _in_use_by_pools():
    used = set()
    for p in zfs.pools():
        for d in zfs.pool_devices(p):
            used.add(disk_of(d))
    return used


def check_devices(devs):
    """Every device exists, is a block device or a large enough file, and is not
    in use (mounted, held, or part of an imported pool)."""
    used = _in_use_by_pools()
    for d in devs:
        if not os.path.exists(d):
            raise BackendError("Device_not_found", "%s does not exist" % d)
        real = os.path.realpath(d)
        if disk_of(d) in used:
            raise BackendError("Device_in_use", "%s is part of an imported pool" % d)
        st = os.stat(real)
        if stat_mod.S_ISBLK(st.st_mode):
            try:
                fd = os.open(real, os.O_RDONLY | os.O_EXCL)
                os.close(fd)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    raise BackendError("Device_in_use", "%s is in use (mounted or held)" % d)
                raise BackendError("Device_error", "%s: %s" % (d, e.strerror))
        elif stat_mod.S_ISREG(st.st_mode):
            if st.st_size < 64 << 20:
                raise BackendError("Device_too_small", "%s is smaller than 64 MiB" % d)
        else:
            raise BackendError("Device_not_found", "%s is not a block device or a file" % d)


def _settle():
    try:
        subprocess.call(["udevadm", "settle", "--timeout=30"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    except OSError:
        pass


# How many times SR.create runs `zpool create` when the kernel could not open
# a partition zpool had just made (see _create_pool).
CREATE_TRIES = 5


def _create_pool(argv):
    """Run `zpool create` (argv), again when the kernel missed a new partition.

    On a whole disk zpool writes a new partition table, re-reads it and waits
    until udev's link to partition 1 exists (libzutil zpool_label_disk_wait);
    the kernel then opens the vdev by that link.  udev may still be dropping
    and re-making the link (it re-reads the table again when the disk zpool
    wrote is closed), and the open then fails: "one or more devices is
    currently unavailable".  Seen in the test VM under load with the kernel's
    reason in /proc/spl/kstat/zfs/dbgmsg: "disk vdev '...-part1': open
    error=2" (ENOENT) 40 ms into the open, with the other two disks of the
    raidz opened; 1 create in 4 failed with two busy loops beside it
    (tests/vm probe t5).  OpenZFS issues #1646, #3708, #4077 report the same
    race and retrying as the way through.  A failed create leaves no pool, so
    running it again after udev settles is safe; any other error is final."""
    for attempt in range(1, CREATE_TRIES + 1):
        _settle()
        try:
            return zfs.zpool(*argv)
        except zfs.ZfsError as e:
            transient = "currently unavailable" in e.message or "no such pool" in e.message
            if not transient or attempt == CREATE_TRIES:
                raise
            smapi.log.info("zpool create: %s (try %d of %d); again once udev settles",
                           e.message, attempt, CREATE_TRIES)


def _root_create_args(sr_uuid, name, description, created_pool, configuration):
    props = {
        "canmount": "off", "mountpoint": "none", "volmode": "none", "snapdev": "hidden",
        "compression": names.check_compression(configuration.get("compression", "lz4")),
    }
    user = {"sr-uuid": sr_uuid, "sr-name": name, "sr-description": description,
            "generation": 0, "created-pool": created_pool,
            "datapath": names.check_datapath(configuration.get("datapath", "raw"))}
    if configuration.get("nvme-node"):
        user["nvme-node"] = names.check_nvme_node(configuration["nvme-node"])
    if configuration.get("nbd-node"):
        user["nbd-node"] = names.check_endpoint(configuration["nbd-node"], "nbd-node")
    if configuration.get("nvme-auth"):
        user["nvme-auth"] = names.check_auth(configuration["nvme-auth"])
    for k, v in user.items():
        props[zfs.uprop(k)] = zfs.encode(v)
    return zfs.prop_args(props)


def create(uuid, configuration, name, description):
    sr_uuid = names.check_uuid(uuid)
    names.check_text(name, "name")
    names.check_text(description, "description")
    unknown = sorted(set(configuration) - set(CONFIGURATION) - set(_ADDED))
    if unknown:
        raise InvalidParameters("unknown configuration keys: %s" % ", ".join(unknown))
    names.check_compression(configuration.get("compression", "lz4"))
    names.check_datapath(configuration.get("datapath", "raw"))
    if configuration.get("nvme-node"):
        names.check_nvme_node(configuration["nvme-node"])
    if configuration.get("nbd-node"):
        names.check_endpoint(configuration["nbd-node"], "nbd-node")
    names.check_auth(configuration.get("nvme-auth", "off"))
    if configuration.get("node"):
        nodes.check_node(configuration["node"])
    given = configured_uuid(configuration)
    if given and given != sr_uuid:
        raise InvalidParameters("configuration names SR %s, not %s" % (given, sr_uuid))
    out = dict(configuration)
    out.pop(_OLD_SR_UUID, None)
    out[SR_UUID] = sr_uuid

    if configuration.get("zpool"):
        pool = names.check_pool(configuration["zpool"])
        bad = [k for k in _CREATE_ONLY if configuration.get(k)]
        if bad:
            raise InvalidParameters("zpool= adopts an existing pool; %s only apply to a "
                                    "new pool" % ", ".join(bad))
        with lock.sr_lock(pool):
            if pool not in zfs.pools():
                raise BackendError("Pool_not_found", "pool %s is not imported" % pool)
            health = zfs.pool_health(pool)
            if health not in ("ONLINE", "DEGRADED"):
                raise BackendError("Pool_unhealthy", "pool %s is %s" % (pool, health))
            existing = read_root_props(pool)
            if existing is not None:
                if existing.get("sr-uuid") == sr_uuid:
                    out["pool"] = pool
                    return out  # a retried create
                raise BackendError("Pool_in_use", "pool %s already holds zfs-ng SR %s"
                                   % (pool, existing.get("sr-uuid")))
            if zfs.exists(names.sr_root(pool)):
                raise BackendError("Pool_in_use", "%s exists and is not a zfs-ng SR"
                                   % names.sr_root(pool))
            zfs.zfs("create", *(_root_create_args(sr_uuid, name, description, False,
                                                  configuration) + [names.sr_root(pool)]))
        out["pool"] = pool
        return out

    devs = _devices(configuration)
    if not devs:
        raise InvalidParameters("SR.create needs device=, file-uri= or zpool=")
    vdevs = names.parse_vdev_spec(configuration.get("vdev", ""), devs)
    ashift = names.check_ashift(configuration.get("ashift", "12"))
    autotrim = names.check_bool_text(configuration.get("autotrim", "on"), "autotrim")
    pool = "zfsng-%s" % sr_uuid
    with lock.sr_lock(pool):
        existing = read_root_props(pool) if pool in zfs.pools() else None
        if existing is not None and existing.get("sr-uuid") == sr_uuid:
            out["pool"] = pool
            return out
        check_devices(devs)
        argv = ["create", "-o", "ashift=%s" % ashift, "-o", "autotrim=%s" % autotrim,
                "-O", "canmount=off", "-O", "mountpoint=none", pool] + vdevs
        _create_pool(argv)
        try:
            zfs.zfs("create", *(_root_create_args(sr_uuid, name, description, True,
                                                  configuration) + [names.sr_root(pool)]))
        except Exception:
            zfs.run([zfs.ZPOOL, "destroy", "-f", pool], check=False)
            raise
    out["pool"] = pool
    return out


# -- attach / detach / destroy --------------------------------------------------

def _pool_of(configuration):
    pool = configuration.get("pool") or configuration.get("zpool")
    if not pool:
        raise InvalidParameters("configuration has no pool (use what SR.create returned)")
    return names.check_pool(pool)


def attach(configuration):
    pool = _pool_of(configuration)
    want_uuid = configured_uuid(configuration)
    with lock.sr_lock(pool):
        imported = pool not in zfs.pools()
        if imported:
            argv = [zfs.ZPOOL, "import", "-N"]
            for d in search_paths(_devices(configuration)):
                argv += ["-d", d]
            try:
                zfs.run(argv + [pool])
            except zfs.ZfsError as e:
                raise smapi.SrDoesNotExist("%s: %s" % (pool, e.message))
        handle = SR.open(pool)
        if want_uuid and handle.uuid != want_uuid:
            raise BackendError("SR_mismatch", "pool %s holds SR %s, not %s"
                               % (pool, handle.uuid, want_uuid))
        for k, check in (("datapath", names.check_datapath),
                         ("nvme-node", lambda v: names.check_endpoint(v, "nvme-node")),
                         ("nbd-node", lambda v: names.check_endpoint(v, "nbd-node")),
                         ("nvme-auth", names.check_auth)):
            v = configuration.get(k)
            if v is None or handle.props.get(k) == v:
                continue
            v = check(v)
            zfs.zfs("set", "%s=%s" % (zfs.uprop(k), zfs.encode(v)), handle.root)
        handle.reload()
        idx = handle.index()
        rebuilt = False
        rows = None
        if idx.generation() != handle.generation:
            taken = handle.catch_up_local()
            if taken is None:
                taken = carried.adopt_carried(handle)
            if taken is None:
                rows = handle.reconcile()
                rebuilt = True
            elif taken[0]:
                # caught up from the journal: what a crash or a kill may have
                # left is in the datasets read again, swept from that reading
                scope, got = taken
                gone = drop_interrupted(pool, got)
                collect_garbage(handle, [r for r in got if r[0] not in gone], scope)
        # The sweeps look at every dataset: only where a crash or a kill may
        # have left something (a mark: Index.want_sweep; every reconcile
        # leaves one), from the rebuild's own reading if there was one.
        if idx.sweeps_wanted():
            if rows is None:
                rows = zfs.list_names(handle.root, ("name", "origin"))
            gone = drop_interrupted(pool, rows)
            if collect_garbage(handle, [r for r in rows if r[0] not in gone]):
                idx.swept()
        marker = _attached_marker(pool)
        if imported or not os.path.exists(marker):
            # A fresh import, or the first attach since boot (the pool may be
            # imported at boot): devices left active by a crash.  Other
            # attaches leave devices alone: not every user is recorded
            # (Volume.compare, a restore into a volume).
            # which devices to look at: the marked keys (activate_device and
            # sessions mark before making one), unless the index was rebuilt
            # or never tracked them: then every volume
            keys = None if rebuilt or not idx.devices_tracked() else idx.touched()
            try:
                reset_stale_devices(handle, keys)
            except zfs.ZfsError as e:   # a cleanup: the SR is usable, retried next attach
                smapi.log.error("%s: devices left active stay so: %s", pool, e.message)
            else:
                with open(marker, "w"):
                    pass
    return pool


def _attached_marker(pool):
    """/run/zfs-ng/POOL.attached: SR.attach ran since boot, SR.detach not since."""
    return os.path.join(lock.RUN_DIR, "%s.attached" % pool)


def _forget_attached(pool):
    try:
        os.unlink(_attached_marker(pool))
    except OSError:
        pass


def listing_path(sr_uuid):
    """/run/zfs-ng/SR-UUID.ls: SR.ls's listing kept between calls
    (metadata.Index.listing: it names the index version it shows)."""
    return os.path.join(lock.RUN_DIR, "%s.ls" % names.check_uuid(sr_uuid))


def _forget_listing(sr_uuid):
    """Free the kept listing (it lives in RAM) of an SR leaving this host."""
    try:
        os.unlink(listing_path(sr_uuid))
    except (OSError, smapi.SmapiError):
        pass


def collect_garbage(handle, rows=None, scope=None):
    """Destroy hidden datasets nothing depends on any more: destroyed volumes
    whose snapshots are all gone, clone origins whose clones are gone, leftovers
    of interrupted operations.  False if something busy was kept for later.
    rows: [name, origin] of every volume and snapshot as they are now (else
    listed here).  scope: only these datasets (with their snapshots) and the
    origins of those destroyed, up the chain (a catch-up from the journal);
    a hidden snapshot whose clone is outside them is destroyed deferred (`-d`:
    ZFS keeps it while a clone is there).  Caller holds the lock."""
    scope = None if scope is None else set(scope)
    tried = set()       # a deferred destroy leaves the snapshot listed: once is enough
    for _ in range(64):
        if rows is None:
            rows = zfs.list_names(handle.root if scope is None else sorted(scope),
                                  ("name", "origin"), missing_ok=scope is not None)
        origins = set(r[1] for r in rows if len(r) > 1)
        has_snaps = set(r[0].split("@", 1)[0] for r in rows if "@" in r[0])
        # datasets holding data-destroyed snapshots (bookmarks) are not garbage
        has_snaps |= bookmarks.datasets(handle.pool, None if scope is None else sorted(scope))
        victims = []
        for r in rows:
            kind, _ = names.classify(r[0], handle.pool)
            if kind != "hidden" or r[0] in tried:
                continue
            if "@" in r[0]:
                if r[0] not in origins:
                    victims.append(("snap", r[0]))
            elif r[0] not in has_snaps:
                victims.append(("vol", r[0]))
                if scope is not None and len(r) > 1 and "@" in r[1]:
                    scope.add(r[1].split("@", 1)[0])     # its origin: garbage next?
        if not victims:
            return True
        tried.update(zname for _, zname in victims)
        for what, zname in victims:
            try:
                if what == "snap":
                    zfs.zfs("destroy", "-d", zname)
                else:
                    zfs.destroy_retrying(zname, tries=12)   # a udev probe, a moment
            except zfs.NotFound:
                pass
            except zfs.Busy:
                smapi.log.info("garbage %s busy, kept for later", zname)
                return False
        rows = None         # destroying may have made more garbage: look again
    return False


def drop_interrupted(pool, rows):
    """Destroy the snapshots cbt.py makes and drops within one call (the
    anchor snapshot of an enable, the temporary end of a live interval) that
    a killed call left behind.  They would pin their volume for good: once
    destroyed it stays as a hidden dataset collect_garbage keeps (it has a
    snapshot).  rows: [name, ...] of the SR's volumes and snapshots.  Returns
    the names of those gone.  Caller holds the SR lock, so no CBT call is
    using them."""
    gone = set()
    for r in rows:
        snap = r[0].split("@", 1)[1] if "@" in r[0] else ""
        if snap == cbt.ANCHOR or snap.startswith(cbt.TMP_PREFIX):
            smapi.log.info("%s: left by an interrupted CBT call, destroyed", r[0])
            try:
                zfs.zfs("destroy", r[0])
            except zfs.NotFound:
                pass
            gone.add(r[0])
    return gone


def reset_stale_devices(handle, keys=None):
    """Deactivate what a host crash left active: zvols with volmode=dev,
    snapshots' read-only clones and non-persistent sessions' clones (np-KEY)
    come back with their device nodes at the next import, and no
    deactivate_device or Datapath.close would ever come for them.  Whatever no
    datapath on this host records as its own (the records live on tmpfs: after
    a reboot there are none) is reset: volumes inherit the SR's volmode=none,
    read-only clones are destroyed, session clones are discarded with their
    snapshot (a reset-on-boot VM's writes, which its next start discards
    anyway; otherwise Volume.destroy of its VDI would find the session open).
    keys: only these keys' volume, ro-KEY and np-KEY are looked at (the
    index's marks: a few `zfs get` of named datasets); None: every volume of
    the SR (one `zfs get -r -t volume`, which at 100k volumes is minutes), and
    afterwards the marks are complete (Index.set_devices_tracked).  Returns
    the datasets reset.  Caller holds the SR lock."""
    idx = handle.index()
    if keys is None:
        out = zfs.run([zfs.ZFS, "get", "-r", "-t", "volume", "-s", "local", "-H", "-p",
                       "-o", "name,value", "volmode", handle.root])
        found = [r for r in zfs.rows(out) if len(r) >= 2]
    else:
        wanted = []
        for k in keys:
            e = idx.get(k)
            if e is not None and e["kind"] == "volume":
                wanted.append(e["zname"])
            wanted += [names.readonly_dataset(handle.pool, k),
                       names.session_dataset(handle.pool, k)]
        found = []
        for i in range(0, len(wanted), 512):        # bounded argv
            got = zfs.get_existing(wanted[i:i + 512], ["volmode"])
            found += [(n, p.get("volmode")) for n, p in got.items()]
    used = records.recorded_keys(handle.pool) | records.served_keys(handle.uuid)
    volumes, clones, sessions = [], [], []
    for r in found:
        kind, key = names.classify(r[0], handle.pool)
        if r[1] != "dev" or key is None:
            continue
        if key in used:
            if keys is None:
                idx.touch(key)       # active before the marks existed: marked now
            continue
        if kind == "volume":
            volumes.append(r[0])
        elif kind == "readonly":
            clones.append(r[0])
        elif kind == "session":
            sessions.append(r[0])
    for i in range(0, len(volumes), 512):    # a node may have 100k: bounded argv
        zfs.zfs("inherit", "volmode", *volumes[i:i + 512])
    destroyed = [ro for ro in clones if _destroy_unless_open(ro)]
    for np in sessions:
        origin = zfs.get([np], ["origin"]).get(np, {}).get("origin", "-")
        if not _destroy_unless_open(np):
            continue
        destroyed.append(np)
        okind, _ = names.classify(origin, handle.pool)
        if okind == "session":
            zfs.run([zfs.ZFS, "destroy", origin], check=False)
    if keys is None:
        idx.set_devices_tracked()
    if volumes or destroyed:
        smapi.log.info("%s: deactivated %d volumes and %d read-only clones no datapath "
                       "records (left by a crash)", handle.pool, len(volumes), len(destroyed))
    return volumes + destroyed


def _destroy_unless_open(zname):
    """zfs destroy zname: False when it is gone already, or open again since
    the import (left to its user)."""
    try:
        zfs.zfs("destroy", zname)
    except zfs.NotFound:
        return False
    except zfs.Busy:
        smapi.log.info("%s is open, left active", zname)
        return False
    return True


def detach(sr):
    pool = names.check_pool(sr) if names.is_pool(sr) else None
    if pool is None or pool not in zfs.pools():
        return None  # already detached
    with lock.sr_lock(pool):
        props = read_root_props(pool)
        hosts = remote_hosts(props)
        if hosts:
            # a shared SR: other hosts of the pool still use it through this node
            smapi.log.info("%s: SR.detach leaves the pool imported: %d other host(s) "
                           "attached (%s)", pool, len(hosts), ", ".join(hosts))
        elif props is not None and props.get("created-pool"):
            carried.carry_index(SR(pool, props), whole=True)
            carried.unmount(pool)
            zfs.zpool("export", pool)
        _forget_attached(pool)
        if props is not None:
            _forget_listing(props.get("sr-uuid"))
    return None


def remote_hosts(props):
    """The other hosts that attached this SR through its node (remote.py)."""
    hosts = (props or {}).get("remote-hosts") or []
    return sorted(h for h in hosts if isinstance(h, str)) if isinstance(hosts, list) else []


def set_remote_host(pool, host, attached):
    """Record (or drop) host as attached through this node; caller holds the lock."""
    props = read_root_props(pool)
    if props is None:
        raise smapi.SrNotAttached(pool)
    hosts = set(remote_hosts(props))
    want = (hosts | {host}) if attached else (hosts - {host})
    if want != hosts:
        zfs.zfs("set", "%s=%s" % (zfs.uprop("remote-hosts"), zfs.encode(sorted(want))),
                names.sr_root(pool))


def destroy(sr):
    handle = SR.open(sr)
    with lock.sr_lock(handle.pool):
        if handle.props.get("created-pool"):
            zfs.zpool("destroy", handle.pool)
        else:
            zfs.zfs("destroy", "-r", handle.root)
        _forget_attached(handle.pool)
        _forget_listing(handle.uuid)
        path = handle.index().path
        handle.index().close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)
    return None


# -- stat / ls / probe / names ---------------------------------------------------

def health(pool):
    """The SMAPIv3 health variant from the real pool state."""
    try:
        state = zfs.pool_health(pool)
        status = zfs.pool_status(pool)
    except zfs.ZfsError as e:
        return ["Unreachable", e.message]
    return health_from(pool, state, status)


def health_from(pool, state, status):
    """ONLINE -> Healthy; DEGRADED or resilvering -> Healthy with the reason;
    FAULTED, UNAVAIL, SUSPENDED, REMOVED, OFFLINE -> Unavailable.

    A pool that still serves every block is Healthy to xapi: xapi-storage-script
    fails SR.scan with SR_UNHEALTHY for anything else (main.ml, sr_scan2_impl,
    stat_with_retry), so "Recovering" would stop sr-scan (and Xen Orchestra's
    periodic scans) for as long as a mirror is degraded or resilvering.  The
    message says what zpool says; `zfs-ng sr stat` and Plugin.diagnostics show
    the full status."""
    reason = ""
    for line in status.splitlines():
        s = line.strip()
        if s.startswith("status:"):
            reason = s.split(":", 1)[1].strip()
    resilvering = "resilver in progress" in status
    if state == "ONLINE" and not resilvering:
        return ["Healthy", ""]
    if state in ("ONLINE", "DEGRADED"):
        return ["Healthy", "pool %s is %s%s%s" % (
            pool, state, ", resilvering" if resilvering else "",
            ": " + reason if reason else "")]
    return ["Unavailable", "pool %s is %s%s" % (pool, state, ": " + reason if reason else "")]


def space(pool):
    got = zfs.get([pool], ["used", "available"]).get(pool, {})
    used, avail = int(got.get("used", 0)), int(got.get("available", 0))
    return avail, used + avail


def stat(sr):
    handle = SR.open(sr)
    free, total = space(handle.pool)
    return {
        "sr": handle.pool,
        "name": str(handle.props.get("sr-name", "")),
        "uuid": handle.uuid,
        "description": str(handle.props.get("sr-description", "")),
        "free_space": free,
        "total_space": total,
        "datasources": [],
        "clustered": False,
        "health": health(handle.pool),
    }


def set_name(sr, new_name):
    return _set_root(sr, "sr-name", names.check_text(new_name, "name"))


def set_description(sr, new_description):
    return _set_root(sr, "sr-description", names.check_text(new_description, "description"))


def _set_root(sr, prop, value):
    handle = SR.open(sr)
    with lock.sr_lock(handle.pool):
        zfs.zfs("set", "%s=%s" % (zfs.uprop(prop), zfs.encode(value)), handle.root)
    return None


def attached():
    """SR strings of the zfs-ng SRs imported on this host (Plugin.ls)."""
    out = []
    for pool in zfs.pools():
        if names.is_pool(pool) and read_root_props(pool) is not None:
            out.append(pool)
    return out


def probe(configuration):
    """zfs-ng SRs on the given devices (or named by zpool=, or all imported
    ones): imported SRs with their stat, importable ones after a read-only
    import to read their SR uuid."""
    devs = _devices(configuration)
    want_pool = configuration.get("zpool") or configuration.get("pool")
    if want_pool:
        names.check_pool(want_pool)
    real = set(disk_of(d) for d in devs)
    results = []
    imported = zfs.pools()
    for pool in imported:
        if not names.is_pool(pool) or (want_pool and pool != want_pool):
            continue
        props = read_root_props(pool)
        if props is None:
            continue
        if real and not real & set(disk_of(d) for d in zfs.pool_devices(pool)):
            continue
        conf = sr_configuration(pool, props["sr-uuid"])
        results.append({"configuration": conf, "complete": True, "sr": stat(pool),
                         "extra_info": {"imported": "true"}})
    if devs:
        for found in zfs.importable(search_paths(devs)):
            pool = found["pool"]
            if pool in imported or not names.is_pool(pool) or (want_pool and pool != want_pool):
                continue
            props = _peek(found, devs)
            if props is None:
                continue
            conf = sr_configuration(pool, props["sr-uuid"], device=",".join(devs))
            results.append({"configuration": conf, "complete": True,
                            "extra_info": {"imported": "false", "state": found.get("state", ""),
                                           "name": str(props.get("sr-name", "")),
                                           "pool-guid": found.get("id", "")}})
    return results


def _peek(found, devs):
    """Root properties of an exported pool: import read-only, read, export."""
    argv = [zfs.ZPOOL, "import", "-N", "-o", "readonly=on"]
    for d in search_paths(devs):
        argv += ["-d", d]
    try:
        zfs.run(argv + [found.get("id") or found["pool"]])
    except zfs.ZfsError as e:
        smapi.log.info("probe: cannot import %s read-only: %s", found["pool"], e.message)
        return None
    try:
        return read_root_props(found["pool"])
    finally:
        zfs.run([zfs.ZPOOL, "export", found["pool"]], check=False)
