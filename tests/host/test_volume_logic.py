"""Pure logic of the volume plugin: names, vdev specs, metadata parsing, the
sqlite index, URIs, method tables.  ZFS behaviour is tested in the VM."""

import json
import os
import sqlite3
import uuid as uuid_mod

import pytest
from hypothesis import given, settings, strategies as st

from plugins import smapi, zfs
from plugins.volume import metadata, methods, names, plugin, vdi, volume

from conftest import old_index_schema

KEY = "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d"
KEY2 = "1e8d2cae-5a9f-4c2b-8d4e-3f6a7b8c9d0e"
POOL = "zfsng-test"
ROOT = POOL + "/zfs-ng"
UUID = "5f0e2a4b-1c3d-4e5f-8a9b-0c1d2e3f4a5b"
UUID2 = "6f0e2a4b-1c3d-4e5f-8a9b-0c1d2e3f4a5b"


def test_keys():
    assert names.is_key(names.new_key())
    for _ in range(200):    # what uuid.uuid4() would have made
        k = names.new_key()
        u = uuid_mod.UUID(k)
        assert str(u) == k and u.version == 4 and u.variant == uuid_mod.RFC_4122
        h = names.hidden_name()[len(names.HIDDEN):]
        assert uuid_mod.UUID(hex=h).version == 4 and len(h) == 32
    assert len(set(names.new_key() for _ in range(1000))) == 1000
    for bad in ("", "x", KEY.upper(), KEY + " ", "../" + KEY, KEY + "@s", "h-" + KEY, None, 3):
        assert not names.is_key(bad)
        with pytest.raises(smapi.InvalidParameters):
            names.check_key(bad)


@pytest.mark.parametrize("pool,ok", [
    ("zfsng-" + KEY, True), ("tank", True), ("a.b:c_d-e", True),
    ("", False), ("1tank", False), ("mirror", False), ("raidz2x", False), ("log", False),
    ("a/b", False), ("a b", False), ("a'b", False), ("a" * 300, False), ("t\u00e9", False),
])
def test_pool_names(pool, ok):
    assert names.is_pool(pool) is ok


def test_classify():
    assert names.classify("%s/%s" % (ROOT, KEY), POOL) == ("volume", KEY)
    assert names.classify("%s/%s@%s" % (ROOT, KEY, KEY2), POOL) == ("snapshot", KEY2)
    assert names.classify("%s/h-abc@%s" % (ROOT, KEY2), POOL) == ("snapshot", KEY2)
    assert names.classify("%s/h-abc" % ROOT, POOL) == ("hidden", None)
    assert names.classify("%s/%s@h-1" % (ROOT, KEY), POOL) == ("hidden", None)
    assert names.classify("%s/%s@np-1" % (ROOT, KEY), POOL) == ("session", None)
    assert names.classify("%s/np-%s" % (ROOT, KEY), POOL) == ("session", KEY)   # its clone
    assert names.classify("%s/%s@zfsng-cbt-anchor" % (ROOT, KEY), POOL) == ("cbt", None)
    assert names.classify("%s/r-%s" % (ROOT, KEY), POOL) == ("reverting", KEY)
    assert names.classify("%s/ro-%s" % (ROOT, KEY), POOL) == ("readonly", KEY)
    assert names.classify("%s/%s" % (POOL, KEY), POOL) == (None, None)
    assert names.classify("other/zfs-ng/%s" % KEY, POOL) == (None, None)
    assert names.classify("%s/a/%s" % (ROOT, KEY), POOL) == (None, None)


def test_every_name_builder_is_read_back_by_classify():
    vol = names.volume_dataset(POOL, KEY)
    assert names.classify(vol, POOL) == ("volume", KEY)
    assert names.classify(names.reverting_dataset(POOL, KEY), POOL) == ("reverting", KEY)
    assert names.classify(names.readonly_dataset(POOL, KEY), POOL) == ("readonly", KEY)
    assert names.classify(names.session_dataset(POOL, KEY), POOL) == ("session", KEY)
    snap = names.session_snapshot(vol, "0a1b2c")
    assert names.classify(snap, POOL) == ("session", None) and names.is_session_snapshot(snap)
    assert not names.is_session_snapshot("%s@%s" % (vol, KEY2))
    assert names.classify("%s/%s" % (ROOT, names.hidden_name()), POOL) == ("hidden", None)


D = ["/dev/sda", "/dev/sdb", "/dev/sdc", "/dev/sdd"]


@pytest.mark.parametrize("spec,devs,argv", [
    ("", D[:1], D[:1]),
    ("stripe", D[:2], D[:2]),
    ("mirror", D[:2], ["mirror"] + D[:2]),
    ("raidz1", D[:3], ["raidz1"] + D[:3]),
    ("raidz2", D[:3], ["raidz2"] + D[:3]),
    ("mirror:2", D, ["mirror", D[0], D[1], "mirror", D[2], D[3]]),
    ("mirror 0 2 mirror 1 3", D, ["mirror", D[0], D[2], "mirror", D[1], D[3]]),
    ("raidz1:3", D[:3], ["raidz1"] + D[:3]),
])
def test_vdev_specs(spec, devs, argv):
    assert names.parse_vdev_spec(spec, devs) == argv


@pytest.mark.parametrize("spec,devs", [
    ("mirror", D[:1]), ("raidz2", D[:2]), ("raidz3", D[:3]), ("mirror:2", D[:3]),
    ("mirror:1", D[:2]), ("bogus", D[:2]), ("mirror 0 1 mirror 1 2", D[:3]),
    ("mirror 0 1", D[:3]), ("0 1", D[:2]), ("mirror 0", D[:1]), ("mirror 0 9", D[:2]),
    ("", []), ("", ["/dev/sda", "/dev/sda"]), ("", ["sda"]), ("", ["/dev/a b"]),
    ("", ["/dev/../etc/passwd"]), ("", ["-f"]),
])
def test_bad_vdev_specs(spec, devs):
    with pytest.raises(smapi.InvalidParameters):
        names.parse_vdev_spec(spec, devs)


def test_option_checks():
    for ok in ("lz4", "zstd", "zstd-19", "off"):
        assert names.check_compression(ok) == ok
    for bad in ("gzip", "zstd-20", "lz4 ", ""):
        with pytest.raises(smapi.InvalidParameters):
            names.check_compression(bad)
    assert names.check_ashift("12") == "12"
    for bad in ("8", "17", "x", "-1"):
        with pytest.raises(smapi.InvalidParameters):
            names.check_ashift(bad)
    assert names.check_nvme_node("10.0.0.1:4420") == "10.0.0.1:4420"
    assert names.check_nvme_node("[fe80::1]:4420")
    for bad in ("host", "host:0", "host:70000", "a b:1", "h:1/x"):
        with pytest.raises(smapi.InvalidParameters):
            names.check_nvme_node(bad)
    with pytest.raises(smapi.InvalidParameters):
        names.check_text("x\x00", "name")
    with pytest.raises(smapi.InvalidParameters):
        names.check_text("x" * (names.MAX_TEXT + 1), "name")


def test_property_encoding_survives_zfs_get_H():
    for v in ("a\tb\nc", "\u00e9\u2603", 'q"uote', {"k\t": "v\n"}, True):
        text = zfs.encode(v)
        assert "\t" not in text and "\n" not in text and text.isascii()
        assert zfs.decode(text) == v
    assert zfs.decode("set by hand") == "set by hand"


def _props(**kw):
    base = {"volsize": "1048576", "referenced": "4096", "origin": "-", "createtxg": "7",
            "volblocksize": "16384"}
    base.update(kw)
    return base


def test_entry_from_props():
    p = _props(**{"org.zfs-ng:name": zfs.encode("n\u00e9"), "org.zfs-ng:keys":
                  zfs.encode({"a": "b"}), "org.zfs-ng:sharable": "true"})
    e = metadata.entry_from_props(POOL, "%s/%s" % (ROOT, KEY), p)
    assert e["key"] == KEY and e["kind"] == "volume" and e["name"] == "n\u00e9"
    assert e["keys"] == {"a": "b"} and e["sharable"] is True and e["virtual_size"] == 1 << 20
    assert e["origin"] == "" and e["description"] == ""
    s = metadata.entry_from_props(POOL, "%s/h-x@%s" % (ROOT, KEY2),
                                  _props(origin="%s/%s@h-y" % (ROOT, KEY)))
    assert s["kind"] == "snapshot" and s["key"] == KEY2
    assert metadata.entry_from_props(POOL, "%s/h-x" % ROOT, _props()) is None
    bad = metadata.entry_from_props(POOL, "%s/%s" % (ROOT, KEY),
                                    _props(**{"org.zfs-ng:keys": "[1]"}))
    assert bad["keys"] == {}


def _entry(key, zname, kind="volume", **kw):
    e = metadata.entry_from_props(POOL, zname, _props())
    assert e["key"] == key and e["kind"] == kind
    e.update(kw)
    return e


def test_index(tmp_path):
    idx = metadata.Index(str(tmp_path / "sub" / "x.sqlite"))
    assert idx.generation() is None and idx.all() == []
    a = _entry(KEY, "%s/%s" % (ROOT, KEY), keys={"k": "v"}, name="a")
    b = _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2), "snapshot", createtxg=9)
    idx.replace_all([a, b], 4)
    assert idx.generation() == 4
    assert idx.get(KEY)["keys"] == {"k": "v"} and idx.get(KEY)["name"] == "a"
    assert [e["key"] for e in idx.all()] == [KEY, KEY2]
    assert {e["key"] for e in idx.by_dataset(a["zname"])} == {KEY, KEY2}
    # a clone of b, and a dataset whose name only starts like a's
    KEY3, KEY4 = "2f9e3dbf-6b0a-4d3c-9e5f-4a7b8c9d0e1f", "3a0f4ec0-7c1b-4e4d-8f6a-5b8c9d0e1f2a"
    c = _entry(KEY3, "%s/%s" % (ROOT, KEY3), origin=b["zname"])
    d = _entry(KEY4, "%s/%s" % (ROOT, KEY4), origin=a["zname"] + "A@x")
    idx.commit(4, upsert=[c, d])
    assert [e["key"] for e in idx.clones_of(a["zname"])] == [KEY3]
    assert {e["key"] for e in idx.by_dataset(a["zname"])} == {KEY, KEY2}
    # renaming a volume dataset moves its snapshots and its clones' origins
    idx.commit(5, delete=[KEY], rename=[(a["zname"], ROOT + "/h-1")])
    assert idx.get(KEY) is None
    assert idx.get(KEY2)["zname"] == "%s/h-1@%s" % (ROOT, KEY2)
    assert idx.get(KEY3)["origin"] == "%s/h-1@%s" % (ROOT, KEY2)
    assert idx.get(KEY4)["origin"] == a["zname"] + "A@x"
    idx.commit(5, delete=[KEY3, KEY4])
    assert idx.generation() == 5
    # a failed commit changes nothing, not even the generation
    with pytest.raises(Exception):
        idx.commit(6, upsert=[{"key": "broken"}])
    assert idx.generation() == 5 and idx.count() == 1
    # a new key for a dataset name (a revert's r-KEY renamed to KEY) replaces the old row
    idx.commit(6, upsert=[dict(_entry(KEY2, "%s/h-1@%s" % (ROOT, KEY2), "snapshot"), key=KEY3)])
    assert idx.get(KEY2) is None and idx.get(KEY3)["zname"] == "%s/h-1@%s" % (ROOT, KEY2)
    # LIKE wildcards in dataset names are literal
    c = _entry(KEY, "%s/%s" % (ROOT, KEY))
    idx.commit(7, upsert=[c])
    assert {e["key"] for e in idx.by_dataset(ROOT + "/%")} == set()
    idx.invalidate()
    assert idx.generation() is None
    idx.close()
    again = metadata.Index(str(tmp_path / "sub" / "x.sqlite"))
    assert again.count() == 2


