"""A short run of the fuzz campaign (tests/host/fuzz_campaign.py; the long
one is run by hand, see its docstring): a few thousand mutated NVMe/TCP PDUs
and NBD requests at the real servers on loopback, a legitimate client served
between rounds, no server death, RSS bounded."""

import io

from fuzz_campaign import run_campaign, mutate_bytes

MiB = 1 << 20


def test_mutations_are_deterministic_for_a_seed():
    import random
    a = [mutate_bytes(random.Random(7), bytes(range(72)), [(0, 1), (8, 4)]) for _ in range(3)]
    b = [mutate_bytes(random.Random(7), bytes(range(72)), [(0, 1), (8, 4)]) for _ in range(3)]
    assert a == b and any(x != bytes(range(72)) for x in a)


def test_short_fuzz_campaign_against_both_servers(tmp_path):
    out = io.StringIO()
    res = run_campaign(nvme=4000, nbd=4000, seed=12, per_round=500, workdir=str(tmp_path),
                       out=out)
    print(out.getvalue())
    for r in res:
        assert r["sent"] == 4000 and r["rounds"] == 8, r
        assert r["crashes"] == 0 and r["legit_failures"] == 0, (r, out.getvalue()[-3000:])
        # the fuzz reaches the servers' error paths: many sessions end by the server
        assert r["closed_by_server"] >= r["sessions"] // 10, r
        assert r["rss_max"] - r["rss_first"] < 32 * MiB, r
