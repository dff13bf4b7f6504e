"""The pool's journal: which datasets may differ from the index copy the pool
carries, so a host that takes the pool after a crash re-reads those alone.

On the SR root, user property org.zfs-ng:journal (JSON text, as every root
property) is {"base": G, "at": H, "names": [NAME, ...]}:

- the copy of the index the pool carries (carried.carry_index: POOL/zfs-ng/index)
  is of generation G, and
- every dataset whose rows (a volume, its snapshots and data-destroyed
  snapshots, a clone's origin) or devices may have changed since is named, as
  its name under the SR root (KEY, h-..., r-KEY, ro-KEY, np-KEY),
- as of generation H: written with every generation bump we make, so a
  generation moved on by anything else (by hand, an older zfs-ng) leaves the
  journal behind, and then it names nothing.

A name is added before the change it covers (with a mutation's generation
bump, in the same `zfs set`: sr.SR.mutate), so a host that dies mid-way
leaves a superset, never a subset.  A new host whose carried copy is at G
takes it and reads only the named datasets and the clones of their snapshots
(carried.adopt_carried); with any other copy, or none, it reads every dataset.
base None (a new SR, a copy that could not be written): no copy to start from.

The text is bounded (LIMIT: ZFS refuses user property values of 8192 bytes
and more, ZAP_MAXVALUELEN in OpenZFS's zfs_check_userprops): a change that
would overflow it carries the index first, and the journal starts again at
that generation (sr.SR.journal).  Parser and builder are here, sans-IO; what
comes from the pool is checked (NAME one dataset name component) before it
names anything to read or reset.
"""

import json
import os

from plugins.volume import names as names_mod

# below ZAP_MAXVALUELEN (8192, the terminating NUL included) with room to
# spare; ZFSNG_JOURNAL_LIMIT makes it smaller (the VM tests carry copies
# often that way: a kill mid-way through one, a catch-up from a later one)
LIMIT = min(6000, int(os.environ.get("ZFSNG_JOURNAL_LIMIT", "6000")))


def parse(value, generation):
    """(base, frozenset of names) from the property's decoded value (None when
    absent) on a pool at generation; (None, frozenset()) for anything that is
    not a journal we wrote as of that generation: a journal that cannot be
    trusted is no journal (the next host reads every dataset)."""
    if not isinstance(value, dict):
        return None, frozenset()
    base, at, got = value.get("base"), value.get("at"), value.get("names")
    if type(base) is not int or base < 0 or type(at) is not int or at != generation or \
            base > at or not isinstance(got, list) or \
            not all(names_mod.is_component(n) for n in got):
        return None, frozenset()
    return base, frozenset(got)


def build(base, names, at):
    """The property's value for (base, names) as of generation at: what
    parse() reads back (no names without a base: they would name changes
    since nothing)."""
    return {"base": base, "at": at, "names": sorted(names) if base is not None else []}


def fits(base, names, at):
    """Whether build(base, names, at) stays within LIMIT as the property's text."""
    return len(json.dumps(build(base, names, at), ensure_ascii=True, sort_keys=True)) <= LIMIT


def name_of(root, zname):
    """The journal name of ZFS name zname (a dataset, DS@SNAP or DS#BOOKMARK)
    under the SR root: its dataset's component, or None if zname is not
    directly under root."""
    return names_mod.component(root, names_mod.dataset_of(zname))


def datasets(root, names):
    """The ZFS names of journal names, in order."""
    return ["%s/%s" % (root, n) for n in sorted(names)]