def test_index_usage_of_touched_volumes(tmp_path):
    """Index.touch/touched/set_usage (volume.ls reads only touched volumes):
    marks survive a reconcile (replace_all) and another process, and clear
    only for the keys given as done."""
    path = str(tmp_path / "x.sqlite")
    idx = metadata.Index(path)
    idx.replace_all([_entry(KEY, "%s/%s" % (ROOT, KEY)), _entry(KEY2, "%s/%s" % (ROOT, KEY2))], 1)
    assert idx.touched() == []
    idx.touch(KEY)
    idx.touch(KEY)
    idx.replace_all([_entry(KEY, "%s/%s" % (ROOT, KEY)), _entry(KEY2, "%s/%s" % (ROOT, KEY2))], 2)
    assert metadata.Index(path).touched() == [KEY]
    idx.set_usage({KEY: 5 << 20}, done=[])
    assert idx.get(KEY)["physical_utilisation"] == 5 << 20 and idx.touched() == [KEY]
    idx.set_usage({KEY: 7 << 20}, done=[KEY])
    assert idx.get(KEY)["physical_utilisation"] == 7 << 20 and idx.touched() == []
    assert idx.generation() == 2                  # usage is not a mutation


def test_index_keeps_each_records_text_until_its_row_changes(tmp_path):
    """Index.rendered (volume.ls's stored JSON): a warm call renders nothing;
    any change to a row (upsert, usage, rename, even one made by hand in SQL)
    drops that row's text, and a new render key drops every text."""
    path = str(tmp_path / "x.sqlite")
    idx = metadata.Index(path)
    KEY3 = "2f9e3dbf-6b0a-4d3c-9e5f-4a7b8c9d0e1f"
    a, b = _entry(KEY, "%s/%s" % (ROOT, KEY)), _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2),
                                                      "snapshot", createtxg=9)
    c = _entry(KEY3, "%s/%s" % (ROOT, KEY3), origin=b["zname"], createtxg=12)
    idx.replace_all([a, b, c], 1)
    made = []

    def render(e):
        made.append(e["key"])
        return json.dumps([e["key"], e["name"], e["physical_utilisation"], e["zname"],
                           e["origin"]])

    def texts(key="k1"):
        del made[:]
        return json.loads("[%s]" % idx.rendered(key, render))

    first = texts()
    assert [t[0] for t in first] == [KEY, KEY2, KEY3] and sorted(made) == sorted([KEY, KEY2, KEY3])
    assert texts() == first and made == []          # warm: stored text only
    idx.set_usage({KEY2: 99}, done=[])
    assert texts()[1][2] == 99 and made == [KEY2]
    idx.commit(2, upsert=[dict(a, name="renamed")])
    assert texts()[0][1] == "renamed" and made == [KEY]
    idx.commit(3, rename=[(a["zname"], ROOT + "/h-1")])
    got = texts()
    assert got[1][3] == "%s/h-1@%s" % (ROOT, KEY2) and got[2][4] == got[1][3]
    assert sorted(made) == sorted([KEY2, KEY3])
    idx.db.execute("UPDATE volumes SET name='by hand' WHERE key=?", (KEY3,))
    assert texts()[2][1] == "by hand" and made == [KEY3]
    assert texts("k2") == texts("k2") and made == []   # a new key renders all, once
    assert metadata.Index(path).rendered("k2", render) == idx.rendered("k2", render)
    # a row that changes between the renders and the read is rendered, not kept
    real = idx._render_some

    def render_then_change(r, after):
        last = real(r, after)
        idx.db.execute("UPDATE volumes SET name='late' WHERE key=?", (KEY,))
        return last
    idx._render_some = render_then_change
    assert texts("k2")[0][1] == "late" and made == [KEY]
    idx._render_some = real
    assert texts("k2")[0][1] == "late" and made == [KEY]


