"""The pool's journal (plugins/volume/journal.py) and what SR.journal makes of
it, and the index's part of a new host's catch-up (Index.replace_under,
with_clones).  What ZFS does with the property, and a new host's catch-up
after a crash or a kill, are tested in the VM
(tests/e2e/test_sr_export_import.py, test_volume_kill9.py)."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from plugins import zfs
from plugins.volume import carried, journal, metadata, names, sr

POOL = "zfsng-test"
ROOT = POOL + "/zfs-ng"
KEY = "0d7c1b9e-4f8e-4b1a-9c3d-2e5f6a7b8c9d"
KEY2 = "1e8d2cae-5a9f-4c2b-8d4e-3f6a7b8c9d0e"
KEY3 = "2f9e3dbf-6b0a-4d3c-9e5f-4a7b8c9d0e1f"
KEY4 = "3a0f4ec0-7c1b-4e4d-8f60-5b8c9d0e1f2a"

_NAMES = st.one_of(st.uuids(version=4).map(str),
                   st.uuids().map(lambda u: names.HIDDEN + u.hex),
                   st.sampled_from([names.REVERTING, names.READONLY, names.SESSION])
                   .flatmap(lambda p: st.uuids(version=4).map(lambda u: p + str(u))))


@settings(max_examples=300, deadline=None)
@given(base=st.integers(min_value=0, max_value=1 << 62), ahead=st.integers(0, 1000),
       got=st.frozensets(_NAMES, max_size=20))
def test_what_build_writes_parse_reads_back(base, ahead, got):
    at = base + ahead
    value = json.loads(zfs.encode(journal.build(base, got, at)))     # as the pool returns it
    assert journal.parse(value, at) == (base, got)
    # a generation moved on by anything but us: the journal is behind, it names nothing
    assert journal.parse(value, at + 1) == (None, frozenset())
    assert journal.parse(json.loads(zfs.encode(journal.build(None, got, at))), at) == \
        (None, frozenset())


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=30),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                         max_size=4),
                     max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(value=_JSON | st.fixed_dictionaries({"base": _JSON, "at": _JSON, "names": _JSON}),
       generation=st.integers(0, 5))
def test_anything_else_in_the_property_is_no_journal(value, generation):
    """A value from the pool that is not a journal we wrote names nothing
    (the next host reads every dataset): never an exception, never a name
    that is not one dataset name component."""
    base, got = journal.parse(value, generation)
    if base is None:
        assert got == frozenset()
    else:
        assert type(base) is int and 0 <= base <= generation
        for n in got:
            assert journal.name_of(ROOT, "%s/%s" % (ROOT, n)) == n


@pytest.mark.parametrize("value", [
    None, "x", [], {"base": 3, "at": 4}, {"names": [], "at": 4}, {"base": 3, "names": []},
    {"base": "3", "at": 4, "names": []}, {"base": True, "at": 4, "names": []},
    {"base": -1, "at": 4, "names": []}, {"base": 3.0, "at": 4, "names": []},
    {"base": 3, "at": 4.0, "names": []}, {"base": 3, "at": 3, "names": []},
    {"base": 5, "at": 4, "names": []}, {"base": 3, "at": True, "names": []},
    {"base": 3, "at": 4, "names": ["a/b"]}, {"base": 3, "at": 4, "names": ["a@b"]},
    {"base": 3, "at": 4, "names": ["a#b"]}, {"base": 3, "at": 4, "names": [""]},
    {"base": 3, "at": 4, "names": [".."]}, {"base": 3, "at": 4, "names": ["-o"]},
    {"base": 3, "at": 4, "names": [7]}, {"base": 3, "at": 4, "names": "abc"},
    {"base": 3, "at": 4, "names": ["x" * 201]},
])
def test_bad_journals(value):
    """Each is no journal for a pool at generation 4."""
    assert journal.parse(value, 4) == (None, frozenset())
    assert journal.parse({"base": 3, "at": 4, "names": ["x"]}, 4) == (3, frozenset(["x"]))


def test_names_of_zfs_names():
    assert journal.name_of(ROOT, "%s/%s" % (ROOT, KEY)) == KEY
    assert journal.name_of(ROOT, "%s/%s@%s" % (ROOT, KEY, KEY2)) == KEY
    assert journal.name_of(ROOT, "%s/h-ab#%s" % (ROOT, KEY2)) == "h-ab"
    assert journal.name_of(ROOT, "%s/r-%s" % (ROOT, KEY)) == "r-" + KEY
    for other in (ROOT, POOL + "/" + KEY, "other/zfs-ng/" + KEY, "%s/a/b" % ROOT,
                  "%s/index" % ROOT + "/x", ROOT + "x/" + KEY):
        assert journal.name_of(ROOT, other) is None, other
    assert journal.datasets(ROOT, {KEY2, KEY}) == ["%s/%s" % (ROOT, KEY), "%s/%s" % (ROOT, KEY2)]


def test_the_journal_fits_a_zfs_user_property():
    """ZFS refuses user property values of 8192 bytes and more
    (ZAP_MAXVALUELEN, zfs_check_userprops): what fits() lets through is
    shorter, as the text zfs.encode writes."""
    got = set()
    while journal.fits(1 << 40, got | {names.hidden_name()}, 1 << 41):
        got.add(names.hidden_name())
    text = zfs.encode(journal.build(1 << 40, got, 1 << 41))
    assert len(text) <= journal.LIMIT < 8192
    assert len(got) >= 100              # a copy carried every hundred and more changes


# -- SR.journal: what it writes, when it carries a copy ----------------------------------

class Pool(object):
    """Records what SR.journal asks of ZFS and of carry_index (whose own
    writing, a file in the pool, is the VM's to test)."""

    def __init__(self, monkeypatch, carry_ok=True):
        self.sets, self.carried = [], []
        monkeypatch.setattr(zfs, "set_props", lambda name, props: self.sets.append((name, props)))

        def carry(handle):
            if not carry_ok or handle.index().generation() != handle.generation:
                return False
            self.carried.append(handle.generation)
            handle.props["journal"] = journal.build(handle.generation, (), handle.generation)
            return True
        monkeypatch.setattr(carried, "carry_index", carry)


def _handle(tmp_path, generation, value=None, index_at=None):
    h = sr.SR(POOL, {"sr-uuid": KEY4, "generation": generation})
    if value is not None:
        h.props["journal"] = value
    h._index = metadata.Index(str(tmp_path / "i.sqlite"))
    h._index.replace_all([], generation if index_at is None else index_at)
    return h


def test_a_mutation_names_its_datasets_with_its_generation_in_one_set(tmp_path, monkeypatch):
    pool = Pool(monkeypatch)
    h = _handle(tmp_path, 7, journal.build(5, {KEY}, 7))
    h.journal(["%s/%s@%s" % (ROOT, KEY2, KEY3), "%s/h-1" % ROOT], bump=True)
    assert pool.sets == [(ROOT, {
        zfs.uprop("journal"): zfs.encode(journal.build(5, {KEY, KEY2, "h-1"}, 8)),
        zfs.uprop("generation"): "8"})]
    assert h.generation == 8 and pool.carried == []
    del pool.sets[:]
    h.journal(["%s/%s" % (ROOT, KEY)])          # named already: nothing to write
    assert pool.sets == []
    h.journal(["%s/%s" % (ROOT, KEY3)])         # no bump (a device activated)
    h.journal(["%s/%s" % (ROOT, KEY)], bump=True)
    assert pool.sets == [
        (ROOT, {zfs.uprop("journal"): zfs.encode(journal.build(5, {KEY, KEY2, KEY3, "h-1"}, 8))}),
        (ROOT, {zfs.uprop("journal"): zfs.encode(journal.build(5, {KEY, KEY2, KEY3, "h-1"}, 9)),
                zfs.uprop("generation"): "9"})]


def test_a_generation_moved_by_anything_else_leaves_no_journal(tmp_path, monkeypatch):
    """The pool at 9 with a journal written at 7 (the generation set by hand,
    or by a zfs-ng without a journal): what changed in between is not named,
    so a copy is carried before the journal is used again."""
    pool = Pool(monkeypatch)
    h = _handle(tmp_path, 9, journal.build(5, {KEY}, 7))
    h.journal(["%s/%s" % (ROOT, KEY2)], bump=True)
    assert pool.carried == [9]
    assert pool.sets[-1][1][zfs.uprop("journal")] == zfs.encode(journal.build(9, {KEY2}, 10))


def test_no_base_or_a_full_journal_carries_a_copy_first(tmp_path, monkeypatch):
    pool = Pool(monkeypatch)
    h = _handle(tmp_path, 7)                    # a new SR: no journal yet
    h.journal(["%s/%s" % (ROOT, KEY)], bump=True)
    assert pool.carried == [7]
    assert pool.sets[-1][1][zfs.uprop("journal")] == zfs.encode(journal.build(7, {KEY}, 8))

    full = set()
    while journal.fits(7, full | {names.hidden_name()}, 12):
        full.add(names.hidden_name())
    h = _handle(tmp_path, 12, journal.build(7, full, 12))
    h.journal(["%s/%s" % (ROOT, KEY2)], bump=True)
    assert pool.carried == [7, 12]
    assert pool.sets[-1][1] == {zfs.uprop("journal"): zfs.encode(journal.build(12, {KEY2}, 13)),
                                zfs.uprop("generation"): "13"}


def test_without_a_copy_the_journal_names_nothing(tmp_path, monkeypatch):
    """A copy that cannot be carried (it failed, or the index is behind the
    pool: inside a mutation, after its bump) leaves no base: a new host then
    reads every dataset, and the next mutation tries again."""
    pool = Pool(monkeypatch, carry_ok=False)
    h = _handle(tmp_path, 7, {"base": 3, "at": 7, "names": ["../x"]})    # not ours: none
    h.journal(["%s/%s" % (ROOT, KEY)], bump=True)
    assert pool.sets == [(ROOT, {zfs.uprop("journal"): zfs.encode(journal.build(None, (), 8)),
                                 zfs.uprop("generation"): "8"})]
    pool = Pool(monkeypatch)
    h = _handle(tmp_path, 9, None, index_at=8)
    h.journal(["%s/%s" % (ROOT, KEY)])
    assert pool.carried == [] and h.props["journal"] == journal.build(None, (), 9)


# -- the index's part of a catch-up ---------------------------------------------------

def _row(key, zname, kind="volume", origin="", name=""):
    return {"key": key, "zname": zname, "kind": kind, "name": name, "description": "",
            "keys": {}, "sharable": False, "virtual_size": 1 << 20, "physical_utilisation": 0,
            "volblocksize": 16384, "origin": origin, "createtxg": 1, "cbt_enabled": False}


def test_rows_under_the_journals_datasets_are_replaced_and_no_other(tmp_path):
    idx = metadata.Index(str(tmp_path / "i.sqlite"))
    a = "%s/%s" % (ROOT, KEY)
    near = "%s/%s" % (ROOT, KEY[:-1] + "e")        # shares all but the last character
    rows = [_row(KEY, a), _row(KEY2, "%s@%s" % (a, KEY2), "snapshot"),
            _row(KEY3, "%s#%s" % (a, KEY3), "bookmark"),
            _row(KEY[:-1] + "e", near, name="kept"),
            _row(KEY4, "%s/%s" % (ROOT, KEY4), origin="%s@%s" % (a, KEY2))]
    idx.replace_all(rows, 4)
    assert idx.with_clones([a]) == sorted([a, "%s/%s" % (ROOT, KEY4)])
    assert idx.with_clones([near, "%s/h-x" % ROOT]) == sorted([near, "%s/h-x" % ROOT])
    # the volume was destroyed with its snapshot kept (renamed to h-1), its clone re-read
    moved = [_row(KEY2, "%s/h-1@%s" % (ROOT, KEY2), "snapshot"),
             _row(KEY4, "%s/%s" % (ROOT, KEY4), origin="%s/h-1@%s" % (ROOT, KEY2))]
    idx.replace_under([a, "%s/h-1" % ROOT, "%s/%s" % (ROOT, KEY4)],
                      [idx._values(e) for e in moved], 9)
    assert idx.generation() == 9
    got = dict((e["key"], (e["zname"], e["origin"], e["name"])) for e in idx.all())
    assert got == {KEY2: ("%s/h-1@%s" % (ROOT, KEY2), "", ""),
                   KEY[:-1] + "e": (near, "", "kept"),
                   KEY4: ("%s/%s" % (ROOT, KEY4), "%s/h-1@%s" % (ROOT, KEY2), "")}


# -- carried.py: the deltas' names and chain, a delta's adoption -------------------------

def test_delta_names():
    assert carried.parse_delta_name(carried.delta_name(5, 9)) == (5, 9)
    for bad in ("delta-9-5.json.gz", "delta-5-5.json.gz", "delta-5-9.json", "delta--1-9.json.gz",
                "delta-5-9.json.gz.tmp", "index.json.gz", "delta-5-9-1.json.gz",
                "delta-%d-%d.json.gz" % (10 ** 19, 10 ** 19 + 1), "delta-a-9.json.gz"):
        assert carried.parse_delta_name(bad) is None, bad


@pytest.mark.parametrize("start,links,stop,path", [
    (5, [], 5, []),
    (5, [(5, 8), (8, 12)], 12, [(5, 8), (8, 12)]),
    (5, [(5, 8), (8, 12), (5, 12)], 12, [(5, 12)]),          # the furthest from each
    (5, [(5, 7), (5, 9), (9, 12)], 12, [(5, 9), (9, 12)]),    # a kill's leftover skipped
    (5, [(5, 8), (8, 12)], 10, None),                          # the journal is not at a link
    (5, [(5, 8)], 4, None),
    (5, [(4, 8), (8, 12)], 12, None),                          # no link from the whole copy
    (5, [(5, 8), (8, 14), (8, 12)], 12, [(5, 8), (8, 12)]),    # not past the journal's base
])
def test_the_chain_from_the_whole_copy_to_the_journals_base(start, links, stop, path):
    assert carried.chain(start, links, stop) == path


@settings(max_examples=300, deadline=None)
@given(links=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30)), max_size=20),
       start=st.integers(0, 30), stop=st.integers(0, 30))
