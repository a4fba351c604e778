"""The next window prepared while this one trains: the data path off the critical path.

`Accumulator.prepare` cuts, collates and counts a window on the CPU with no collective and no device
work, so a loop can run it for the next window in a thread while the current one computes. A
`Prefetcher` holds at most one window ahead; asked for other indices than it prepared (the plan or
the batch changed, or the loop skipped ahead) it prepares them in the loop instead, so the windows a
run trains, and their order, are the same with or without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


class Prefetcher:
    """Windows of `data` by their indices, prepared by `prepare` (e.g. `Accumulator.prepare`) in
    `workers` threads ahead of the loop; 0 workers prepares each window when it is taken.

        prefetch = Prefetcher(accumulator.prepare, train_data, workers=1)
        try:
            for indices, following in windows:            # this window's indices and the next one's
                window = prefetch.take(indices)
                if following is not None:
                    prefetch.ahead(following)
                accumulator.step(window)
        finally:
            prefetch.close()

    `waited` is the seconds the loop spent on the data path: preparing a window, or waiting for one.
    """

    def __init__(self, prepare: Callable[[Sequence[Any]], Any], data: Sequence[Any], workers: int = 1):
        from concurrent.futures import ThreadPoolExecutor

        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise ValueError(f"workers must be a whole number >= 0, got {workers!r}")
        self.prepare, self.data = prepare, data
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="accum-prefetch") if workers else None
        self.pending: tuple[list[int], Any] | None = None
        self.waited = 0.0

    def _window(self, indices: list[int]) -> Any:
        from torch.utils.data import Subset

        return self.prepare(Subset(self.data, indices))

    def ahead(self, indices: list[int]) -> None:
        """Start preparing the window of `indices` (with no workers: nothing, it is prepared when taken)."""
        if self.pool is not None:
            self.pending = (list(indices), self.pool.submit(self._window, list(indices)))

    def take(self, indices: list[int]) -> Any:
        """The window of `indices`: the one prepared ahead if it is that one, else prepared now."""
        started = time.perf_counter()
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] == list(indices):
            window = pending[1].result()
        else:
            window = self._window(list(indices))
        self.waited += time.perf_counter() - started
        return window

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