def test_texts_made_with_the_rows_are_the_ones_sr_ls_would_make(tmp_path):
    """replace_all/adopt_doc with a renderer (sr.reconcile, carried.adopt_carried:
    a new host, a rebuild) keep each row's text as they write the rows: the
    first SR.ls after them renders nothing and lists, to the byte, what it
    lists when it renders the rows itself.  Texts come from the rows as _row
    reads them back (sharable 1 -> true), never from the carried file; a
    new render key (the SR's settings changed since) makes them again."""
    KEY3 = "2f9e3dbf-6b0a-4d3c-9e5f-4a7b8c9d0e1f"
    a = _entry(KEY, "%s/%s" % (ROOT, KEY), sharable=1, keys={"b": "2", "a": "1"})
    b = _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2), "snapshot", createtxg=9)
    c = _entry(KEY3, "%s/%s" % (ROOT, KEY3), origin=b["zname"], createtxg=12,
               name='n\u00e9 "q"', cbt_enabled=1)
    render_key, render = vdi.renderer(FakeHandle())
    made = []

    def counted(e):
        made.append(e["key"])
        return render(e)

    lazy = metadata.Index(str(tmp_path / "lazy.sqlite"))
    lazy.replace_all([a, b, c], 1)
    want = lazy.listing(render_key, counted, str(tmp_path / "lazy.ls")).value()
    assert sorted(made) == sorted([KEY, KEY2, KEY3])
    assert want[0]["sharable"] is True and want[2]["cbt_enabled"] is True
    assert want == [json.loads(vdi._render_slow(FakeHandle())(lazy.get(k)))
                    for k in (KEY, KEY2, KEY3)]

    eager = metadata.Index(str(tmp_path / "eager.sqlite"))
    eager.replace_all([a, b, c], 1, (render_key, render))
    del made[:]
    listed = eager.listing(render_key, counted, str(tmp_path / "eager.ls"))
    assert listed.value() == want and made == []
    assert listed.text() == lazy.listing(render_key, counted, str(tmp_path / "lazy.ls")).text()

    doc = json.loads(json.dumps(lazy.export_doc(FakeHandle.uuid)))
    doc["volumes"][0][metadata.COLUMNS.index("name")] = "carried"
    moved = metadata.Index(str(tmp_path / "moved.sqlite"))
    assert moved.adopt_doc(doc, POOL, FakeHandle.uuid, 1, (render_key, render))
    del made[:]
    got = moved.listing(render_key, counted, str(tmp_path / "moved.ls")).value()
    assert made == [] and got[0]["name"] == "carried" and got[1:] == want[1:]
    # the SR's settings changed after the adopt: every text made again
    nvme = FakeHandle(datapath="nvme", **{"nvme-node": "10.0.0.1:4420"})
    key2, render2 = vdi.renderer(nvme)
    made2 = []
    got = moved.listing(key2, lambda e: made2.append(e) or render2(e),
                        str(tmp_path / "moved.ls")).value()
    assert len(made2) == 3 and got[0]["uri"][0].startswith("nvme+tcp://")


def test_sr_ls_listing_is_kept_until_the_rows_change(tmp_path):
    """Index.listing (volume.ls): the whole JSON list is kept in a file and
    given out as it is (a FileText part) while it names this index, the rows'
    version and the render key; any change to a row (whoever makes it), a new
    render key, a new index file or a foreign file makes it again."""
    path, kept = str(tmp_path / "x.sqlite"), str(tmp_path / "x.ls")
    idx = metadata.Index(path)
    a, b = _entry(KEY, "%s/%s" % (ROOT, KEY)), _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2),
                                                      "snapshot", createtxg=9)
    idx.replace_all([a, b], 1)

    def render(e):
        return json.dumps([e["key"], e["name"], e["physical_utilisation"]])

    def ls(key="k1", index=None):
        enc = (index or idx).listing(key, render, kept)
        from_file = not isinstance(enc.parts[0], str)
        return enc.value(), from_file

    first, from_file = ls()
    assert [t[0] for t in first] == [KEY, KEY2] and not from_file
    assert ls() == (first, True)                    # warm: the file as it is
    idx.set_usage({KEY2: 99}, done=[])
    assert ls() == ([first[0], [KEY2, first[1][1], 99]], False)
    assert ls()[1]
    idx.set_usage({KEY2: 99}, done=[])              # the same usage: no new version
    assert ls()[1]
    for change in (lambda: idx.commit(2, upsert=[dict(a, name="renamed")]),
                   lambda: idx.db.execute("UPDATE volumes SET name='by hand' WHERE key=?", (KEY,)),
                   lambda: idx.commit(3, delete=[KEY2]),
                   lambda: idx.commit(4, upsert=[b])):
        change()
        got, from_file = ls()
        assert not from_file and got == [[t[0], t[1], t[2]] for t in json.loads(
            "[%s]" % idx.rendered("k1", render))]
        assert ls() == (got, True)
    assert ls("k2")[1] is False and ls("k2")[1] is True     # a new render key
    # ... whose texts are made again, not the stored ones (the SR's URIs changed)
    real_render = render

    def render(e):
        return json.dumps(json.loads(real_render(e)) + ["k3"])
    assert [t[-1] for t in ls("k3")[0]] == ["k3"] * len(first)
    assert ls("k3")[1] is True
    render = real_render
    # a new index (the file deleted, the same rows written again): not taken
    os.unlink(path)
    idx2 = metadata.Index(path)
    idx2.replace_all([dict(a, name="other")], 4)
    assert ls("k2", idx2) == ([[KEY, "other", a["physical_utilisation"]]], False)
    with open(kept, "wb") as f:                    # torn or foreign: made again
        f.write(b'["x"')
    assert ls("k2", idx2)[1] is False and ls("k2", idx2)[1] is True
    # what a killed writer left goes; a live one's stays
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for pid in (dead.pid, os.getppid()):
        with open("%s.%d.tmp" % (kept, pid), "wb") as f:
            f.write(b"partial")
    idx2.commit(5, upsert=[a])
    assert ls("k2", idx2)[1] is False
    assert sorted(os.listdir(str(tmp_path))) == sorted(
        ["x.ls", "x.ls.%d.tmp" % os.getppid()] + [n for n in os.listdir(str(tmp_path))
                                                 if n.startswith("x.sqlite")])


