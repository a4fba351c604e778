"""Two CPU ranks probe the same sizes and agree, even when one rank has much less memory."""

import json

import pytest

from tests.helpers.two_ranks import ROOT, run_on_two_ranks

HELPER = ROOT / "tests" / "helpers" / "probe_ranks.py"


@pytest.mark.slow
def test_two_ranks_agree_when_one_has_a_tighter_limit(tmp_path):
    budgets = [800 * 2**20, 150 * 2**20]  # rank 1 fits roughly a quarter of what rank 0 fits
    run_on_two_ranks(HELPER, tmp_path, *budgets, timeout=240, env={"MALLOC_MMAP_THRESHOLD_": "65536"})
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in records] == [2, 2]
    assert all(r["ddp"] for r in records), records[0]["distributed_type"]
    plans = [r["plan"] for r in records]
    sequences = [[(p["size"], p["fit"]) for p in plan.pop("probes")] for plan in plans]
    assert plans[0] == plans[1] and sequences[0] == sequences[1]  # same sizes, same verdicts, same plan
    plan = plans[0]
    assert plan["num_processes"] == 2 and plan["effective_batch_size"] == 128
    sizes = sequences[0]
    assert max(size for size, _ in sizes) <= 64  # the per-process share of 128
    # rank 0 alone would fit 64; the agreement holds it to what rank 1 fits
    assert plan["micro_batch_size"] < 64
    assert any(not fit for _, fit in sizes)