def test_a_chain_is_contiguous_or_none(links, start, stop):
    links = [(b, g) for b, g in links if b < g]
    path = carried.chain(start, links, stop)
    if path is not None:
        at = start
        for b, g in path:
            assert b == at and (b, g) in links and g <= stop
            at = g
        assert at == stop


def _index_with(tmp_path, rows, generation):
    idx = metadata.Index(str(tmp_path / "d.sqlite"))
    idx.replace_all(rows, generation)
    return idx


def test_a_delta_replaces_the_rows_under_its_datasets(tmp_path):
    a, c = "%s/%s" % (ROOT, KEY), "%s/%s" % (ROOT, KEY3)
    idx = _index_with(tmp_path, [_row(KEY, a), _row(KEY2, "%s@%s" % (a, KEY2), "snapshot"),
                                 _row(KEY3, c, name="untouched")], 4)
    src = metadata.Index(str(tmp_path / "src.sqlite"))      # the host that wrote it, at 9
    src.replace_all([_row(KEY, a, name="renamed"), _row(KEY4, "%s/%s" % (ROOT, KEY4)),
                     _row(KEY3, c, name="untouched")], 9)
    targets = [a, "%s/%s" % (ROOT, KEY4)]
    delta = json.loads(json.dumps({
        "format": metadata.Index.CARRIED_FORMAT, "sr-uuid": KEY4, "base": 4, "generation": 9,
        "datasets": targets, "volumes": src.export_rows(targets), "sweep": ["why"]}))
    for bad in (dict(delta, base=3), dict(delta, generation=8), dict(delta, **{"sr-uuid": KEY}),
                dict(delta, format=2), dict(delta, datasets=[a]),       # a row outside them
                dict(delta, datasets=targets + ["%s/x/y" % ROOT]),
                dict(delta, datasets=targets + [POOL + "/other"]),
                dict(delta, volumes=[["x"] * len(metadata.COLUMNS)]), dict(delta, sweep=None)):
        assert not idx.adopt_delta(bad, POOL, KEY4, 4, 9), bad
        assert idx.generation() == 4 and len(idx.all()) == 3
    assert not idx.adopt_delta(delta, POOL, KEY4, 5, 9)     # the index is not at its base
    assert idx.adopt_delta(delta, POOL, KEY4, 4, 9)
    assert idx.generation() == 9 and idx.sweeps_wanted() == ["why"]
    got = dict((e["key"], (e["zname"], e["name"])) for e in idx.all())
    assert got == {KEY: (a, "renamed"), KEY4: ("%s/%s" % (ROOT, KEY4), ""),
                   KEY3: (c, "untouched")}