def test_replace_all_moves_the_version_once_and_keeps_the_triggers(tmp_path):
    """Index.replace_all drops the per-row INSERT/DELETE version triggers for
    its own transaction (half its time at 100k rows) and moves the rows'
    version itself: a kept listing is made again after it, and writes after
    it (SQL by hand included) still move the version; a failed replace_all
    leaves rows, version and triggers as they were."""
    KEY3 = "2f9e3dbf-6b0a-4d3c-9e5f-4a7b8c9d0e1f"
    path, kept = str(tmp_path / "x.sqlite"), str(tmp_path / "x.ls")
    idx = metadata.Index(path)
    a, b = _entry(KEY, "%s/%s" % (ROOT, KEY)), _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2),
                                                      "snapshot", createtxg=9)

    def version():
        return int(idx.db.execute("SELECT v FROM meta WHERE k='rows-version'").fetchone()[0])

    def triggers():
        return sorted(r[0] for r in idx.db.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger'"))

    def ls():
        enc = idx.listing("k1", lambda e: json.dumps(e["key"]), kept)
        return enc.value(), not isinstance(enc.parts[0], str)

    made = triggers()
    assert made == ["volumes_unrender", "volumes_version_delete", "volumes_version_insert",
                    "volumes_version_update"]
    v0 = version()
    idx.replace_all([a, b], 1)
    assert version() == v0 + 1 and triggers() == made
    assert ls() == ([KEY, KEY2], False) and ls() == ([KEY, KEY2], True)
    idx.replace_all([a, b], 2)                       # the same rows again: still a change
    assert version() == v0 + 2 and ls()[1] is False
    idx.db.execute("DELETE FROM volumes WHERE key=?", (KEY2,))      # by hand, after it
    assert version() == v0 + 3 and ls() == ([KEY], False)
    idx.db.execute("INSERT INTO volumes (key, zname, kind, name, description, keys, sharable, "
                   "virtual_size, physical_utilisation, volblocksize, origin, createtxg, "
                   "cbt_enabled) SELECT ?, ?, kind, name, description, keys, sharable, "
                   "virtual_size, physical_utilisation, volblocksize, origin, 99, cbt_enabled "
                   "FROM volumes WHERE key=?", (KEY3, "%s/%s" % (ROOT, KEY3), KEY))
    assert version() == v0 + 4 and ls() == ([KEY, KEY3], False)
    # a replace_all that fails half-way (a row without its columns) changes nothing
    with pytest.raises(KeyError):
        idx.replace_all([a, {"key": KEY2}], 3)
    assert version() == v0 + 4 and triggers() == made and idx.generation() == 2
    assert ls() == ([KEY, KEY3], True)


def test_a_kept_listing_goes_to_stdout_as_it_is(tmp_path):
    """smapi.main writes a FileText part by sendfile to a real fd (a pipe, as
    xapi-storage-script reads a plugin) and as text to a stream without one."""
    import io
    import subprocess
    import sys
    body = ('{"name": "\u00e9 %d"},' * 3000 % tuple(range(3000))).rstrip(",")
    f = tmp_path / "l"
    f.write_bytes(b"head line\n[" + body.encode() + b"]")

    def method():
        fh = open(str(f), "rb")
        fh.readline()
        return smapi.Encoded([smapi.FileText(fh, fh.tell())])
    m = smapi.Method("SR", "ls", method, [])
    out = io.StringIO()
    assert smapi.main([m], ["SR.ls", "--json"], io.StringIO("{}\n"), out) == 0
    assert json.loads(out.getvalue()) == json.loads("[%s]" % body)
    code = ("import io, sys, json; sys.path.insert(0, %r); from plugins import smapi; "
            "fh = open(%r, 'rb'); fh.readline(); "
            "m = smapi.Method('SR', 'ls', lambda: smapi.Encoded(['', smapi.FileText(fh, fh.tell())]), []); "
            "sys.exit(smapi.main([m], ['SR.ls', '--json'], io.StringIO('{}\\n')))"
            % (os.getcwd(), str(f)))
    p = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, check=True)
    assert p.stdout == b"[" + body.encode() + b"]\n"


def test_an_index_from_before_stored_records_is_read_as_it_is(tmp_path):
    """An index written by the previous version (no `rendered` column, no
    trigger) is opened in place: rows kept, records rendered on demand."""
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript(old_index_schema("rendered"))
    db.execute("INSERT INTO volumes (%s) VALUES (%s)" % (
        ",".join(metadata.COLUMNS), ",".join("?" * len(metadata.COLUMNS))),
        [KEY, "%s/%s" % (ROOT, KEY), "volume", "n", "", "{}", 0, 1, 2, 3, "", 4, 0])
    db.commit()
    db.close()
    idx = metadata.Index(path)
    assert idx.rendered("k", lambda e: json.dumps(e["name"])) == '"n"'
    idx.set_usage({KEY: 5}, done=[])
    assert idx.rendered("k", lambda e: json.dumps(e["physical_utilisation"])) == "5"


def test_sr_ls_writes_its_stored_records_as_they_are():
    """smapi.main writes an Encoded result's text unchanged (SR.ls)."""
    import io
    m = smapi.Method("SR", "ls", lambda sr: smapi.encoded_list('{"a": 1},[2]'),
                     [smapi.Param("sr", str)])
    out = io.StringIO()
    status = smapi.main([m], ["SR.ls", "--json"], io.StringIO('{"sr": "x", "dbg": "t"}\n'), out)
    assert status == 0 and out.getvalue() == '[{"a": 1},[2]]\n'
    assert json.loads(out.getvalue()) == [{"a": 1}, [2]]
    assert smapi.encoded_list("").value() == []


