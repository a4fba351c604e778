"""Which samples each rank trains on in each accumulation window: pure arithmetic.

A *window* is the data of one optimizer step on all ranks together: up to
micro x accumulation x processes samples. We split data into windows ourselves,
instead of letting Accelerate shard a DataLoader, for three reasons (docs/architecture.md):
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


# -- cutting a rank's share of a window into micro-batches --------------------------------------------


class FixedSize:
    """The cutting policy `cut(samples, limit) -> micro-batches`: consecutive runs of `limit` samples
    (the last one shorter). How a window is cut does not change its gradient (the loss is a sum over
    the window's items scaled by its agreed item count), so a replay after an out-of-memory error
    may cut the same samples at a smaller limit."""

    unit = "samples"

    def __call__(self, samples: Sequence[Any], limit: int) -> list[list[Any]]:
        _check_limit(limit)
        return [list(samples[start:start + limit]) for start in range(0, len(samples), limit)]

    def count(self, samples: Sequence[Any], limit: int) -> int:
        """How many micro-batches `self(samples, limit)` makes, without touching the samples."""
        _check_limit(limit)
        return math.ceil(len(samples) / limit)


class Balanced:
    """Cutting policy: as few micro-batches as `limit` samples each allow, of nearly equal sizes
    (100 samples at limit 97: two of 50, not 97 and 3), in order."""

    unit = "samples"

    def __call__(self, samples: Sequence[Any], limit: int) -> list[list[Any]]:
        parts = self.count(samples, limit)
        base, extra = divmod(len(samples), max(parts, 1))
        cuts, start = [], 0
        for index in range(parts):
            stop = start + base + (1 if index < extra else 0)
            cuts.append(list(samples[start:stop]))
            start = stop
        return cuts

    def count(self, samples: Sequence[Any], limit: int) -> int:
        _check_limit(limit)
        return math.ceil(len(samples) / limit)


def sample_length(sample: Any) -> int:
    """Tokens of a tokenised sample (its input_ids)."""
    return len(sample["input_ids"])


class TokenBudget:
    """Cutting policy by length: each micro-batch at most `limit` tokens counted with its own padding
    (samples x its longest sample), the samples sorted longest first and grouped so that the padded
    tokens plus a fixed cost per micro-batch are least. The cost (`overhead_tokens`, default
    `default_overhead_tokens(limit)`, 1/25 of the budget) is what one more forward and backward is
    charged beyond its tokens: without it the cut would put every sample alone (no padding at all); with
    a charge of what a micro-batch costs on a 2-core CPU (91 tokens), tweets of 3 to 64 tokens keep 15%
    padding (modelled, docs/architecture.md). A sample longer than the budget goes alone. Sorting inside the
    window changes no gradient (the loss is a sum over the window's items, scaled by its agreed item
    count): it only puts sequences of like length together. The cut is deterministic, so every rank
    computes every rank's."""

    unit = "tokens"

    def __init__(self, length: Any = sample_length, overhead_tokens: int | None = None):
        self.length, self.overhead_tokens = length, overhead_tokens

    def __call__(self, samples: Sequence[Any], limit: int) -> list[list[Any]]:
        return [[samples[i] for i in part] for part in self._parts(samples, limit)]

    def count(self, samples: Sequence[Any], limit: int) -> int:
        return len(self._parts(samples, limit))

    def _parts(self, samples: Sequence[Any], limit: int) -> list[list[int]]:
        _check_limit(limit)
        lengths = [self.length(samples[i]) for i in range(len(samples))]
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the window's order
        overhead = self.overhead_tokens if self.overhead_tokens is not None else default_overhead_tokens(limit)
        return [[order[i] for i in range(start, stop)]
                for start, stop in least_cost_groups([lengths[i] for i in order], limit, overhead)]


def default_overhead_tokens(limit: int) -> int:
    """What the cut charges one more micro-batch by default: 1/25 of the token budget. On the default
    run's tweets this keeps 0.904 of the padded tokens real (4.34 micro-batches per window); charging
    what a micro-batch measurably costs on a 2-core CPU (91 tokens' worth at a budget of 1,024) would
    keep 0.847 and be modelled 2.7% faster a window (docs/architecture.md: the trade, measured)."""
    return max(1, limit // 25)


def least_cost_groups(lengths: list[int], limit: int, overhead: int) -> list[tuple[int, int]]:
    """Split lengths sorted longest first into runs [start, stop) of padded size (count x first) at
    most `limit` (a run of one may exceed it), least total padded size + `overhead` per run: dynamic
    programming over the run ends, O(n x the longest run)."""
    best, start_of = [0] + [math.inf] * len(lengths), [0] * (len(lengths) + 1)
    for stop in range(1, len(lengths) + 1):
        for start in range(stop - 1, -1, -1):
            if stop - start > 1 and (stop - start) * lengths[start] > limit:
                break
            cost = best[start] + (stop - start) * lengths[start] + overhead
            if cost < best[stop]:
                best[stop], start_of[stop] = cost, start
    runs, stop = [], len(lengths)
    while stop > 0:
        runs.append((start_of[stop], stop))
        stop = start_of[stop]
    return runs[::-1]


def cut_for(plan: Any) -> Any:
    """The cutting policy a Plan was made for: FixedSize, Balanced or TokenBudget."""
    return {"samples": FixedSize, "balanced": Balanced, "tokens": TokenBudget}[getattr(plan, "cut", "samples")]()


def _check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"a micro-batch limit must be a positive integer, got {limit!r}")


def rank_micro_batches(samples: Sequence[Any], cut: Any, limit: int, num_processes: int,
                       rank: int) -> list[list[Any]]:
    """This rank's micro-batches of one window (the window's samples on all ranks, the same list on
    every rank): its contiguous share (`rank_share`) cut by `cut`, padded with empty micro-batches
    ([]) to the largest count any rank's share makes, so every rank runs as many and joins every
    collective. Computed alike on every rank, with no communication."""
    if not 0 <= rank < num_processes:
        raise ValueError(f"rank {rank} is not one of {num_processes} processes")
    shares = [rank_share(len(samples), num_processes, r) for r in range(num_processes)]
    count_of = getattr(cut, "count", None) or (lambda part, size: len(cut(part, size)))
    most = max(count_of(_Slice(samples, start, stop), limit) for start, stop in shares)
    start, stop = shares[rank]
    mine = cut(_Slice(samples, start, stop), limit) if stop > start else []
    return mine + [[] for _ in range(most - len(mine))]


class _Slice(Sequence):
    """A view of samples[start:stop] that fetches only what is read (a rank reads its own share)."""

    def __init__(self, samples: Sequence[Any], start: int, stop: int):
        self.samples, self.start, self.stop = samples, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.samples[self.start + i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return self.samples[self.start + index % len(self)]


# -- the order of samples and windows, resumable -------------------------------------------------------


class WindowSampler:
    """The global sample indices of each window, the same on every rank.

    Each epoch is a seeded permutation (`epoch_order`: it depends only on seed and epoch); windows
    are taken from it in turn, and the position is counted in samples, so the window size may change
    between windows (a batch schedule, the end of a sample budget) and a resume still lands on the
    same sample. The last window of an epoch may be partial. `state_dict()` / `load_state_dict()`
    make it resumable, also through `accelerator.register_for_checkpointing(sampler)` and Accelerate's
    own `save_state` / `load_state`.

        sampler = WindowSampler(len(dataset), window_size=32, seed=0)
        for epoch in range(3):
            for indices in sampler:          # the rest of the current epoch
                accumulator.step([dataset[i] for i in indices])
    """

    def __init__(self, num_samples: int, window_size: int, seed: int = 0, shuffle: bool = True):
        for name, value in (("num_samples", num_samples), ("window_size", window_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.num_samples, self.window_size, self.seed, self.shuffle = num_samples, window_size, seed, shuffle
        self.epoch, self.window_in_epoch, self.sample_in_epoch = 0, 0, 0
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle))
        return self._order[1]

    @property
    def epoch_finished(self) -> bool:
        return self.sample_in_epoch >= self.num_samples

    def next_window(self, size: int | None = None) -> list[int]:
        """The next window's indices (`size` samples, default `window_size`, fewer at the end of an
        epoch), and the position moves past them; a finished epoch rolls over to the next."""
        size = self.window_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"a window holds a positive number of samples, got {size!r}")
        if self.epoch_finished:
            self.epoch, self.window_in_epoch, self.sample_in_epoch = self.epoch + 1, 0, 0
        indices = self._epoch_order()[self.sample_in_epoch:self.sample_in_epoch + size]
        self.sample_in_epoch += len(indices)
        self.window_in_epoch += 1
        return indices

    def peek_window(self, size: int | None = None) -> list[int]:
        """The indices `next_window(size)` will return, without moving the position (for a loop that
        prepares the next window while this one trains)."""
        epoch, window, sample = self.epoch, self.window_in_epoch, self.sample_in_epoch
        order = self._order
        try:
            return self.next_window(size)
        finally:
            self.epoch, self.window_in_epoch, self.sample_in_epoch, self._order = epoch, window, sample, order

    def __iter__(self) -> Iterator[list[int]]:
        """The windows of the rest of the current epoch (of the next one, if it is finished)."""
        if self.epoch_finished:
            self.epoch, self.window_in_epoch, self.sample_in_epoch = self.epoch + 1, 0, 0
        while not self.epoch_finished:
            yield self.next_window()

    def __len__(self) -> int:
        """Windows in one full epoch at the current window size."""
        return windows_per_epoch(self.num_samples, self.window_size)

    def state_dict(self) -> dict[str, int]:
        return {"num_samples": self.num_samples, "seed": self.seed, "epoch": self.epoch,
                "window_in_epoch": self.window_in_epoch, "sample_in_epoch": self.sample_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; raises ValueError for a state of another data set or seed, or one
        whose numbers are not whole, non-negative and within the epoch (a hand-edited file)."""
        values = {}
        for key in ("num_samples", "seed", "epoch", "window_in_epoch", "sample_in_epoch"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"sampler state {key}={value!r}: must be a whole number >= 0")
            values[key] = value
        if (values["num_samples"], values["seed"]) != (self.num_samples, self.seed):
            raise ValueError(f"sampler state is for {values['num_samples']} samples with seed {values['seed']}, "
                             f"not {self.num_samples} with seed {self.seed}")
        if values["sample_in_epoch"] > self.num_samples or values["window_in_epoch"] > self.num_samples:
            raise ValueError(f"sampler state position {values['sample_in_epoch']} is past the epoch's "
                             f"{self.num_samples} samples")
        self.epoch, self.window_in_epoch, self.sample_in_epoch = (
            values["epoch"], values["window_in_epoch"], values["sample_in_epoch"])
