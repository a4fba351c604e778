"""Learning-rate rules for when the effective batch differs from the one the LR was tuned for."""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("none", "linear", "sqrt")


@dataclass(frozen=True)
class ScaledLR:
    """The learning rate to use, and how it was derived (for the banner)."""

    lr: float
    base_lr: float
    base_batch: int
    batch: int
    rule: str

    def describe(self) -> str:
        if self.rule == "none" or self.batch == self.base_batch:
            return f"{self.lr:g}"
        return f"{self.lr:g} ({self.rule} scaling of {self.base_lr:g} from batch {self.base_batch} to {self.batch})"


def scale_lr(base_lr: float, base_batch: int, batch: int, rule: str = "none") -> ScaledLR:
    """Scale `base_lr` tuned at `base_batch` to `batch` samples.

    linear: lr * batch/base (Goyal et al. 2017, for SGD); sqrt: lr * sqrt(batch/base)
    (common for the Adam family); none: unchanged. Raises ValueError on bad input.
    """
    if rule not in RULES:
        raise ValueError(f"unknown LR scaling rule {rule!r}: use one of {', '.join(RULES)}")
    if base_lr <= 0 or base_batch <= 0 or batch <= 0:
        raise ValueError(f"LR scaling needs positive values, got lr={base_lr}, base_batch={base_batch}, batch={batch}")
    ratio = batch / base_batch
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[rule]
    return ScaledLR(lr=base_lr * factor, base_lr=base_lr, base_batch=base_batch, batch=batch, rule=rule)