def test_carried_index_is_taken_only_at_its_generation_and_when_sound(tmp_path):
    """Index.export_doc/adopt_doc, the copy SR.detach leaves in the pool: the
    next host takes it only for the same SR at the pool's generation, and only
    if every entry is what its ZFS name says (the file comes from a pool)."""
    src = metadata.Index(str(tmp_path / "a.sqlite"))
    a = _entry(KEY, "%s/%s" % (ROOT, KEY), keys={"k": "v"}, name="a")
    b = _entry(KEY2, "%s/%s@%s" % (ROOT, KEY, KEY2), "snapshot", createtxg=9)
    src.replace_all([a, b], 7)
    src.touch(KEY)
    src.want_sweep("a kill")
    doc = json.loads(json.dumps(src.export_doc(UUID)))      # as written to the pool

    def fresh():
        return metadata.Index(str(tmp_path / ("%s.sqlite" % uuid_mod.uuid4())))

    dst = fresh()
    assert not dst.adopt_doc(doc, POOL, UUID, 8)             # the pool moved on
    assert not dst.adopt_doc(doc, POOL, UUID2, 7)            # another SR
    assert dst.generation() is None and dst.count() == 0
    assert dst.adopt_doc(doc, POOL, UUID, 7)
    assert dst.generation() == 7 and dst.all() == src.all()
    assert dst.touched() == [KEY] and dst.sweeps_wanted() == ["a kill"]
    assert not dst.devices_tracked()           # the source never did a full reset
    src.set_devices_tracked()
    tracked = fresh()
    assert tracked.adopt_doc(json.loads(json.dumps(src.export_doc(UUID))), POOL, UUID, 7)
    assert tracked.devices_tracked()
    assert dst.adopt_doc(doc, POOL, UUID, 7) and not dst.devices_tracked()
    bad = json.loads(json.dumps(doc))
    bad["volumes"][0][0] = KEY2                               # key is not the name's
    assert not fresh().adopt_doc(bad, POOL, UUID, 7)
    bad = json.loads(json.dumps(doc))
    bad["volumes"][0][1] = "other/zfs-ng/" + KEY              # not under this SR
    assert not fresh().adopt_doc(bad, POOL, UUID, 7)
    bad = json.loads(json.dumps(doc))
    bad["volumes"][0][metadata.COLUMNS.index("virtual_size")] = "16M"   # not our type
    assert not fresh().adopt_doc(bad, POOL, UUID, 7)
    for broken in ({}, {"format": 1}, dict(doc, volumes=[[1]]), dict(doc, volumes=None),
                   dict(doc, format=2)):
        assert not fresh().adopt_doc(broken, POOL, UUID, 7)
    for col, value in (("zname", "%s/@%s" % (ROOT, KEY2)),             # no dataset
                       ("zname", "%s/%s#%s" % (ROOT, KEY, KEY2)),         # a bookmark's name
                       ("kind", "volume"), ("kind", "bookmark"), ("kind", "hidden"),
                       ("key", KEY2.upper()), ("keys", {"k": 1}), ("sharable", None),
                       ("createtxg", 1.5), ("origin", None)):
        bad = json.loads(json.dumps(doc))
        bad["volumes"][1][metadata.COLUMNS.index(col)] = value    # the snapshot row
        assert not fresh().adopt_doc(bad, POOL, UUID, 7), (col, value)
    bad = json.loads(json.dumps(doc))
    bad["volumes"][1][metadata.COLUMNS.index("kind")] = "bookmark"
    bad["volumes"][1][metadata.COLUMNS.index("zname")] = "%s/%s#%s" % (ROOT, KEY, KEY2)
    assert fresh().adopt_doc(bad, POOL, UUID, 7)                 # a data-destroyed snapshot
    assert fresh().adopt_doc(dict(doc, volumes=[]), POOL, UUID, 7)


_PIECES = st.sampled_from([KEY, KEY2, "h-" + "0" * 32, "", "a/b", KEY.upper(), "x@y", "r-" + KEY])


@settings(max_examples=500, deadline=None)
@given(kind=st.sampled_from(["volume", "snapshot", "bookmark"]), key=st.sampled_from([KEY, KEY2]),
       root=st.sampled_from([ROOT, "other/zfs-ng", POOL]), ds=_PIECES,
       sep=st.sampled_from(["", "@", "#"]), tail=_PIECES)
def test_carried_rows_are_sound_as_the_name_parsers_say(kind, key, root, ds, sep, tail):
    """metadata._sound_rows (a column at a time, for speed) against the one
    parser of each name: names.classify for volumes and snapshots, and a
    bookmark is its snapshot's name with '#' for '@' (bookmarks.py)."""
    zname = "%s/%s%s%s" % (root, ds, sep, tail)
    row = [_entry(KEY, "%s/%s" % (ROOT, KEY))[c] for c in metadata.COLUMNS]
    row[metadata.COLUMNS.index("key")], row[metadata.COLUMNS.index("zname")] = key, zname
    row[metadata.COLUMNS.index("kind")] = kind
    parsed = names.classify(zname.replace("#", "@", 1) if kind == "bookmark" else zname, POOL)
    other = {"snapshot": "#", "bookmark": "@"}.get(kind)
    want = parsed == ("volume" if kind == "volume" else "snapshot", key) and \
        (other is None or other not in zname) and not zname.startswith(ROOT + "/@") and \
        not zname.startswith(ROOT + "/#")
    assert metadata._sound_rows([row], POOL) == want


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                          max_size=4),
                    max_leaves=20))
