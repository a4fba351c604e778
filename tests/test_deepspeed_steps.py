"""DeepSpeed's window arithmetic without DeepSpeed: an engine that divides every backward by its fixed
count G and averages over ranks, simulated here, gets the window's item mean from accum's padding and
scale for any window (partial ones included); the refusals are one line."""

import random

import pytest

from accum.deepspeed_steps import (
    engine_backward_scale,
    pad_to_engine,
    padding_to_engine,
    refuse_token_cutting,
)
from accum.errors import ConfigError
from accum.windows import FixedSize, rank_micro_batches


def engine_gradient(rank_windows, engine_steps, scale):
    """What the engine accumulates for a 'gradient' that is the loss itself: each micro-batch's scaled
    loss sum / engine_steps (its fixed division), summed over micro-batches, averaged over ranks. An
    empty micro-batch (None) runs at zero weight."""
    per_rank = [sum(scale * sum(micro or []) / engine_steps for micro in pad_to_engine(micros, engine_steps))
                for micros in rank_windows]
    return sum(per_rank) / len(per_rank)


@pytest.mark.parametrize("processes,micro,steps", [(1, 2, 4), (2, 2, 4), (2, 1, 3), (4, 3, 2)])
def test_padded_windows_scaled_for_the_engine_give_the_item_mean(processes, micro, steps):
    rng = random.Random(processes * 100 + micro * 10 + steps)
    full = micro * steps * processes
    for size in range(1, full + 1):  # every partial window, and the full one
        losses = [rng.uniform(0.1, 5.0) for _ in range(size)]
        windows = [[list(part) for part in rank_micro_batches(losses, FixedSize(), micro, processes, rank)]
                   for rank in range(processes)]
        windows = [[part or None for part in micros] for micros in windows]
        got = engine_gradient(windows, steps, engine_backward_scale(steps, processes, size))
        assert got == pytest.approx(sum(losses) / size, rel=1e-12), size
        # the window's own length instead of the engine's count (what Accelerate's division assumes) is off
        # for every partial window with fewer micro-batches than the engine counts
        wrong = engine_gradient(windows, steps, engine_backward_scale(len(windows[0]), processes, size))
        assert (wrong == pytest.approx(got, rel=1e-12)) == (len(windows[0]) == steps), size


def test_padding_counts_and_the_one_line_refusals():
    assert padding_to_engine(1, 4) == 3 and padding_to_engine(4, 4) == 0
    assert pad_to_engine(["a"], 3) == ["a", None, None]
    with pytest.raises(ConfigError) as error:
        padding_to_engine(5, 4)
    assert "\n" not in str(error.value) and "gradient_accumulation_steps 4" in str(error.value)
    with pytest.raises(ConfigError) as error:
        refuse_token_cutting("tokens")
    assert "\n" not in str(error.value) and "cut_by" in str(error.value)
    refuse_token_cutting("samples")
    refuse_token_cutting("balanced")
