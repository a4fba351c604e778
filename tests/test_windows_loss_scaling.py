"""Pure arithmetic of windows, loss normalisation and LR scaling."""

import math
import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from accum.loss import backward_scale, count_loss_items, mean_of_means_loss, sum_item_losses
from accum.scaling import scale_lr
from accum.windows import epoch_order, layout_window, rank_share, window_indices, windows_per_epoch


@given(n=st.integers(1, 200), micro=st.integers(1, 9), world=st.integers(1, 4))
def test_every_sample_of_a_window_is_used_once_and_ranks_run_equally_many_micro_batches(n, micro, world):
    indices = list(range(100, 100 + n))
    layouts = [layout_window(indices, micro, world, rank) for rank in range(world)]
    used = [i for layout in layouts for chunk in layout.micro_batches for i in chunk]
    assert sorted(used) == indices
    assert len({layout.num_micro_batches for layout in layouts}) == 1
    assert all(len(chunk) <= micro for layout in layouts for chunk in layout.micro_batches)


def test_full_window_is_accum_micro_batches_of_micro_on_each_rank():
    layout = layout_window(list(range(16)), micro_batch_size=4, num_processes=2, rank=1)
    assert layout.micro_batches == ((8, 9, 10, 11), (12, 13, 14, 15))


def test_partial_window_pads_the_short_rank_with_an_empty_micro_batch():
    # 9 samples, micro 4, 2 ranks: rank 0 holds 5 (two micro-batches), rank 1 holds 4 (one, plus an empty one)
    r0 = layout_window(list(range(9)), 4, 2, 0)
    r1 = layout_window(list(range(9)), 4, 2, 1)
    assert r0.micro_batches == ((0, 1, 2, 3), (4,))
    assert r1.micro_batches == ((5, 6, 7, 8), ())


def test_rank_share_spreads_evenly():
    assert [rank_share(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_windows_per_epoch_counts_the_partial_window():
    assert windows_per_epoch(100, 32) == 4
    assert windows_per_epoch(96, 32) == 3
    with pytest.raises(ValueError):
        windows_per_epoch(0, 32)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(50, 1, 3) == epoch_order(50, 1, 3)
    assert epoch_order(50, 1, 3) != epoch_order(50, 1, 4)
    assert sorted(epoch_order(50, 1, 3)) == list(range(50))
    assert window_indices(list(range(10)), 2, 4) == [8, 9]


def test_sum_item_losses_matches_the_mean_times_count_for_clm_with_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 1, 2]])
    total = sum_item_losses(logits, labels, "clm")
    items = count_loss_items(labels, "clm", "tokens")
    assert items == 2 + 4
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(total / items, mean)
    assert count_loss_items(labels, "clm", "samples") == 2


def test_backward_scale_cancels_accelerate_division_and_ddp_average():
    # accumulated gradient = sum over micro of (sum_loss * scale) / accum, averaged over ranks
    accum, world, items = 4, 2, 37
    scale = backward_scale(accum, world, items)
    assert math.isclose(scale / accum / world, 1 / items)
    assert backward_scale(2, 1, 0) == 0.0
    with pytest.raises(ValueError):
        backward_scale(0, 1, 5)


def test_mean_of_means_divides_by_the_micro_batch_count():
    assert mean_of_means_loss(torch.tensor(6.0), 3).item() == 2.0


@pytest.mark.parametrize("rule,expected", [("none", 0.1), ("linear", 0.4), ("sqrt", 0.2)])
def test_scale_lr_rules(rule, expected):
    scaled = scale_lr(0.1, 32, 128, rule)
    assert math.isclose(scaled.lr, expected)
    assert scaled.rule == rule


def test_scale_lr_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown LR scaling rule"):
        scale_lr(0.1, 32, 64, "cubic")
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 64, "linear")


# -- cutting by length ----------------------------------------------------------------------------------


def test_token_budget_sorts_by_length_and_trades_padding_against_a_cost_per_micro_batch():
    from accum.windows import Balanced, TokenBudget

    samples = [{"input_ids": [1] * n} for n in (3, 10, 5, 10, 2, 7)]

    def lengths(parts):
        return [[len(s["input_ids"]) for s in part] for part in parts]

    assert lengths(TokenBudget(overhead_tokens=100)(samples, 20)) == [[10, 10], [7, 5], [3, 2]]  # the fewest
    assert lengths(TokenBudget(overhead_tokens=1)(samples, 20)) == [[10, 10], [7], [5], [3], [2]]  # no padding
    parts = TokenBudget()(samples, 20)  # default cost: 1/25 of the budget, here 1 token
    assert lengths(parts) == lengths(TokenBudget(overhead_tokens=1)(samples, 20))
    assert lengths(TokenBudget()(samples, 100)) == lengths(TokenBudget(overhead_tokens=4)(samples, 100))
    assert all(len(part) * max(len(s["input_ids"]) for s in part) <= 20 for part in parts)  # padding counted
    assert TokenBudget(overhead_tokens=100).count(samples, 20) == 3
    assert [len(p) for p in TokenBudget()([{"input_ids": [1] * 30}, {"input_ids": [1]}], 20)] == [1, 1]  # too long: alone
    assert sorted(id(s) for part in parts for s in part) == sorted(id(s) for s in samples)  # every sample once
    assert [len(part) for part in Balanced()(list(range(100)), 97)] == [50, 50]


def test_least_cost_groups_is_the_brute_force_optimum():
    import itertools

    from accum.windows import least_cost_groups

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted((rng.randrange(1, 30) for _ in range(rng.randrange(1, 8))), reverse=True)
        limit, overhead = rng.randrange(10, 80), rng.randrange(0, 40)

        def cost(runs, lengths=lengths, overhead=overhead):
            return sum((b - a) * lengths[a] + overhead for a, b in runs)

        def allowed(runs, lengths=lengths, limit=limit):
            return all(b - a == 1 or (b - a) * lengths[a] <= limit for a, b in runs)

        best = None
        for cuts in itertools.product((False, True), repeat=len(lengths) - 1):
            bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], len(lengths)]
            runs = list(itertools.pairwise(bounds))
            if allowed(runs) and (best is None or cost(runs) < best):
                best = cost(runs)
        found = least_cost_groups(lengths, limit, overhead)
        assert allowed(found) and cost(found) == best


def test_ranks_whose_shares_cut_into_different_counts_are_padded_to_the_same():
    from accum.windows import TokenBudget, rank_micro_batches

    window = [{"input_ids": [1] * n} for n in (60, 60, 60, 60, 3, 3, 3, 3)]  # rank 0 long, rank 1 short
    mine = [rank_micro_batches(window, TokenBudget(), 64, 2, rank) for rank in (0, 1)]
    assert [len(m) for m in mine] == [4, 4]  # rank 0 needs 4, rank 1 one (and 3 empty ones)
    assert sum(1 for part in mine[1] if part) == 1 and len(mine[1][0]) == 4