def test_carried_index_fuzz(doc):
    """Whatever JSON the pool holds, adopt_doc takes it or says no: no crash."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        idx = metadata.Index(os.path.join(d, "x.sqlite"))
        if isinstance(doc, dict):
            idx.adopt_doc(doc, POOL, UUID, 7)
        idx.close()


class FakeHandle(object):
    pool = POOL
    uuid = "5f0e2a4b-1c3d-4e5f-8a9b-0c1d2e3f4a5b"

    def __init__(self, **props):
        self.props = props


_NODES = st.sampled_from([{}, {"nvme-node": "10.0.0.1:4420"}, {"nbd-node": "[fd00::1]:10809"},
                          {"nvme-node": "h:4420", "nbd-node": "h:10809"}])


@settings(max_examples=300, deadline=None)
@given(nodes=_NODES, datapath=st.sampled_from([None, "raw", "nbd", "nvme", "nbdtls", "bogus"]),
       key=st.uuids(version=4).map(str) | st.text(max_size=40),
       kind=st.sampled_from(["volume", "snapshot", "bookmark"]),
       name=st.text() | st.none(), description=st.text(),
       sharable=st.booleans() | st.integers(0, 2), cbt=st.booleans() | st.none(),
       size=st.integers(0, 1 << 64) | st.booleans(), used=st.integers(0, 1 << 64),
       keys=st.dictionaries(st.text(max_size=8), st.text(max_size=8) | st.integers(), max_size=3))
def test_sr_ls_template_writes_what_record_writes(nodes, datapath, key, kind, name, description,
                                                   sharable, cbt, size, used, keys):
    """vdi.record_text fills a template taken from record(): for any entry,
    the text is json.dumps(record(...), sort_keys=True) to the byte, or the
    same error (a key that is no uuid fails uri.py's check either way)."""
    props = dict(nodes)
    if datapath:
        props["datapath"] = datapath
    h = FakeHandle(**props)
    fast, slow = vdi.record_text(h), vdi._render_slow(h)
    assert fast is not slow                 # the template path, not the fallback
    e = {"key": key, "kind": kind, "name": name, "description": description,
         "sharable": sharable, "virtual_size": size, "physical_utilisation": used,
         "keys": keys, "cbt_enabled": cbt}
    try:
        want = slow(e)
    except Exception as err:
        with pytest.raises(type(err)):
            fast(e)
        return
    assert fast(e) == want


def test_sr_ls_template_falls_back_where_record_changes(monkeypatch):
    """A field record() writes that the template does not know, or one it
    computes otherwise: record_text renders by record() itself."""
    h = FakeHandle()
    real = vdi.record
    monkeypatch.setattr(vdi, "record", lambda h, e: dict(real(h, e), extra=e["name"]))
    assert vdi.record_text(h).__name__ == "render"
    monkeypatch.setattr(vdi, "record", lambda h, e: dict(real(h, e), name=e["name"].upper()))
    assert vdi.record_text(h).__name__ == "render"
    e = dict(vdi.RENDER_PROBE, name="low")
    assert json.loads(vdi.record_text(h)(e))["name"] == "LOW"


def test_uris():
    h = FakeHandle()
    assert vdi.uris(h, KEY) == ["zfsng-raw://%s/%s" % (POOL, KEY),
                                   "zfsng-nbd://%s/%s" % (POOL, KEY)]
    h = FakeHandle(datapath="nvme", **{"nvme-node": "10.0.0.1:4420"})
    u = vdi.uris(h, KEY)
    assert u[0] == "nvme+tcp://10.0.0.1:4420/nqn.2014-08.org.zfs-ng:%s:%s" % (h.uuid, KEY)
    assert u[1:] == ["zfsng-raw://%s/%s" % (POOL, KEY), "zfsng-nbd://%s/%s" % (POOL, KEY)]
    assert vdi.uris(FakeHandle(datapath="nbd"), KEY)[0].startswith("zfsng-nbd://")


def test_round_up():
    assert volume.round_up(0, 16384) == 16384
    assert volume.round_up(1, 16384) == 16384
    assert volume.round_up(16384, 16384) == 16384
    assert volume.round_up(16385, 16384) == 32768


def test_query_and_tables():
    q = plugin.query()
    assert q["plugin"] == "zfs-ng" and q["required_api_version"] == "5.0"
    assert "VDI_REVERT" in q["features"] and "VDI_CONFIG_CBT" in q["features"]
    assert all(isinstance(v, str) for v in q["configuration"].values())
    json.dumps(q)
    import os
    d = os.path.join(os.path.dirname(plugin.__file__), "org.xen.xapi.storage.zfs-ng")
    scripts = {f for f in os.listdir(d) if not f.endswith(".py")}
    declared = {m.full_name for m in methods.PLUGIN + methods.SR + methods.VOLUME}
    assert scripts == declared
    for f in scripts:
        target = os.path.realpath(os.path.join(d, f))
        assert os.access(target, os.X_OK)
        assert os.path.basename(target) == "entry.py"  # one executable per plugin


def test_health_mapping():
    from plugins.volume.sr import health_from
    assert health_from("p", "ONLINE", "  pool: p\n state: ONLINE\n") == ["Healthy", ""]
    deg = health_from("p", "DEGRADED", " state: DEGRADED\nstatus: One or more devices has "
                      "been taken offline by the administrator.\n")
    assert deg[0] == "Healthy" and "DEGRADED" in deg[1] and "taken offline" in deg[1]
    res = health_from("p", "ONLINE", "  scan: resilver in progress since Tue\n")
    assert res[0] == "Healthy" and "resilvering" in res[1]
    for state in ("FAULTED", "UNAVAIL", "SUSPENDED", "REMOVED", "OFFLINE"):
        h = health_from("p", state, "status: One or more devices could not be opened.\n")
        assert h[0] == "Unavailable" and state in h[1] and "could not be opened" in h[1]


def test_cli_sizes():
    from sr_tools.vol_cmds import parse_size
    assert parse_size("4096") == 4096
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5GiB") == 3 << 29
    import click
    for bad in ("", "-1", "10X", "1e3"):
        with pytest.raises(click.BadParameter):
            parse_size(bad)


# xapi's capability names (xen-api ocaml/xapi/smint.ml, string_to_capability_table):
# a name outside it is dropped with a warning, so declaring one is a mistake.
XAPI_CAPABILITIES = {
    "SR_CREATE", "SR_DELETE", "SR_ATTACH", "SR_DETACH", "SR_SCAN", "SR_PROBE", "SR_UPDATE",
    "SR_SUPPORTS_LOCAL_CACHING", "SR_METADATA", "SR_TRIM", "SR_MULTIPATH", "SR_CACHING",
    "SR_STATS", "VDI_CREATE", "VDI_DELETE", "VDI_ATTACH", "VDI_DETACH", "VDI_MIRROR",
    "VDI_MIRROR_IN", "VDI_RESIZE", "VDI_RESIZE_ONLINE", "VDI_CLONE", "VDI_SNAPSHOT",
    "VDI_ACTIVATE", "VDI_ACTIVATE_READONLY", "VDI_DEACTIVATE", "VDI_UPDATE", "VDI_INTRODUCE",
    "VDI_GENERATE_CONFIG", "VDI_ATTACH_OFFLINE", "VDI_RESET_ON_BOOT", "VDI_CONFIG_CBT",
    "VDI_COMPOSE", "LARGE_VDI", "THIN_PROVISIONING", "VDI_READ_CACHING", "VDI_REVERT"}

# What each declared feature needs us to implement (the methods xapi then calls:
# xapi-storage-script main.ml, and storage_mux.ml activate3 for ACTIVATE_READONLY).
NEEDS = {
    "SR_PROBE": ["SR.probe"], "SR_UPDATE": ["SR.stat"], "VDI_CREATE": ["Volume.create"],
    "VDI_DELETE": ["Volume.destroy"], "VDI_SNAPSHOT": ["Volume.snapshot", "Volume.set"],
    "VDI_CLONE": ["Volume.clone", "Volume.set", "Volume.unset"],
    "VDI_RESIZE": ["Volume.resize"], "VDI_UPDATE": ["Volume.stat"],
    "VDI_ACTIVATE_READONLY": [], "VDI_REVERT": ["Volume.revert"],
    "VDI_CONFIG_CBT": ["Volume.enable_cbt", "Volume.disable_cbt", "Volume.data_destroy",
                       "Volume.list_changed_blocks"],
    "THIN_PROVISIONING": [], "LARGE_VDI": [],
}


def test_declared_features_are_known_to_xapi_and_implemented():
    from plugins.volume import methods as volume_methods
    feats = plugin.query()["features"]
    assert len(feats) == len(set(feats))
    assert set(feats) <= XAPI_CAPABILITIES, set(feats) - XAPI_CAPABILITIES
    have = set(m.full_name for m in volume_methods.PLUGIN + volume_methods.SR + volume_methods.VOLUME)
    for f in feats:
        assert f in NEEDS, "feature %s: say what it makes xapi call" % f
        missing = [m for m in NEEDS[f] if m not in have]
        assert not missing, (f, missing)
    # read-only plugs (snapshots, xapi-nbd, vdi-export) need activate_readonly
    assert "VDI_ACTIVATE_READONLY" in feats


def test_datapath_features_match_what_each_scheme_implements():
    """NONPERSISTENT makes xapi call Datapath.open/close at every VM start/stop
    (main.ml vdi_epoch_begin_impl/vdi_epoch_end_impl): declared by the local
    schemes, which implement non-persistent sessions; not by nvme+tcp, where a
    non-persistent open is Unimplemented (xapi then resets on boot itself)."""
    from plugins.datapath import nbd, nvme, raw
    assert raw.RawDatapath.features == ("NONPERSISTENT",)
    assert nbd.NbdDatapath.features == ("NONPERSISTENT",)
    assert nvme.NvmeDatapath.features == ()
    for mod, want in ((raw, ["NONPERSISTENT"]), (nbd, ["NONPERSISTENT"]), (nvme, [])):
        table = {m.full_name: m for m in mod.methods()}
        assert table["Plugin.Query"].fn()["features"] == want
        assert {"Datapath.open", "Datapath.close"} <= set(table)


def _zpool_failing(monkeypatch, messages):
    """SR.create's zpool runner fed these errors in turn (then success); the
    settle between tries is counted.  The race itself is a VM matter: see
    sr._create_pool's docstring for where it was seen."""
    from plugins.volume import sr
    calls = {"zpool": 0, "settle": 0}

    def zpool(*argv):
        calls["zpool"] += 1
        if messages:
            raise zfs.ZfsError(messages.pop(0), ["zpool"] + list(argv))
        return ""
    monkeypatch.setattr(zfs, "zpool", zpool)
    monkeypatch.setattr(sr, "_settle", lambda: calls.__setitem__("settle", calls["settle"] + 1))
    return sr, calls


def test_zpool_create_is_tried_again_while_a_new_partition_is_missing(monkeypatch):
    busy = "cannot create 'p': one or more devices is currently unavailable"
    sr, calls = _zpool_failing(monkeypatch, [busy, busy])
    sr._create_pool(["create", "p", "raidz1", "/dev/a", "/dev/b", "/dev/c"])
    assert calls == {"zpool": 3, "settle": 3}

    sr, calls = _zpool_failing(monkeypatch, [busy] * sr.CREATE_TRIES)
    with pytest.raises(zfs.ZfsError, match="currently unavailable"):
        sr._create_pool(["create", "p", "/dev/a"])
    assert calls["zpool"] == sr.CREATE_TRIES


def test_zpool_create_other_errors_are_final(monkeypatch):
    sr, calls = _zpool_failing(monkeypatch, ["cannot create 'p': pool already exists"])
    with pytest.raises(zfs.ZfsError, match="already exists"):
        sr._create_pool(["create", "p", "/dev/a"])
    assert calls["zpool"] == 1
