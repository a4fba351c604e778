"""Which samples each rank trains on in each accumulation window: pure arithmetic.

A *window* is the data of one optimizer step on all ranks together: up to
micro x accumulation x processes samples. We split data into windows ourselves,
instead of letting Accelerate shard a DataLoader, for three reasons (DESIGN.md):
exact loss normalisation needs the whole window before its first backward; a
partial last window must be applied once with its true weight; and with several
ranks, Accelerate's `even_batches=True` would repeat samples while
`even_batches=False` would leave ranks with different numbers of micro-batches.
Here every rank computes the same window layout from the same numbers, so all
ranks always run the same number of micro-batches (a rank short of data gets
empty ones that carry zero items) and take part in every collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WindowLayout:
    """The micro-batches one rank runs in one window (lists of dataset indices; [] is an empty one)."""

    micro_batches: tuple[tuple[int, ...], ...]
    window_samples: int  # on all ranks together

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches)


def windows_per_epoch(num_samples: int, window_size: int) -> int:
    """Optimizer steps in one pass over `num_samples`; the last window may be partial."""
    if num_samples <= 0 or window_size <= 0:
        raise ValueError(f"need num_samples > 0 and window_size > 0, got {num_samples}, {window_size}")
    return math.ceil(num_samples / window_size)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch), so resume can recompute it."""
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


def rank_share(window_samples: int, num_processes: int, rank: int) -> tuple[int, int]:
    """(start, stop) of `rank`'s contiguous share of a window, spread as evenly as possible."""
    base, extra = divmod(window_samples, num_processes)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def layout_window(indices: list[int], micro_batch_size: int, num_processes: int, rank: int) -> WindowLayout:
    """Split one window's indices into this rank's micro-batches.

    Every rank gets the same number of micro-batches: that of the rank with the most
    samples, ceil(max share / micro). Ranks with less data are padded with empty ones.
    """
    if micro_batch_size <= 0 or not 0 <= rank < num_processes:
        raise ValueError(f"bad layout: micro_batch_size={micro_batch_size}, rank={rank} of {num_processes}")
    start, stop = rank_share(len(indices), num_processes, rank)
    mine = indices[start:stop]
    largest_share = rank_share(len(indices), num_processes, 0)[1]
    count = math.ceil(largest_share / micro_batch_size)
    chunks = [tuple(mine[i * micro_batch_size:(i + 1) * micro_batch_size]) for i in range(count)]
    return WindowLayout(micro_batches=tuple(chunks), window_samples=len(indices))


def window_indices(order: list[int], window_in_epoch: int, window_size: int) -> list[int]:
    """The global indices of window `window_in_epoch` of an epoch with sample `order`."""
    return order[window_in_epoch * window_size:(window_in_epoch + 1) * window_size]
