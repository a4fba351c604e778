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


TASKS = ("classification", "clm")


class TaskLoss:
    """The exact loss of a window for a sequence-classification or causal-LM model.

    `forward(model, batch)` returns the micro-batch's *sum* of item losses (fp32) and the logits;
    `count(batch)` the items that count in the loss, read from the CPU batch before anything runs
    (no host-device sync). Items are tokens with a next-token label (clm) or samples
    (classification), unless `normalization` names one: 'tokens', 'samples', or 'mean' for
    Accelerate's default mean of micro-batch means (kept for comparison; not exact).

    Any object with these two methods (and `mean_of_means = False`) can stand in for it, e.g. for
    a loss that masks prompt tokens: the accumulator only needs the sum and the count.
    """

    def __init__(self, task: str, normalization: str = "auto"):
        if task not in TASKS:
            raise ValueError(f"task {task!r} is unknown: use one of {', '.join(TASKS)}")
        if normalization not in ("auto", *NORMALIZATIONS):
            raise ValueError(f"normalization {normalization!r} is unknown: use auto, {', '.join(NORMALIZATIONS)}")
        self.task = task
        natural = "tokens" if task == "clm" else "samples"
        self.unit = natural if normalization in ("auto", "mean") else normalization
        self.mean_of_means = normalization == "mean"

    def count(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | int:
        """The items of `batch` that count in the loss: a 0-d tensor for tokens (read it with the
        window's other counts in one conversion), an int for samples."""
        labels = batch["labels"]
        if self.unit == "tokens":
            return (labels[:, 1:] != IGNORE_INDEX).sum() if self.task == "clm" else (labels != IGNORE_INDEX).sum()
        return int(labels.shape[0])

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss sum, logits); a batch without padding may leave out its attention_mask."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        return sum_item_losses(logits, batch["labels"], self.task), logits


def pad_collate(task: str, pad_token_id: int):
    """A collate_fn for tokenised samples ({'input_ids': [...], 'labels'/'label': class} or just ids):
    pads input_ids on the right to the batch's longest and adds attention_mask and labels, as CPU
    tensors. labels: classification, a LongTensor [B] of class ids; clm, input_ids with -100 at
    padding (the model shifts them). An empty list gives tensors with 0 rows."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(example["input_ids"]) for example in examples]
        width = max(lengths, default=0)
        input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, length) in enumerate(zip(examples, lengths, strict=True)):
            input_ids[row, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        if task == "classification":
            labels = torch.tensor([int(e["labels"] if "labels" in e else e["label"]) for e in examples], dtype=torch.long)
        else:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate
