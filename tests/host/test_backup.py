"""Backups on the host: manifest format and chain logic (pure), full backups of
regular files (the Backend serves files too), full + incremental backups
through our NBD server over a unix socket (base:allocation, dirty bitmaps),
resume after an interruption, restore and verify, checked with cmp and
qemu-img compare."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from nbd_server import run as nbd_run
from sr_tools.backup import engine, manifest as mf
from sr_tools.backup.manifest import BackupError

KiB, MiB = 1 << 10, 1 << 20
G = 65536
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cli(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "sr_tools"] + list(args), cwd=ROOT, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    if check and p.returncode != 0:
        pytest.fail("zfs-ng %s: %d\n%s%s" % (" ".join(args), p.returncode, p.stdout, p.stderr))
    return p


def write(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def punch(path, offset, length):
    from blockio.backend import Backend
    with Backend(path) as b:
        b.discard(offset, length)


def sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)


def data_ranges(path):
    """[start, end) ranges SEEK_DATA finds: what is really allocated."""
    src = engine.BlockSource(path)
    try:
        return src.allocated()
    finally:
        src.close()


def same(a, b):
    assert subprocess.run(["cmp", a, b]).returncode == 0
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# -- pure logic ---------------------------------------------------------------------

def test_align_rounds_out_merges_and_clips():
    assert mf.align([(100, 200), (G + 5, G + 6), (3 * G, 3 * G + 1)], G, 3 * G + 512) == \
        [[0, 2 * G], [3 * G, 512]]
    assert mf.align([], G, 10 * G) == []
    assert mf.align([(0, 10 * G)], G, 10 * G) == [[0, 10 * G]]


def test_chunks_of_cuts_extents_and_keeps_a_short_last_chunk():
    assert mf.chunks_of([[0, 2 * G], [5 * G, G + 512]], G) == \
        [(0, G), (G, G), (5 * G, G), (6 * G, 512)]


def test_layers_newest_wins_and_size_follows_the_last():
    full = {"extents": [[0, 4 * G]], "size": 8 * G}
    inc1 = {"extents": [[G, G], [6 * G, G]], "size": 8 * G}
    inc2 = {"extents": [[G, 2 * G]], "size": 8 * G}
    assert mf.layers([full, inc1, inc2], G) == [
        (0, G, 0), (G, 2 * G, 2), (3 * G, G, 0), (6 * G, G, 1)]
    inc3 = {"extents": [], "size": 2 * G}
    assert mf.layers([full, inc3], G) == [(0, 2 * G, 0)]


def _manifest(**kw):
    m = mf.new("x", "full", {"volume": "p/v", "guid": 1, "nbd": None},
               {"snapshot": "p/v@a", "guid": 7}, 4 * G, [[0, G], [2 * G, 2 * G]], G)
    m.update(kw)
    return m


def test_manifest_check_refuses_what_it_did_not_write():
    mf.check(_manifest(), "m")
    for bad in (dict(format="other"), dict(version=2), dict(chunk_size=1000),
                dict(extents=[[G, G], [0, G]]), dict(extents=[[0, 5 * G]]),
                dict(extents=[[100, G]]), dict(kind="incr"),
                dict(state="complete", sha256=["00" * 32]), dict(id="../etc")):
        with pytest.raises(BackupError):
            mf.check(_manifest(**bad), "m")


def test_manifest_round_trip_and_damage(tmp_path):
    m = _manifest()
    mf.save(str(tmp_path), m)
    assert mf.load(str(tmp_path)) == m
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BackupError, match="not JSON"):
        mf.load(str(tmp_path))
    with pytest.raises(BackupError, match="no backup here"):
        mf.load(str(tmp_path / "nothing"))


# -- files --------------------------------------------------------------------------

@pytest.fixture
def disk(tmp_path):
    p = str(tmp_path / "disk.img")
    sparse(p, 16 * MiB + 512)                   # an odd size: a short last chunk
    write(p, 0, b"\x01" * 4096)
    write(p, 3 * MiB - 1000, os.urandom(200 * KiB))   # crosses 64 KiB boundaries
    write(p, 16 * MiB, b"\x07" * 512)           # the short last chunk
    write(p, 8 * MiB, bytes(128 * KiB))        # allocated zeros: no data in the image
    return p


def test_full_backup_of_a_file_keeps_holes_and_restores(disk, tmp_path):
    repo = str(tmp_path / "repo")
    m = engine.backup("full", disk, repo)
    d = os.path.join(repo, m["id"])
    assert m["state"] == "complete" and m["kind"] == "full"
    assert not os.path.exists(os.path.join(d, mf.PROGRESS))
    chunks = mf.chunks_of(m["extents"], G)
    assert len(m["sha256"]) == len(chunks)
    with open(disk, "rb") as f:
        for (off, n), h in zip(chunks, m["sha256"]):
            f.seek(off)
            assert hashlib.sha256(f.read(n)).hexdigest() == h
    # only what the source allocated was read; zeros were not written
    read = sum(n for _o, n in chunks)
    assert m["stats"]["bytes_read"] == read < 2 * MiB
    assert m["stats"]["bytes_written"] == read - 2 * G
    img = os.path.join(d, mf.IMAGE)
    assert os.path.getsize(img) == os.path.getsize(disk)
    assert sum(e - s for s, e in data_ranges(img)) <= m["stats"]["bytes_written"] + 2 * G
    assert engine.verify(d)["ok"]
    out = str(tmp_path / "restored.img")
    s = engine.restore(d, out)
    assert s["bytes_written"] == m["stats"]["bytes_written"]
    same(disk, out)
    with pytest.raises(BackupError, match="exists"):
        engine.restore(d, out)
    engine.restore(d, out, force=True)
    same(disk, out)


def test_verify_finds_a_flipped_byte_and_restore_refuses(disk, tmp_path):
    repo = str(tmp_path / "repo")
    m = engine.backup("full", disk, repo)
    d = os.path.join(repo, m["id"])
    img = os.path.join(d, mf.IMAGE)
    write(img, 3 * MiB, b"\xff")
    r = engine.verify(d)
    assert not r["ok"] and [b["offset"] for b in r["bad"]] == [3 * MiB]
    with pytest.raises(BackupError, match="checksum mismatch"):
        engine.restore(d, str(tmp_path / "r.img"))
    p = cli("backup", "verify", d, check=False)
    assert p.returncode == 1 and "problem" in p.stderr and "Traceback" not in p.stderr


def interrupted_after(reads):
    """A BlockSource whose read after `reads` reads is interrupted (Ctrl-C)."""
    left = [reads]

    class InterruptedSource(engine.BlockSource):
        def read(self, offset, length):
            if not left[0]:
                raise KeyboardInterrupt("interrupted by the test")
            left[0] -= 1
            return super(InterruptedSource, self).read(offset, length)
    return InterruptedSource


def test_interrupted_backup_resumes_without_rereading(disk, tmp_path, monkeypatch):
    src = str(tmp_path / "big.img")
    sparse(src, 24 * MiB)
    for i in range(24):                     # 24 MiB of distinct data, a hole at 10..12
        if i not in (10, 11):
            write(src, i * MiB, bytes([i + 1]) * MiB)
    repo = str(tmp_path / "repo")
    monkeypatch.setattr(engine, "READ_MAX", MiB)
    monkeypatch.setattr(engine, "CHECKPOINT_BYTES", MiB)      # a checkpoint after each read
    with monkeypatch.context() as mp:
        mp.setattr(engine, "BlockSource", interrupted_after(5))
        with pytest.raises(KeyboardInterrupt):
            engine.backup("full", src, repo)
    (d, m), = mf.backups(repo)
    assert m["state"] == "running" and m["done"] == 80
    # what a kill -9 can leave after the checkpoint: data and digests nobody vouches for
    write(os.path.join(d, mf.IMAGE), 20 * MiB, b"junk" * 4096)
    with open(os.path.join(d, mf.PROGRESS), "ab") as f:
        f.write(b"\xee" * 100)
    m2 = engine.backup("full", src, repo)
    assert m2["id"] == m["id"] and m2["state"] == "complete"
    assert m2["stats"]["resumed_at_chunk"] == 80
    assert m2["stats"]["bytes_read"] == 22 * MiB          # 5 MiB before, 17 MiB after
    assert len(mf.backups(repo)) == 1
    assert engine.verify(d)["ok"]
    out = str(tmp_path / "out.img")
    engine.restore(d, out)
    same(src, out)


def test_cli_full_restore_verify_json(disk, tmp_path):
    repo = str(tmp_path / "repo")
    p = cli("backup", "full", disk, repo, "--json")
    s = json.loads(p.stdout)
    assert s["state"] == "complete" and s["bytes_read"] > 0 and s["extents"] >= 3
    assert s["seconds"] is not None
    v = json.loads(cli("backup", "verify", s["dir"], "--json").stdout)
    assert v["ok"] and v["chunks"] == s["chunks"]
    r = json.loads(cli("backup", "restore", s["dir"], str(tmp_path / "o.img"), "--json").stdout)
    assert r["size"] == os.path.getsize(disk)
    same(disk, str(tmp_path / "o.img"))
    ls = json.loads(cli("backup", "ls", repo, "--json").stdout)
    assert [e["id"] for e in ls] == [s["id"]]
    p = cli("backup", "incr", disk, repo, check=False)
    assert p.returncode == 1 and "no changed-block tracking" in p.stderr
    assert "Traceback" not in p.stderr
    p = cli("backup", "restore", str(tmp_path), str(tmp_path / "x"), check=False)
    assert p.returncode == 1 and "no backup here" in p.stderr


# -- NBD: our server, base:allocation and dirty bitmaps -------------------------------

def bitmap_b64(changed, size):
    """A CBT bitmap (64 KiB per bit, MSB first) of [start, end) ranges."""
    from plugins.volume import cbt
    return cbt.bitmap([(s, e - s) for s, e in changed], size)["bitmap"]


@pytest.fixture
def nbd_points(tmp_path):
    """Three points of a 32 MiB disk and a server exporting each with its
    allocation map and the dirty bitmap since the previous point."""
    size = 32 * MiB
    p0, p1, p2 = (str(tmp_path / ("p%d.img" % i)) for i in range(3))
    sparse(p0, size)
    write(p0, 0, os.urandom(MiB))
    write(p0, 20 * MiB, os.urandom(300 * KiB))
    shutil.copyfile(p0, p1)
    write(p1, 5 * MiB + 4096, os.urandom(4096))             # one 64 KiB block
    write(p1, 9 * MiB - 10, os.urandom(200 * KiB))          # crosses blocks
    punch(p1, 20 * MiB, 128 * KiB)                          # a discard
    ch1 = [(5 * MiB + 4096, 5 * MiB + 8192), (9 * MiB - 10, 9 * MiB + 200 * KiB - 10),
           (20 * MiB, 20 * MiB + 128 * KiB)]
    shutil.copyfile(p1, p2)
    write(p2, 31 * MiB, os.urandom(MiB))
    write(p2, 0, os.urandom(512))
    ch2 = [(31 * MiB, 32 * MiB), (0, 512)]
    exports = []
    for i, (path, ch) in enumerate(((p0, None), (p1, ch1), (p2, ch2))):
        alloc = str(tmp_path / ("p%d.alloc.json" % i))
        with open(alloc, "w") as f:
            json.dump({"allocated": [[s, e - s] for s, e in data_ranges(path)]}, f)
        e = {"name": "p%d" % i, "path": path, "readonly": True, "allocation": alloc}
        if ch:
            bm = str(tmp_path / ("p%d.b64" % i))
            with open(bm, "w") as f:
                f.write(bitmap_b64(ch, size))
            e["bitmaps"] = {"prev": bm}
        exports.append(e)
    sock = str(tmp_path / "nbd.sock")
    pid = nbd_run.start(exports, unix_path=sock, log_path=str(tmp_path / "nbd.log"))
    yield {"paths": [p0, p1, p2], "changes": [None, ch1, ch2],
           "uri": lambda i: "nbd+unix:///p%d?socket=%s" % (i, sock), "size": size}
    nbd_run.stop(pid)
    with open(str(tmp_path / "nbd.log")) as f:
        assert "Traceback" not in f.read()


def test_full_and_incrementals_over_nbd(nbd_points, tmp_path):
    repo = str(tmp_path / "repo")
    uri = nbd_points["uri"]
    m0 = engine.backup("full", "disk-a", repo, nbd=uri(0))
    assert m0["stats"]["bytes_read"] == MiB + 320 * KiB     # allocated, 64 KiB rounded
    m1 = engine.backup("incr", "disk-a", repo, nbd=uri(1), bitmap="prev")
    assert m1["parent"]["id"] == m0["id"]
    # dirty blocks only: 1 + 5 + 2 blocks of 64 KiB
    assert m1["extents"] == [[5 * MiB, G], [9 * MiB - G, 5 * G], [20 * MiB, 2 * G]]
    assert m1["stats"]["bytes_read"] == 8 * G
    m2 = engine.backup("incr", "disk-a", repo, nbd=uri(2), bitmap="prev")
    assert m2["parent"]["id"] == m1["id"] and m2["stats"]["bytes_read"] == MiB + G
    for i, m in enumerate((m0, m1, m2)):
        d = os.path.join(repo, m["id"])
        out = str(tmp_path / ("r%d.img" % i))
        engine.restore(d, out)
        same(nbd_points["paths"][i], out)
        assert engine.verify(d)["ok"]
    # the discarded range of p1 stays a hole in the incremental image
    img1 = os.path.join(repo, m1["id"], mf.IMAGE)
    assert not any(s < 20 * MiB + 128 * KiB and e > 20 * MiB for s, e in data_ranges(img1))
    with pytest.raises(BackupError, match="needs --bitmap"):
        engine.backup("incr", "disk-a", repo, nbd=uri(2))
    with pytest.raises(BackupError, match="no dirty bitmap"):
        engine.backup("incr", "disk-a", repo, nbd=uri(0), bitmap="prev")
    with pytest.raises(BackupError, match="no complete backup"):
        engine.backup("incr", "disk-b", repo, nbd=uri(1), bitmap="prev")


def test_chain_is_checked(nbd_points, tmp_path):
    repo = str(tmp_path / "repo")
    uri = nbd_points["uri"]
    m0 = engine.backup("full", "d", repo, nbd=uri(0))
    m1 = engine.backup("incr", "d", repo, nbd=uri(1), bitmap="prev")
    d1 = os.path.join(repo, m1["id"])
    assert [m["id"] for _d, m in mf.chain(d1)] == [m0["id"], m1["id"]]
    v = json.loads(cli("backup", "verify", repo, "--json").stdout)     # the whole repository
    assert v["ok"] and v["backups"] == [m0["id"], m1["id"]]
    os.rename(os.path.join(repo, m0["id"]), os.path.join(repo, "elsewhere"))
    with pytest.raises(BackupError, match="parent backup .* is missing"):
        engine.restore(d1, str(tmp_path / "x.img"))
    assert not os.path.exists(str(tmp_path / "x.img"))
    p = cli("backup", "verify", d1, check=False)
    assert p.returncode == 1 and "missing" in p.stderr
    v = json.loads(cli("backup", "verify", repo, "--json", check=False).stdout)
    assert not v["ok"] and "missing" in v["bad"][0]["error"]


def test_cli_over_nbd_with_qemu_img_compare(nbd_points, tmp_path):
    repo = str(tmp_path / "repo")
    uri = nbd_points["uri"]
    f = json.loads(cli("backup", "full", "disk", repo, "--nbd", uri(0), "--format", "qcow2",
                       "--json").stdout)
    assert f["image"] == "disk.qcow2" and f["image_format"] == "qcow2"
    s = json.loads(cli("backup", "incr", "disk", repo, "--nbd", uri(1), "--bitmap", "prev",
                       "--json").stdout)
    assert s["kind"] == "incr" and s["bytes_read"] == 8 * G
    out = str(tmp_path / "o.img")
    cli("backup", "restore", s["dir"], out)
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", out, uri(1)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# -- qcow2 ------------------------------------------------------------------------------

def test_qcow2_chain_over_nbd_restores_and_verifies(nbd_points, tmp_path):
    repo = str(tmp_path / "repo")
    uri = nbd_points["uri"]
    m0 = engine.backup("full", "q", repo, nbd=uri(0), image_format="qcow2")
    m1 = engine.backup("incr", "q", repo, nbd=uri(1), bitmap="prev", image_format="qcow2")
    for m in (m0, m1):
        d = os.path.join(repo, m["id"])
        assert m["image"] == "disk.qcow2" and "convert_to" not in m
        assert sorted(os.listdir(d)) == ["disk.qcow2", "manifest.json"]
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", os.path.join(d, "disk.qcow2")],
            stdout=subprocess.PIPE, check=True, text=True).stdout)
        assert info["format"] == "qcow2" and info["virtual-size"] == nbd_points["size"]
        assert info["actual-size"] < 4 * MiB            # sparse: holes stay unallocated
    # the incremental's qcow2 holds exactly its layer: the parent's image, patched
    assert engine.verify(os.path.join(repo, m1["id"]))["ok"]
    out = str(tmp_path / "r1.img")
    engine.restore(os.path.join(repo, m1["id"]), out)
    same(nbd_points["paths"][1], out)
    # mixed chain: a raw incremental on a qcow2 parent
    m2 = engine.backup("incr", "q", repo, nbd=uri(2), bitmap="prev")
    out = str(tmp_path / "r2.img")
    engine.restore(os.path.join(repo, m2["id"]), out)
    same(nbd_points["paths"][2], out)
    # a flipped byte in a qcow2 image is found through qemu-nbd
    d0 = os.path.join(repo, m0["id"])
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xff 0 512",
                    os.path.join(d0, "disk.qcow2")], check=True, stdout=subprocess.PIPE)
    r = engine.verify(d0)
    assert not r["ok"] and r["bad"][0].get("offset") == 0, r


def test_qcow2_refused_clearly_without_qemu_img(disk, tmp_path, monkeypatch):
    from sr_tools.backup import qcow2
    monkeypatch.setattr(qcow2.shutil, "which", lambda name: None)
    with pytest.raises(BackupError, match="qemu-img"):
        engine.backup("full", disk, str(tmp_path / "repo"), image_format="qcow2")
    assert not os.path.exists(str(tmp_path / "repo")) or not os.listdir(str(tmp_path / "repo"))