@pytest.mark.parametrize("data", [b"", b"\x1f\x8b\x08\x00garbage", b"not gzip at all",
                                  __import__("gzip").compress(b"{not json")[:-3],
                                  __import__("gzip").compress(b"{not json"),
                                  __import__("gzip").compress(b"\xff\xfe")])
def test_a_torn_or_foreign_carried_file_is_a_value_error(tmp_path, data):
    (tmp_path / "delta-1-2.json.gz").write_bytes(data)
    with pytest.raises(ValueError):
        carried._read(str(tmp_path), "delta-1-2.json.gz")


@pytest.mark.parametrize("base,index_at,pool_at,caught_up", [
    (5, 7, 9, True),        # a mutation stopped after its bump: the journal leads from 5
    (7, 7, 9, True),
    (8, 7, 9, False),       # the journal starts after the index: a copy from elsewhere
    (5, 9, 9, False),       # nothing to catch up
    (5, 10, 9, False),      # an index ahead of the pool: not this pool's history
    (None, 7, 9, False),    # no journal
])
def test_an_index_behind_the_pool_catches_up_from_the_journal_where_it_leads_from_it(
        tmp_path, monkeypatch, base, index_at, pool_at, caught_up):
    """SR.catch_up_local: only the journal's datasets are read again
    (carried.catch_up, which the VM tests run against ZFS) where the journal
    leads from a generation the index is at or past; else None (the caller
    takes the carried copy or reads every dataset)."""
    calls = []
    monkeypatch.setattr(carried, "catch_up", lambda h, how, ds: calls.append((how, ds)) or
                        (ds, []))
    value = journal.build(base, {KEY}, pool_at) if base is not None else None
    h = _handle(tmp_path, pool_at, value, index_at=index_at)
    got = h.catch_up_local()
    assert (got is not None) == caught_up and len(calls) == (1 if caught_up else 0)
    if caught_up:
        assert calls == [("index at %d" % index_at, ["%s/%s" % (ROOT, KEY)])]
