"""Plans reach every rank: the main process decides between its cache and a joint probe, and broadcasts."""

import json

import pytest

from tests.helpers.two_ranks import ROOT, run_on_two_ranks


@pytest.mark.slow
def test_ranks_whose_plan_caches_differ_agree_and_finish(tmp_path):
    run_on_two_ranks(ROOT / "tests" / "helpers" / "plan_ranks.py", tmp_path, timeout=200)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["entries_before_second"] == [True, False]  # only the main process wrote its cache
    first, second, third = zip(*(r["plans"] for r in ranks), strict=True)
    for plans in (first, second, third):
        assert plans[0] == plans[1]  # the same Plan, probe records included (each rank measured its own)
    assert [p["source"] for p in (first[0], second[0], third[0])] == ["probe", "cache", "probe"]
    assert second[0]["probes"] == [] and len(third[0]["probes"]) >= 3  # the hit probed nowhere; the miss everywhere
    assert first[0]["micro_batch_size"] * first[0]["accumulation_steps"] * 2 == 8
