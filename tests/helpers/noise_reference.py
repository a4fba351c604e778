"""The noise meter's micro-batch norms as they were before the fused multi-tensor version (a Python
loop over the parameters, three kernels each), kept as the reference tests/test_speed.py compares
the fused one with."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from accum.noise import _cumsum, _sq, _sq_norm_tensor, _wide


class LoopedMicroGradientNorms:
    """Small-batch squared norms from the micro-batches of one window, on one process.

    After micro-batch k's backward, `.grad` holds A_k = grad_scale x (sum of item gradients of
    micro-batches 1..k). Two ways to read small batches out of it, both unbiased:

    - keep_previous=True (default): micro-batch k's own gradient is A_k - A_{k-1}; keeps one fp32
      copy of the gradients (extra memory: 4 bytes per trainable parameter) and costs three passes
      over them per micro-batch. N independent small batches per window: the lower-variance choice.
    - keep_previous=False: the prefix A_k (k < N) is itself the mean gradient of the first k
      micro-batches' items; no extra memory, one pass per micro-batch, noisier.

    Use with one process (or rank-locally, before any all-reduce: DDP's sync backward overwrites
    `.grad` with the average, so on several ranks use `LocalGradientNormHook` instead)::

        norms = MicroGradientNorms(model.parameters())
        norms.start_window(grad_scale=num_processes / total_items_in_window)
        for batch in window:
            accelerator.backward(loss_of(batch))
            norms.after_backward(items=items_in(batch))
        measured = norms.window_result()   # before clipping; None for a 1-micro-batch window
        if measured is not None:
            tracker.update(*measured)
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter], keep_previous: bool = True):
        self.parameters = [p for p in parameters if p.requires_grad]
        self.keep_previous = keep_previous
        self._previous: list[torch.Tensor | None] | None = None
        self.start_window(1.0)

    def start_window(self, grad_scale: float) -> None:
        """Call before the window's first backward (gradients zero); grad_scale as in the module doc."""
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"grad_scale={grad_scale!r}: must be finite and > 0")
        self.grad_scale = float(grad_scale)
        self._items: list[float] = []
        self._small_sq: list[torch.Tensor] = []  # unscaled ||.||^2 of each small batch's gradient sum
        self._last_sq: torch.Tensor | None = None  # ||A_k||^2 of the latest prefix

    def after_backward(self, items: float) -> None:
        """Record micro-batch k's gradient, `items` (samples or tokens) being the items it carried."""
        if items <= 0:
            raise ValueError(f"items={items!r}: a micro-batch must carry at least one item")
        grads = [p.grad for p in self.parameters]
        zero = torch.zeros((), dtype=torch.float32)
        if self.keep_previous:
            if self._previous is None:
                self._previous = [None] * len(grads)
            first = not self._items
            total: torch.Tensor | None = None
            for i, g in enumerate(grads):
                prev = self._previous[i]
                if first or prev is None:
                    diff_sq = None if g is None else _sq(g)
                elif g is None:
                    diff_sq = _sq(prev)
                else:
                    prev.sub_(g.detach())  # in place: -(A_k - A_{k-1}) with no temporary
                    diff_sq = _sq(prev)
                if g is None:
                    self._previous[i] = None
                elif prev is None or prev.shape != g.shape or prev.device != g.device:
                    self._previous[i] = g.detach().to(_wide(g.dtype), copy=True)
                else:
                    prev.copy_(g.detach())
                if diff_sq is not None:
                    total = diff_sq if total is None else total + diff_sq.to(total.device)
            self._small_sq.append(zero if total is None else total)
        else:
            if self._last_sq is not None:
                self._small_sq.append(self._last_sq)
            current = _sq_norm_tensor(grads)
            self._last_sq = zero if current is None else current
        self._items.append(float(items))

    def window_result(self) -> tuple[float, float, float, float] | None:
        """(g_small_sq, b_small, g_big_sq, b_big) of the window so far, ready for
        `NoiseScaleTracker.update`; None when it had fewer than two micro-batches. One host sync."""
        if len(self._items) < 2:
            return None
        c = self.grad_scale
        total_items = sum(self._items)
        if self.keep_previous:
            sizes = self._items
            big_sq = _sq_norm_tensor(p.grad for p in self.parameters)
        else:
            sizes = list(_cumsum(self._items))[:-1]
            big_sq = self._last_sq
        # mean gradient of a batch of n items = (its share of .grad) / (c n)
        smalls = torch.stack([s.to(self._small_sq[0].device) for s in self._small_sq]).cpu().tolist()
        g_small_sq = sum(s / (c * n) ** 2 for s, n in zip(smalls, sizes, strict=True)) / len(sizes)
        b_small = len(sizes) / sum(1.0 / n for n in sizes)  # E mean_k |g_k|^2 = |G|^2 + S mean_k(1/n_k)
        g_big_sq = (0.0 if big_sq is None else float(big_sq)) / (c * total_items) ** 2
        return g_small_sq, b_small, g_big_sq, total_items


