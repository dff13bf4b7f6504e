"""Every validator of outside input refuses a value with a trailing newline.

Python's `$` also matches just before a final "\\n", so `^...$` let "host\\n"
through `nodes.split_node` into ssh's argv (hypothesis found it in
test_shared_sr_logic.py::test_split_node_fuzz).  The patterns end with `\\Z`
now; this checks each validator directly on a good value and the same value
with "\\n" appended."""

import pytest

from nvmeof_target import nqn
from plugins import nodes, smapi, uri
from plugins.datapath import core, nbd_client, node_nbd
from plugins.volume import names

KEY = "0b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8"
SR_UUID = "11111111-2222-3333-4444-555555555555"
NQN = "nqn.2014-08.org.zfs-ng:sr:" + SR_UUID

CASES = [
    ("node", nodes.split_node, "root@node1.example"),
    ("node ipv6", nodes.split_node, "[fd00::1]"),
    ("key", names.check_key, KEY),
    ("pool", names.check_pool, "tank"),
    ("uuid", names.check_uuid, SR_UUID),
    ("device", names.check_device, "/dev/sdb"),
    ("compression", names.check_compression, "zstd-3"),
    ("nvme-node", names.check_nvme_node, "10.0.0.1:4420"),
    ("nqn (target)", nqn.check_nqn, NQN),
    ("nqn (uri)", uri.check_nqn, NQN),
    ("host (uri)", uri.check_host, "node1.example"),
    ("domain", core.check_domain, "vm-1"),
    ("nbd identity", node_nbd.check_identity, "host-a.example"),
    ("nbd device", nbd_client.check_device, "/dev/nbd3"),
]


@pytest.mark.parametrize("what,check,good", CASES, ids=[c[0] for c in CASES])
def test_a_trailing_newline_is_refused(what, check, good):
    check(good)
    with pytest.raises((smapi.InvalidParameters, nbd_client.NbdClientError, ValueError)):
        check(good + "\n")
