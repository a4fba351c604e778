"""accum: exact, automatic gradient accumulation for Hugging Face Accelerate."""

__version__ = "0.1.0"

from accum.accelerator import begin_window, build_accelerator
from accum.cache import PlanCache
from accum.errors import ConfigError
from accum.estimate import MemoryEstimate, estimate_analytic, estimate_traced, max_micro_batch_for
from accum.loss import (
    TaskLoss,
    backward_scale,
    count_loss_items,
    mean_of_means_loss,
    pad_collate,
    sum_item_losses,
)
from accum.noise import (
    LocalGradientNormHook,
    MicroGradientNorms,
    NoiseMeter,
    NoiseScaleTracker,
    estimate_noise,
    recommend_batch,
)
from accum.oom import (
    device_memory_bytes,
    free_memory,
    is_oom,
    parse_memory,
    peak_memory_bytes,
    reset_peak_memory,
)
from accum.plan import Plan, plan_batch, plan_from_accumulation, resolve_batch
from accum.probe import NothingFitsError, Probe, ProbeResult, find_max_micro_batch, plan_eval_batch, plan_for
from accum.recovery import AdaptiveBatch, Decision, OutOfMemoryError, agree_max, run_with_recovery
from accum.scaling import ScaledLR, scale_lr
from accum.stats import AccumulationStats, peak_memory
from accum.window import Accumulator, Callback, EvalResult, NonFiniteError, WindowResult, evaluate
from accum.windows import (
    Balanced,
    FixedSize,
    TokenBudget,
    WindowSampler,
    epoch_order,
    layout_window,
    windows_per_epoch,
)

__all__ = [
    "AccumulationStats", "Accumulator", "AdaptiveBatch", "Balanced", "Callback", "ConfigError", "Decision", "EvalResult",
    "FixedSize", "LocalGradientNormHook", "MemoryEstimate", "MicroGradientNorms", "NoiseMeter", "NoiseScaleTracker",
    "NonFiniteError", "NothingFitsError", "OutOfMemoryError", "Plan", "PlanCache", "Probe", "ProbeResult",
    "ScaledLR", "TaskLoss", "TokenBudget", "WindowResult", "WindowSampler", "agree_max", "backward_scale",
    "begin_window", "build_accelerator", "count_loss_items", "device_memory_bytes", "epoch_order",
    "estimate_analytic", "estimate_noise", "estimate_traced", "evaluate", "find_max_micro_batch", "free_memory",
    "is_oom", "layout_window", "max_micro_batch_for", "mean_of_means_loss", "pad_collate", "parse_memory",
    "peak_memory", "peak_memory_bytes", "plan_batch", "plan_eval_batch", "plan_for", "plan_from_accumulation",
    "recommend_batch", "reset_peak_memory", "resolve_batch", "run_with_recovery", "scale_lr", "sum_item_losses",
    "windows_per_epoch",
]
