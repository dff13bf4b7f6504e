"""Pure logic of the CBT wiring of the volume plugin: data-destroyed snapshot
(bookmark) names and records, where their metadata is stored, the index
column and its migration, the method table.  ZFS behaviour: tests/e2e/test_volume_cbt.py."""

import os
import sqlite3

import pytest

from plugins import smapi, zfs
from plugins.volume import bookmarks, cbt, metadata, methods, plugin, vdi

from conftest import old_index_schema

KEY = "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d"
KEY2 = "1e8d2cae-5a9f-4c2b-8d4e-3f6a7b8c9d0e"
POOL = "zfsng-test"
ROOT = POOL + "/zfs-ng"


def test_split_bookmark():
    assert bookmarks.split("%s/%s#%s" % (ROOT, KEY, KEY2), POOL) == \
        ("%s/%s" % (ROOT, KEY), KEY2)
    assert bookmarks.split("%s/h-ab#%s" % (ROOT, KEY2), POOL) == \
        ("%s/h-ab" % ROOT, KEY2)
    for bad in ("%s/%s#%s" % (ROOT, KEY, cbt.ANCHOR),       # cbt.py's own anchor
                "%s/%s@%s" % (ROOT, KEY, KEY2),             # a snapshot
                "%s/ro-%s#%s" % (ROOT, KEY, KEY2),          # not a volume dataset
                "%s/a/%s#%s" % (ROOT, KEY, KEY2),
                "other/zfs-ng/%s#%s" % (KEY, KEY2),
                "%s/%s#%s" % (ROOT, KEY, KEY2.upper())):
        assert bookmarks.split(bad, POOL) is None, bad


def test_bookmark_entry_and_field_props():
    bm = "%s/%s#%s" % (ROOT, KEY, KEY2)
    props = {bookmarks.prop(KEY2, "name"): zfs.encode("n\u00e9 \"x\"\t"),
             bookmarks.prop(KEY2, "keys"): zfs.encode({"vdi-type": "cbt_metadata"}),
             bookmarks.prop(KEY2, "sharable"): "true",
             bookmarks.prop(KEY2, "volsize"): "67108864",
             bookmarks.prop(KEY, "name"): zfs.encode("another one")}
    e = bookmarks.entry(POOL, bm, "77", props)
    assert e["key"] == KEY2 and e["kind"] == "bookmark" and e["zname"] == bm
    assert e["name"] == "n\u00e9 \"x\"\t" and e["description"] == ""
    assert e["keys"] == {"vdi-type": "cbt_metadata"} and e["sharable"] is True
    assert e["virtual_size"] == 64 << 20 and e["physical_utilisation"] == 0
    assert e["createtxg"] == 77 and e["cbt_enabled"] is True
    r = vdi.record(FakeHandle(), e)
    assert r["read_write"] is False and r["cbt_enabled"] is True
    assert r["virtual_size"] == 64 << 20 and r["physical_utilisation"] == 0
    # metadata of a bookmark lives on its parent dataset, per key
    assert bookmarks.field_prop(e, "keys") == ("org.zfs-ng:bm.%s.keys" % KEY2,
                                                 "%s/%s" % (ROOT, KEY))
    snap = dict(e, kind="snapshot", zname="%s/%s@%s" % (ROOT, KEY, KEY2))
    assert bookmarks.field_prop(snap, "keys") == ("org.zfs-ng:keys", snap["zname"])
    # property names are valid ZFS user property names (lower case, < 256)
    for f in bookmarks.FIELDS:
        p = bookmarks.prop(KEY2, f)
        assert len(p) < 256 and p == p.lower() and ":" in p
    # garbage values do not break listing
    odd = bookmarks.entry(POOL, bm, "1", {
        bookmarks.prop(KEY2, "keys"): "[1]", bookmarks.prop(KEY2, "volsize"): "x"})
    assert odd["keys"] == {} and odd["virtual_size"] == 0


def test_no_data_refusals():
    e = {"key": KEY2, "kind": "bookmark"}
    for what in ("attached", "snapshotted", "cloned"):
        with pytest.raises(smapi.BackendError) as ei:
            bookmarks.check_has_data(e, what)
        assert ei.value.name == "Volume_data_destroyed" and what in ei.value.message
    bookmarks.check_has_data({"key": KEY, "kind": "snapshot"}, "attached")


class FakeHandle(object):
    pool = POOL
    uuid = "5f0e2a4b-1c3d-4e5f-8a9b-0c1d2e3f4a5b"
    props = {}


