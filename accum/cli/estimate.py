"""`python -m accum estimate`: a plan for a device you do not have, from a memory estimate (a
FakeTensor trace of one training step, or the analytic formula; accum/estimate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from accum.cli.config import OneLineParser
from accum.cli.models import default_task, model_config_from_spec
from accum.errors import ConfigError, check_positive_int
from accum.estimate import (
    ANALYTIC_SAFETY_FACTOR,
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    TASKS,
    MemoryEstimate,
    Tracer,
    _check_choice,
    analytic_estimator,
    max_micro_batch_for,
)
from accum.oom import parse_memory
from accum.plan import plan_batch


def build_estimate_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m accum estimate",
        description="Plan micro-batch x accumulation for a device you do not have, from a memory estimate.",
    )
    parser.add_argument("--model", required=True, metavar="PATH|NAME",
                        help="model directory (weights or only config.json), pkg://package/dir, config.json, inline "
                             "JSON config, or a built-in name (gpt2-tiny)")
    parser.add_argument("--max-seq-len", "--seq-len", dest="seq_len", type=int, required=True, metavar="N",
                        help="tokens per sample")
    parser.add_argument("--batch-size", "--target-batch-size", dest="batch_size", type=int, required=True,
                        metavar="N", help="target effective batch: micro x accumulation x processes")
    parser.add_argument("--device-memory", required=True, metavar="SIZE", help="memory of one device, e.g. 80GiB")
    parser.add_argument("--method", default="traced", choices=METHODS,
                        help="traced: one training step traced on fake tensors; analytic: a formula from the "
                             f"model's sizes, times {ANALYTIC_SAFETY_FACTOR} for what it leaves out")
    parser.add_argument("--task", default=None, choices=TASKS,
                        help="the head (default: what the model's config was made for, as `accum plan`)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS, help="whose state the step holds")
    parser.add_argument("--mixed-precision", "--precision", dest="precision", default="no", choices=PRECISIONS,
                        help="autocast of the step")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--num-processes", type=int, default=1, metavar="N",
                        help="data-parallel processes (one device each)")
    parser.add_argument("--safety-margin", type=float, default=0.1, metavar="X",
                        help="share of device memory kept free (CUDA context, fragmentation)")
    parser.add_argument("--allow-batch-rounding", action="store_true",
                        help="round a target batch that cannot be split exactly")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def _gib(value: float) -> str:
    """Bytes as GiB, MiB or KiB, whichever reads best (a tiny model's gradients are not '0.00 GiB')."""
    from accum.probe import format_bytes

    return format_bytes(value)


def run_estimate(args: argparse.Namespace) -> dict[str, Any]:
    """Search the estimate and plan the batch. Returns the plan, the search and the estimate at the chosen size."""
    _check_choice("method", args.method, METHODS)
    if args.task is not None:
        _check_choice("task", args.task, TASKS)
    _check_choice("optimizer", args.optimizer, OPTIMIZERS)
    _check_choice("precision", args.precision, PRECISIONS)
    for name in ("seq_len", "batch_size", "num_processes"):
        check_positive_int(name.replace("_", "-"), getattr(args, name))
    if args.batch_size < args.num_processes:
        raise ConfigError(f"batch size {args.batch_size} is smaller than the {args.num_processes} processes: "
                          "each process needs at least one sample")
    device_memory = parse_memory(args.device_memory)
    if device_memory <= 1:
        raise ConfigError(f"--device-memory {args.device_memory!r} must be a size such as 80GiB, not a fraction")
    config = model_config_from_spec(args.model)
    args.task = args.task or default_task(config)
    positions = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if positions is not None and args.seq_len > positions:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the model's {positions} positions: use {positions} or less")
    kwargs = {"optimizer": args.optimizer, "precision": args.precision}
    if args.method == "traced":
        tracer = Tracer(config, task=args.task, gradient_checkpointing=args.gradient_checkpointing, **kwargs)

        def estimate(size: int) -> MemoryEstimate:
            return tracer.trace(size, args.seq_len)
    else:
        analytic = analytic_estimator(config, args.task)

        def estimate(size: int) -> MemoryEstimate:
            return analytic(size, args.seq_len, gradient_checkpointing=args.gradient_checkpointing, **kwargs)

    estimates: dict[int, MemoryEstimate] = {}

    def remembered(size: int) -> MemoryEstimate:
        if size not in estimates:
            estimates[size] = estimate(size)
        return estimates[size]

    limit = max(1, args.batch_size // args.num_processes)
    search = max_micro_batch_for(device_memory, remembered, limit=limit, safety_margin=args.safety_margin)
    if search.size == 0:
        needed = search.probes[-1].peak_bytes
        raise ConfigError(
            f"micro-batch 1 at seq-len {args.seq_len} needs an estimated {_gib(needed)}, more than the "
            f"{_gib(search.budget)} budget of --device-memory {args.device_memory}: try --gradient-checkpointing, "
            "--mixed-precision bf16, an 8-bit --optimizer or a shorter --seq-len"
        )
    plan = plan_batch(args.batch_size, search.size, num_processes=args.num_processes,
                      allow_rounding=args.allow_batch_rounding, source="estimate",
                      probes=tuple(asdict(probe) for probe in search.probes))
    # The largest fit was evaluated by the search: reporting it costs no further trace.
    return {"plan": plan, "search": search, "estimate": remembered(search.size)}


def describe_estimate(chosen: MemoryEstimate) -> str:
    """The largest fit's memory by part, at the step's peak, with every factor stated."""
    gradients = _gib(chosen.gradients_total or chosen.gradients)
    if chosen.gradients_total > chosen.gradients:
        # the peak comes early in backward (a large vocabulary's logits), before most gradients exist
        gradients += f" ({_gib(chosen.gradients)} of them allocated at the step's peak)"
    total = f"total {_gib(chosen.total)}"
    if chosen.safety_factor != 1.0:
        total += (f" = peak {_gib(chosen.peak)} x {chosen.safety_factor:g} (the analytic formula's allowance for what "
                  "it leaves out)")
    return (f"Largest micro-batch that fits: {chosen.micro_batch_size}; weights {_gib(chosen.weights)}, gradients "
            f"{gradients}, optimizer {_gib(chosen.optimizer_state)}, activations and temporaries at the peak "
            f"{_gib(chosen.activations)}; {total}")


def estimate_main(argv: list[str] | None = None) -> int:
    """`python -m accum estimate`: print the sizes evaluated and the plan line (or the plan as
    JSON with --json). Returns 0, or 2 after printing a one-line error for bad input."""
    try:
        args = build_estimate_parser().parse_args(argv)
        result = run_estimate(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan, search, chosen = result["plan"], result["search"], result["estimate"]
    if args.json:
        print(json.dumps({**plan.to_dict(), "method": args.method, "device_memory_budget": search.budget,
                          "max_micro_batch": search.size, "estimate_at_max_micro_batch": chosen.as_dict()}, indent=2, default=str))
        return 0
    print(f"Estimate ({args.method}) for {args.model} ({args.task}), seq-len {args.seq_len}, {args.optimizer}, "
          f"precision {args.precision}; budget {_gib(search.budget)} of {args.device_memory} "
          f"({args.safety_margin:.0%} kept free)")
    print(f"{'size':>6} {'fit':>4} {'seconds':>8} {'estimate':>12}")
    for probe in sorted(search.probes, key=lambda p: p.size):
        print(f"{probe.size:>6} {'yes' if probe.fit else 'no':>4} {probe.seconds:>8.2f} {_gib(probe.peak_bytes):>12}")
    print(describe_estimate(chosen))
    print(plan.banner())
    return 0
