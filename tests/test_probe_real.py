"""The search against real out-of-memory errors: a child process under RLIMIT_AS, brute force in fresh ones."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.compare_planner import fits, run_child  # noqa: E402

BUDGET = 236 * 2**20  # over the warm child: a true maximum in the 30s for this workload (measured)


@pytest.mark.slow
def test_search_finds_the_fresh_process_maximum_within_5_percent_and_its_answer_trains():
    search = run_child("accum", BUDGET)
    size = search["size"]
    assert 1 <= size and search["probes"] <= 12, search
    # a run: the answer trains 50 steps back to back in a fresh process under the same cap
    assert fits(BUDGET, size, steps=50), f"the search's {size} does not train 50 steps in a fresh process"
    # brute force, each size in a fresh process: nothing 5% larger trains (3 steps)
    above = math.floor(size / 0.95) + 1
    assert not fits(BUDGET, above), f"{above} fits too: the search's {size} is not within 5%"
    # the smallest size the search saw fail fails again when retried
    retry = search["retry_smallest_failure"]
    assert retry is not None and retry["fails_again"], search