def test_entry_cbt_flag_from_props():
    base = {"volsize": "1048576", "referenced": "0", "origin": "-", "createtxg": "5",
            "volblocksize": "16384"}
    on = metadata.entry_from_props(POOL, "%s/%s" % (ROOT, KEY),
                                   dict(base, **{cbt.PROP_ENABLED: "on"}))
    off = metadata.entry_from_props(POOL, "%s/%s@%s" % (ROOT, KEY, KEY2),
                                    dict(base, **{cbt.PROP_ENABLED: "off"}))
    assert on["cbt_enabled"] is True and off["cbt_enabled"] is False
    assert metadata.entry_from_props(POOL, "%s/%s" % (ROOT, KEY), base)["cbt_enabled"] is False
    assert cbt.PROP_ENABLED in metadata.ZFS_PROPS


def test_index_keeps_bookmarks_and_moves_them_with_their_dataset(tmp_path):
    idx = metadata.Index(str(tmp_path / "x.sqlite"))
    vol = metadata.entry_from_props(POOL, "%s/%s" % (ROOT, KEY), {
        "volsize": "1048576", cbt.PROP_ENABLED: "on"})
    vol.pop("cbt_enabled")  # entries built by hand (volume.create) may lack it
    bm = bookmarks.entry(POOL, "%s/%s#%s" % (ROOT, KEY, KEY2), "9", {})
    idx.replace_all([vol, bm], 3)
    assert idx.get(KEY)["cbt_enabled"] is False
    assert idx.get(KEY2)["cbt_enabled"] is True and idx.get(KEY2)["kind"] == "bookmark"
    # a data_destroy replaces the snapshot row of the same key
    snap = dict(bm, kind="snapshot", zname="%s/%s@%s" % (ROOT, KEY, KEY2))
    idx.commit(4, upsert=[snap])
    idx.commit(5, upsert=[bm])
    assert idx.count() == 2 and idx.get(KEY2)["zname"] == bm["zname"]
    # the volume retired hidden: its data-destroyed snapshots move along
    idx.commit(6, delete=[KEY], rename=[("%s/%s" % (ROOT, KEY), ROOT + "/h-1")])
    assert idx.get(KEY2)["zname"] == "%s/h-1#%s" % (ROOT, KEY2)
    idx.close()


def test_index_from_before_cbt_is_migrated_and_rebuilt(tmp_path):
    path = str(tmp_path / "old.sqlite")
    db = sqlite3.connect(path)
    db.executescript(old_index_schema("cbt_enabled", "rendered"))
    db.execute("INSERT INTO meta (k, v) VALUES ('generation', '12')")
    db.execute("INSERT INTO volumes VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
               (KEY, ROOT + "/" + KEY, "volume", "n", "", "{}", 0, 1, 0, 16384, "", 1))
    db.commit()
    db.close()
    idx = metadata.Index(path)
    assert idx.generation() is None            # stale: reconcile rebuilds it from ZFS
    assert idx.get(KEY)["cbt_enabled"] is False
    idx.close()


def test_query_and_method_table():
    assert "VDI_CONFIG_CBT" in plugin.query()["features"]
    by_name = {m.full_name: m for m in methods.VOLUME}
    for m in ("enable_cbt", "disable_cbt", "data_destroy"):
        assert [p.name for p in by_name["Volume." + m].params] == ["sr", "key"]
    lcb = by_name["Volume.list_changed_blocks"]
    assert [(p.name, p.type) for p in lcb.params] == [
        ("sr", str), ("key", str), ("key2", str), ("offset", int), ("length", int)]
    d = os.path.join(os.path.dirname(plugin.__file__), "org.xen.xapi.storage.zfs-ng")
    for m in ("enable_cbt", "disable_cbt", "data_destroy", "list_changed_blocks"):
        assert os.path.realpath(os.path.join(d, "Volume." + m)) == \
            os.path.realpath(os.path.join(d, "entry.py"))


def test_bad_parameters_are_clear_errors():
    lcb = [m for m in methods.VOLUME if m.name == "list_changed_blocks"][0]
    status, out = smapi.call(lcb, {"sr": POOL, "key": "nope", "key2": KEY, "offset": 0,
                                   "length": -1, "dbg": "t"})
    out = "".join(out)
    assert status == 1 and '"Invalid_parameters"' in out and "Traceback" not in out
    status, out = smapi.call(lcb, {"sr": POOL, "key": KEY, "key2": KEY2, "offset": -1,
                                   "length": -1, "dbg": "t"})
    assert status == 1 and "offset must not be negative" in "".join(out)
