"""`python -m accum plan|estimate|recommend`: a plan for people who only want one.

    python -m accum plan --model configs/models/tiny-gpt2.json --seq-len 128 --batch-size 256
    python -m accum plan --model gpt2-tiny --seq-len 128 --batch-size 256 --json
    python -m accum estimate ...      (accum/estimate.py; plans without running anything)
    python -m accum recommend --run runs/clm_tiny   (a batch near the measured noise scale)
    python -m accum launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config ...
                                      (`accelerate launch`, configs checked first, exit codes kept)

Bad input prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from accum.config import ConfigError

# A GPT-2 small enough to probe in seconds on a laptop CPU.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 1024,
                  "bos_token_id": 0, "eos_token_id": 0},
}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is a ConfigError (one line, exit code 2) instead of usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m accum", description="Plan micro-batch and accumulation for a target batch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    plan = commands.add_parser("plan", help="probe real steps and print the plan")
    plan.add_argument("--model", required=True,
                      help="a local model directory, a JSON file of a transformers config, inline JSON, "
                           f"or one of: {', '.join(BUILTIN_CONFIGS)}")
    plan.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sample")
    plan.add_argument("--batch-size", "--target-batch-size", dest="batch_size", type=_positive_int, required=True,
                      help="target effective batch: micro x accumulation x processes")
    plan.add_argument("--max-memory", default=None, help="budget: bytes ('8GiB') or a fraction of device memory (0.5)")
    plan.add_argument("--safety-margin", type=float, default=0.1, help="share of the budget kept free")
    plan.add_argument("--objective", default="largest", help="largest | throughput")
    plan.add_argument("--num-processes", type=_positive_int, default=None,
                      help="plan for this many processes (default: this launch's)")
    plan.add_argument("--optimizer", default="adamw", help="adamw | sgd: the step probed includes its state")
    plan.add_argument("--allow-rounding", action="store_true", help="round a target that cannot be split exactly")
    plan.add_argument("--replan", action="store_true", help="ignore a cached plan")
    plan.add_argument("--cache", default=None, help="plan cache file (default ~/.cache/accum/plans.json)")
    plan.add_argument("--no-cache", action="store_true", help="neither read nor write the plan cache")
    plan.add_argument("--json", action="store_true", help="print the Plan as JSON")
    plan.add_argument("--seed", type=int, default=0, help="seed for weights and random tokens")
    recommend = commands.add_parser("recommend", help="an effective batch near the measured noise scale of a run")
    recommend.add_argument("--run", required=True, help="output dir of a scripts/train.py run made with --noise-scale")
    recommend.add_argument("--lr-scaling", default=None, help="none | linear | sqrt (default: the run's rule, else sqrt)")
    recommend.add_argument("--rounding", default="multiple", help="multiple (of micro x processes) | power_of_two")
    recommend.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    # Listed for --help; `launch` takes accelerate launch's arguments and is dispatched before parsing.
    commands.add_parser("launch", add_help=False,
                        help="accelerate launch with the configs checked first and the script's exit code kept")
    return parser


def load_model(spec: str):
    """A causal LM from a model directory (with weights), or random weights from a config JSON file,
    inline JSON or a built-in name (parsed by accum.estimate.load_model_config, shared with `estimate`).
    Raises ConfigError when the spec is none of these."""
    from transformers import AutoModelForCausalLM

    from accum.estimate import load_model_config

    if Path(spec).is_dir():
        return AutoModelForCausalLM.from_pretrained(spec)
    config = load_model_config(spec)
    try:
        return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--model {spec!r}: cannot build a causal LM: {str(exc).splitlines()[0]}") from None


def _token_batches(vocab_size: int, seq_len: int, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)

    def make_batch(size: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab_size, (size, seq_len), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    return make_batch


def run_plan(args: argparse.Namespace) -> int:
    import torch

    from accum.plan import per_process_limit
    from accum.probe import OBJECTIVES, format_probe_table, memory_budget, plan_for

    if args.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {args.objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    if args.optimizer not in ("adamw", "sgd"):
        raise ConfigError(f"--optimizer {args.optimizer!r} is unknown: use adamw or sgd")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bad input fails before the model loads
    memory_budget(args.max_memory, args.safety_margin, device)
    per_process_limit(args.batch_size, args.num_processes or 1, args.allow_rounding)
    torch.manual_seed(args.seed)
    model = load_model(args.model).to(device)
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and args.seq_len > limit:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the model's {limit} positions: use {limit} or less")
    optimizer_type = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    optimizer = optimizer_type(model.parameters(), lr=1e-4)
    plan = plan_for(
        None,
        model,
        _token_batches(model.config.vocab_size, args.seq_len, args.seed),
        args.batch_size,
        optimizer=optimizer,
        max_memory=args.max_memory,
        safety_margin=args.safety_margin,
        objective=args.objective,
        cache_path=False if args.no_cache else args.cache,
        replan=args.replan,
        allow_rounding=args.allow_rounding,
        progress=not args.json,
        num_processes=args.num_processes or 1,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    if plan.probes:
        print(format_probe_table(list(plan.probes)))
    else:
        print("(plan from the cache, no probes; --replan probes again)")
    print(f"device {device}, seq len {args.seq_len}, optimizer {args.optimizer}, source {plan.source}")
    print(plan.banner())
    return 0


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: --run must be the output dir of a finished scripts/train.py run") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc})") from None


def recommend_from_run(run_dir: str | Path, lr_scaling: str | None = None, rounding: str = "multiple") -> dict[str, Any]:
    """Read a --noise-scale run's B_simple and return the suggested effective batch, its plan and LR.

    B_simple is in the run's loss items (tokens or samples); tokens are converted to samples
    with the run's mean tokens per sample. Raises ConfigError when the run has no B_simple.
    """
    from accum.noise import recommend_batch
    from accum.plan import Plan, plan_batch
    from accum.scaling import scale_lr

    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json", "run config")
    plan = Plan.from_dict(_read_json(run_dir / "plan.json", "plan"))
    metrics = _read_json(run_dir / "metrics.json", "metrics")
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = [step["noise_b_simple"] for step in steps if step.get("noise_b_simple")]
    if not measured:
        raise ConfigError(f"run {str(run_dir)!r} has no noise scale: train with --noise-scale and accumulation >= 2 "
                          "(or 2+ processes) for at least 10 optimizer steps")
    b_simple = float(measured[-1])
    tokens = config.get("task") == "clm" and config.get("loss_normalization") in ("auto", "tokens")
    items_per_sample = metrics["tokens_seen"] / max(metrics["samples_seen"], 1) if tokens else 1.0
    batch = recommend_batch(b_simple, plan.micro_batch_size, plan.num_processes,
                            items_per_sample=items_per_sample, rounding=rounding)
    new_plan = plan_batch(batch, plan.micro_batch_size, plan.num_processes, allow_rounding=True, source="recommend")
    rule = lr_scaling or (config.get("lr_scaling") if config.get("lr_scaling") != "none" else "sqrt")
    lr = scale_lr(metrics.get("lr") or config["lr"], plan.effective_batch_size, new_plan.effective_batch_size, rule)
    return {"b_simple_items": b_simple, "items": "tokens" if tokens else "samples",
            "b_simple_samples": b_simple / items_per_sample, "current_batch": plan.effective_batch_size,
            "recommended_batch": new_plan.effective_batch_size, "plan": new_plan.to_dict(), "banner": new_plan.banner(),
            "lr": lr.lr, "lr_rule": rule, "lr_description": lr.describe()}


def run_recommend(args: argparse.Namespace) -> int:
    try:
        result = recommend_from_run(args.run, args.lr_scaling, args.rounding)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"B_simple: {result['b_simple_items']:.0f} {result['items']} = {result['b_simple_samples']:.1f} samples "
          f"(the run used an effective batch of {result['current_batch']})")
    print(f"Recommended: {result['banner']}")
    print(f"LR: {result['lr_description']}")
    return 0


def run_estimate(argv: list[str]) -> int:
    try:
        from accum.estimate import estimate_main
    except ImportError as exc:
        print(f"accum estimate is not available in this install ({exc})", file=sys.stderr)
        return 1
    return int(estimate_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m accum`. Returns the exit code: 0, 2 for bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "estimate":
            return run_estimate(argv[1:])
        if argv and argv[0] == "launch":
            from accum.launch import launch_main

            return launch_main(argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            build_parser().print_help()
            return 0 if argv else 2
        args = build_parser().parse_args(argv)
        return run_recommend(args) if args.command == "recommend" else run_plan(args)
    except ConfigError as exc:
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
