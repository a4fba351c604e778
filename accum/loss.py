"""Exact loss normalisation across micro-batches and ranks.

`Accelerator.backward(loss)` divides by the accumulation steps and DDP averages over
ranks, so by default every micro-batch's *mean* counts the same: a mean of means,
wrong whenever micro-batches hold different numbers of items (padded sequences,
a partial last window). Instead we back-propagate each micro-batch's *sum* of item
losses times `accumulation_steps * num_processes / window_items`, where
window_items counts the items of the whole window on all ranks. Accelerate's
division and DDP's average cancel the two factors and the accumulated gradient is
the mean over every item in the window: the full-batch gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORMALIZATIONS = ("tokens", "samples", "mean")
IGNORE_INDEX = -100


def sum_item_losses(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Sum (not mean) of per-item cross-entropy losses, computed in fp32.

    classification: logits [B, C], labels [B]; one item per sample.
    clm: logits [B, T, V], labels [B, T] with -100 where no loss counts; position t
    predicts token t+1, so the shift happens here.
    """
    if task == "clm":
        logits = logits[:, :-1, :]
        labels = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_loss_items(labels: torch.Tensor, task: str, normalization: str) -> int:
    """Items that count in the loss: tokens with a next-token label (clm) or samples."""
    if normalization == "tokens" and task == "clm":
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    if normalization == "tokens":
        return int((labels != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def backward_scale(accumulation_steps: int, num_processes: int, window_items: int) -> float:
    """Factor for a micro-batch's loss *sum* so that the accumulated gradient is the window's item mean.

    Accelerate divides every backward by `accumulation_steps` and DDP averages over
    `num_processes`; this factor undoes both and divides by the true item count.
    A window with no items at all (cannot happen with real data) scales to 0.
    """
    if accumulation_steps <= 0 or num_processes <= 0:
        raise ValueError(f"need positive steps and processes, got {accumulation_steps}, {num_processes}")
    if window_items <= 0:
        return 0.0
    return accumulation_steps * num_processes / window_items


def mean_of_means_loss(loss_sum: torch.Tensor, micro_items: int) -> torch.Tensor:
    """Accelerate's default (`--loss-normalization mean`): the micro-batch mean, kept for comparison."""
    return loss_sum / max(micro_items, 1)
