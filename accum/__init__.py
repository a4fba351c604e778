"""accum: exact, automatic gradient accumulation for Hugging Face Accelerate.

Every name below is importable from `accum`; each module is imported when one of its names is first
used (PEP 562), so that `import accum` and `python -m accum` start in milliseconds, not the seconds
torch takes: the command line installs its signal handling before anything heavy is imported.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_MODULES = {
    "accum.accelerator": ("begin_window", "build_accelerator"),
    "accum.cache": ("PlanCache",),
    "accum.errors": ("ConfigError",),
    "accum.estimate": ("MemoryEstimate", "estimate_analytic", "estimate_traced", "max_micro_batch_for"),
    "accum.loss": ("TaskLoss", "backward_scale", "count_loss_items", "mean_of_means_loss", "pad_collate", "sum_item_losses"),
    "accum.noise": ("LocalGradientNormHook", "MicroGradientNorms", "NoiseMeter", "NoiseScaleTracker", "estimate_noise", "recommend_batch"),
    "accum.oom": ("device_memory_bytes", "free_memory", "is_oom", "parse_memory", "peak_memory_bytes", "reset_peak_memory"),
    "accum.prefetch": ("Prefetcher",),
    "accum.plan": ("Plan", "plan_batch", "plan_from_accumulation", "resolve_batch"),
    "accum.probe": ("NothingFitsError", "Probe", "ProbeResult", "find_max_micro_batch", "plan_eval_batch", "plan_for"),
    "accum.recovery": ("AdaptiveBatch", "Decision", "OutOfMemoryError", "agree_max", "run_with_recovery"),
    "accum.scaling": ("ScaledLR", "scale_lr"),
    "accum.stats": ("AccumulationStats", "peak_memory"),
    "accum.window": ("Accumulator", "Callback", "EvalResult", "NonFiniteError", "StepUndo", "WindowResult", "all_finite",
                     "evaluate"),
    "accum.windows": ("Balanced", "FixedSize", "TokenBudget", "WindowSampler", "epoch_order", "layout_window", "windows_per_epoch"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [
    "AccumulationStats", "Accumulator", "AdaptiveBatch", "Balanced", "Callback", "ConfigError", "Decision", "EvalResult",
    "FixedSize", "LocalGradientNormHook", "MemoryEstimate", "MicroGradientNorms", "NoiseMeter", "NoiseScaleTracker",
    "NonFiniteError", "NothingFitsError", "OutOfMemoryError", "Plan", "PlanCache", "Prefetcher", "Probe", "ProbeResult",
    "ScaledLR", "StepUndo", "TaskLoss", "TokenBudget", "WindowResult", "WindowSampler", "agree_max", "all_finite", "backward_scale",
    "begin_window", "build_accelerator", "count_loss_items", "device_memory_bytes", "epoch_order",
    "estimate_analytic", "estimate_noise", "estimate_traced", "evaluate", "find_max_micro_batch", "free_memory",
    "is_oom", "layout_window", "max_micro_batch_for", "mean_of_means_loss", "pad_collate", "parse_memory",
    "peak_memory", "peak_memory_bytes", "plan_batch", "plan_eval_batch", "plan_for", "plan_from_accumulation",
    "recommend_batch", "reset_peak_memory", "resolve_batch", "run_with_recovery", "scale_lr", "sum_item_losses",
    "windows_per_epoch",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'accum' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
