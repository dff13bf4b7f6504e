"""Backups of zfs-ng volumes: full and incremental (CBT) sparse raw or qcow2
images with JSON manifests, resumable after a crash, restore and verify.

    from sr_tools.backup import engine
    engine.backup("full" | "incr", volume, repo, nbd=None, bitmap=None,
                  keep_snapshot=False, state_dir=None, progress=None,
                  image_format="raw" | "qcow2") -> manifest dict
    engine.restore(backup_dir, target, progress=None, verify=True, force=False) -> summary
    engine.verify(backup_dir, chain=True, progress=None) -> {"ok", "bad", ...}
    engine.verify_repo(repo, progress=None) -> {"ok", "bad", "backups", "running", ...}

`volume`: `SR:KEY`, a ZFS volume `POOL/PATH` (anchored by a snapshot, see
zvol.py), a `/path` read as is (full only), or with `nbd` any label naming
the chain.  `progress`: an engine.Progress (begin/advance/end).  File
formats: manifest.py.  NBD client: nbd_server/client.py.  qcow2: qcow2.py.
Errors: manifest.BackupError (message meant for the user)."""
