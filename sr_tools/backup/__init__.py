"""Backups of zfs-ng volumes: full and incremental (CBT) sparse raw images
with JSON manifests, resumable after a crash, restore and verify.

    from sr_tools.backup import engine
    engine.backup("full" | "incr", volume, repo, nbd=None, bitmap=None,
                  keep_snapshot=False, state_dir=None, progress=None) -> manifest dict
    engine.restore(backup_dir, target, progress=None, verify=True, force=False) -> summary
    engine.verify(backup_dir, chain=True, progress=None) -> {"ok", "bad", ...}

`volume`: `SR:KEY`, a ZFS volume `POOL/PATH` (anchored by a snapshot, see
zvol.py), a `/path` read as is (full only), or with `nbd` any label naming
the chain.  File formats: manifest.py.  NBD client: nbd_reader.py.
Errors: manifest.BackupError (message meant for the user)."""
