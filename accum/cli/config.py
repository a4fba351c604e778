"""The one typed schema of a training run: dataclass fields <- YAML <- command-line flags.

Every key of a run config is a field of `RunConfig`, every field is a flag of
scripts/train.py (`batch_size` <-> `--batch-size`), and unknown keys are errors.
Validation is pydantic's; `ConfigError` turns its report into one line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from accum.errors import ConfigError
from accum.files import FileTooLarge, read_bounded
from accum.oom import parse_memory

__all__ = ["ConfigError", "RunConfig", "build_arg_parser", "config_to_json", "load_yaml", "make_config", "parse_config"]


Auto = Literal["auto"]
# Counts pass through torch's int64 tensors (item counts, steps) and JSON readers of other languages.
INT64_MAX = 2**63 - 1
# numpy's seeding (datasets' train/eval split) takes 0 .. 2**32 - 1; torch and Python take more.
SEED_MAX = 2**32 - 1
# gloo and NCCL add the collective timeout to a steady clock counted in int64 nanoseconds.
DIST_TIMEOUT_MAX_S = INT64_MAX / 1e9
# Fields that name files or directories: `~` is expanded in them wherever they come from (a shell
# expands it on the command line, YAML does not).
PATH_FIELDS = ("model", "tokenizer", "train_file", "eval_file", "plan_cache", "output_dir", "resume_from_checkpoint")


class RunConfig(BaseModel):
    """A whole training run. Sizes are in samples; steps are optimizer steps."""

    # allow_inf_nan=False: a NaN or infinite number (`lr: .inf`, `--epochs inf`) is refused for every float
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False)

    # -- what to train ------------------------------------------------------
    task: Literal["classification", "clm"] = Field("classification", description="sequence classification or causal LM")
    model: str | None = Field(None, description="local path or hub name of a transformers model")
    model_config_overrides: dict[str, Any] | None = Field(
        None, description="build the model from this config instead of loading weights (model_type plus sizes)"
    )
    tokenizer: str | None = Field(None, description="tokenizer path or name; defaults to --model")
    trust_remote_code: bool = Field(False, description="allow code from a model repo to run (off by default)")
    dropout: float | None = Field(None, ge=0, le=1, description="override every dropout probability of the model")

    # -- data -----------------------------------------------------------------
    dataset: str | None = Field(None, description="a `datasets` name (needs the hub) instead of local files")
    train_file: str | None = Field(None, description="local csv/json/jsonl/parquet/txt file for training")
    eval_file: str | None = Field(None, description="local file for evaluation; else a split of the train file")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of the train data held out when no eval file")
    text_column: str = Field("text", description="column holding the input text")
    label_column: str = Field("label", description="column holding the class label (classification)")
    max_seq_len: int = Field(128, gt=0, description="tokens per sample, after truncation")
    max_train_samples: int | None = Field(None, gt=0, description="use only the first N training samples")
    max_eval_samples: int | None = Field(None, gt=0, description="use only the first N evaluation samples")
    packing: bool = Field(False, description="clm: join documents (EOS between them) into blocks of max_seq_len, "
                          "no padding; attention then crosses documents inside a block")

    # -- batch: any two of these determine the third ----------------------------
    batch_size: int = Field(32, gt=0, description="target effective batch: micro x accumulation x processes")
    micro_batch_size: int | Auto = Field("auto", description="samples per forward/backward per process, or auto (probe)")
    grad_accum_steps: int | Auto = Field("auto", description="micro-batches per optimizer step, or auto (derived)")
    eval_batch_size: int | Auto = Field("auto", description="evaluation batch per process, or auto (probe)")
    allow_batch_rounding: bool = Field(False, description="round a target batch that cannot be split exactly")
    cut_by: Literal["tokens", "samples"] | None = Field(
        None, description="how a window is cut into micro-batches: by a probed token budget, sorted by length "
        "(the default when micro_batch_size is auto), or by samples (the default for a given micro_batch_size)")
    micro_batch_overhead_tokens: int | None = Field(
        None, gt=0, le=10**9, description="cut by tokens: what one more micro-batch is charged, in tokens, against "
        "the padding it saves; null = 1/25 of the token budget (higher: fewer, fuller micro-batches)")
    max_memory: str | float | None = Field(
        None, description="planner memory budget: bytes ('8GiB') or a fraction of device memory (0.5); on CPU what a "
        "training step may add over what the process holds before it, on CUDA the allocator's reserved peak"
    )
    safety_margin: float = Field(0.1, ge=0, lt=1, description="share of the budget kept free by the planner")
    objective: Literal["largest", "throughput"] = Field("largest", description="planner: largest fit or fastest fit")
    plan_cache: str | None = Field(None, description="plan cache file; default ~/.cache/accum/plans.json")
    replan: bool = Field(False, description="ignore a cached plan and probe again")
    verify_plan: int = Field(
        0, ge=0, le=10_000, description="after planning, train N steps back to back at the planned micro-batch in a "
        "fresh process, stepping down until they fit (0: no check)")

    # -- optimisation -----------------------------------------------------------
    optimizer: Literal["adamw", "adamw_8bit", "lion_8bit", "sgd"] = Field("adamw", description="optimizer")
    fused_optimizer: bool | Auto = Field(
        "auto", description="AdamW on torch's fused kernel (one pass over all parameters; about 7x faster a step on "
        "a CPU): auto = where every trained parameter is a float tensor on a CPU or CUDA device")
    sparse_embedding_grads: bool | Auto = Field(
        "auto", description="embedding tables get sparse row gradients, added into a dense .grad (one micro-batch "
        "touches a few hundred of 30,522 rows): auto = with one process on a CPU or CUDA device, no FSDP/DeepSpeed, no --compile")
    lr: float = Field(1e-4, gt=0, description="learning rate at base_batch_size")
    lr_scaling: Literal["none", "linear", "sqrt"] = Field("none", description="LR rule when the batch differs from base")
    base_batch_size: int | None = Field(None, gt=0, description="batch the LR was tuned for; default batch_size")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "linear", description="decay, in optimizer steps, after the warmup (constant_with_warmup = constant)")
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimizer steps")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum")
    max_grad_norm: float | None = Field(1.0, ge=0, description="clip to this global norm; null or 0 logs the norm only")
    loss_normalization: Literal["auto", "tokens", "samples", "mean"] = Field(
        "auto", description="exact over tokens/samples of the window, or Accelerate's mean of means; auto picks by task"
    )

    # -- length -------------------------------------------------------------------
    epochs: float | None = Field(None, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; wins over epochs")

    # -- precision and speed ----------------------------------------------------------
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="no|fp16|bf16; default: what the accelerate config says"
    )
    use_amp: bool = Field(False, description="alias: mixed precision fp16 on CUDA, bf16 on CPU")
    compile: bool = Field(False, description="torch.compile the model before planning (dynamic shapes: windows cut by "
                          "length vary; inductor, or the backend the accelerate config names)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    seed: int = Field(42, ge=0, le=SEED_MAX, description="seed for weights, data order and dropout")
    num_workers: int = Field(1, ge=0, le=64, description="threads that cut and collate the next window while this "
                             "one trains (0: in the training loop; the order and the result are the same)")

    # -- output -----------------------------------------------------------------------
    output_dir: str = Field("runs/default", description="where config, plan, metrics and checkpoints go")
    overwrite: bool = Field(False, description="allow writing into an output dir that holds a finished run")
    save_every: int = Field(0, ge=0, description="checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="keep the last K checkpoints")
    resume_from_checkpoint: str | None = Field(None, description="'latest' or a checkpoint path")
    allow_batch_change: bool = Field(False, description="resume with another effective batch than the checkpoint's")
    resume_without_rng: bool = Field(
        False, description="resume from a checkpoint that lacks this rank's RNG state (the run is then not bit-exact)")
    log_every: int = Field(1, gt=0, description="console line every N optimizer steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N optimizer steps (0: only at the end)")
    report_to: Literal["tensorboard", "wandb", "none"] = Field("tensorboard", description="experiment tracker")
    skip_nonfinite: bool = Field(False, description="skip a window whose loss is NaN/inf instead of stopping")
    noise_scale: bool = Field(False, description="measure the gradient noise scale B_simple (no extra forward or backward; one read of the gradients per micro-step)")

    # -- out-of-memory recovery (accum/adaptive.py) ---------------------------------------
    oom_recovery: bool = Field(True, description="on OOM, replay the window at a smaller micro-batch (same batch)")
    memory_pressure: float | None = Field(
        None, gt=0, le=1, description="shrink the micro-batch when a window's peak passes this fraction of the budget"
    )
    regrow: int = Field(0, ge=0, description="grow the micro-batch back after N windows without pressure (0: never)")
    max_adjustments: int = Field(8, ge=0, description="at most N memory-pressure/regrow adjustments in a run")

    # -- accumulation schedules (accum/schedule.py): the micro-batch stays, accumulation changes -----
    accumulation_schedule: dict[int, int] | None = Field(
        None, description="effective batch by samples (or tokens) seen, e.g. {0: 32, 20000: 64}; LR schedule in samples"
    )
    schedule_unit: Literal["samples", "tokens"] = Field("samples", description="what accumulation_schedule keys count")
    batch_ramp: str | None = Field(None, description="start,end,over_samples: linear batch ramp rounded to valid splits")
    adaptive_batch: Literal["none", "noise"] = Field("none", description="noise: grow the batch toward B_simple")
    adaptive_batch_min: int | None = Field(None, gt=0, description="noise-driven batch: first and smallest (default batch_size)")
    adaptive_batch_max: int | None = Field(None, gt=0, description="noise-driven batch: largest (default 8 x the minimum)")
    adaptive_batch_cooldown: int = Field(20, ge=0, description="noise-driven batch: optimizer steps between changes")
    adaptive_batch_growth: Literal["power_of_two", "multiple"] = Field(
        "power_of_two", description="noise-driven batch: double, or jump to the nearest valid split below B_simple"
    )
    max_samples: int | None = Field(None, gt=0, description="stop after N samples (with max_steps: whichever first)")

    # -- faults (scripts/train.py, accum/signals.py) ---------------------------------------------
    dist_timeout_s: float = Field(
        1800, gt=0, le=DIST_TIMEOUT_MAX_S, description="seconds a rank waits for the others in a collective before it stops with an error"
    )

    @field_validator("micro_batch_size", "grad_accum_steps", "eval_batch_size")
    @classmethod
    def _positive_or_auto(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) <= 0:
            raise ValueError("must be a positive integer or 'auto'")
        return value

    @field_validator("lr_scheduler", mode="before")
    @classmethod
    def _transformers_scheduler_name(cls, value: Any) -> Any:
        # TrainingArguments' name for what `constant` is here: constant after warmup_steps of linear warmup
        return "constant" if value == "constant_with_warmup" else value

    @field_validator(*PATH_FIELDS)
    @classmethod
    def _home_expanded(cls, value: str | None) -> str | None:
        return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value

    @field_validator("output_dir")
    @classmethod
    def _output_dir_named(cls, value: str) -> str:
        if not value.strip():  # '' would mean the current directory, by accident
            raise ValueError("is empty: name a directory, e.g. runs/mine")
        return value

    @field_validator("max_memory")
    @classmethod
    def _memory_parses(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_memory(value)
        return value

    @field_validator("*")
    @classmethod
    def _counts_fit_in_64_bits(cls, value: Any) -> Any:
        numbers = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        if any(isinstance(n, int) and not isinstance(n, bool) and abs(n) > INT64_MAX for n in numbers):
            raise ValueError("does not fit in 64 bits")
        return value

    @model_validator(mode="after")
    def _has_model_and_data(self) -> RunConfig:
        if self.model is None and self.model_config_overrides is None:
            raise ValueError("give `model` (a path or name) or `model_config_overrides` (build from a config)")
        return self

    def resolved_loss_normalization(self) -> str:
        """tokens for clm, samples for classification, unless the config names one."""
        if self.loss_normalization != "auto":
            return self.loss_normalization
        return "tokens" if self.task == "clm" else "samples"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types a field accepts (Literal values count as their type)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return set().union(*(_scalar_types(arg) for arg in typing.get_args(annotation)))
    if origin is Literal:
        return {type(arg) for arg in typing.get_args(annotation)}
    if annotation is type(None):
        return set()
    return {origin or annotation}


def _parse_cli_value(raw: str, annotation: Any) -> Any:
    """Turn a flag's text into the field's type; pydantic then validates it."""
    kinds = _scalar_types(annotation)
    if raw.lower() in ("null", "none") and type(None) in typing.get_args(annotation):
        return None
    if dict in kinds:
        try:
            return parse_yaml(raw)
        except ConfigError as exc:
            raise ConfigError(f"{raw[:80]!r} is not a YAML mapping: {exc}") from None
    if bool in kinds and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
        return raw.lower() in ("true", "1", "yes")
    for kind in (int, float):
        if kind in kinds:
            try:
                return kind(raw)
            except ValueError:
                pass
    return raw


# Other spellings of a key, as flags. accum's own older names, then Transformers' TrainingArguments
# (and its example scripts) where the meaning is the same; README.md lists them. A flag may also be
# written with underscores (`--max_steps`): OneLineParser reads it as `--max-steps`.
ALIASES = {"target_batch_size": "batch_size", "resume": "resume_from_checkpoint"}
TRAINING_ARGUMENTS_ALIASES = {
    "learning_rate": "lr",
    "gradient_accumulation_steps": "grad_accum_steps",
    "per_device_train_batch_size": "micro_batch_size",  # samples per forward/backward per process: the micro-batch
    "per_device_eval_batch_size": "eval_batch_size",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "save_total_limit": "keep_checkpoints",
    "eval_steps": "eval_every",
    "dataloader_num_workers": "num_workers",
    "model_name_or_path": "model",
    "tokenizer_name": "tokenizer",
    "validation_file": "eval_file",
    "max_seq_length": "max_seq_len",
}
# `--bf16` / `--fp16` (TrainingArguments' switches) set `mixed_precision`.
PRECISION_SWITCHES = ("bf16", "fp16")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with `(default: X)` only where a default exists: a flag whose default is None or
    False says nothing (its help says what happens without it) instead of `(default: None)`."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings and action.nargs != 0:
            return f"{text} (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (ConfigError, exit code 2) instead of usage text, and
    an unknown flag names the closest known one. A flag written with underscores where the parser
    knows it with dashes (or the other way round) is read as the one it knows, so `--max_steps`
    (Transformers' spelling) is `--max-steps`."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        ends = args.index("--") if "--" in args else len(args)  # after `--` nothing is a flag
        return super().parse_known_args([self._known_spelling(arg) for arg in args[:ends]] + args[ends:], namespace)

    def _known_spelling(self, arg: str) -> str:
        if not arg.startswith("--") or arg == "--":
            return arg
        flag, equals, value = arg.partition("=")
        if flag in self._option_string_actions:
            return arg
        for other in ("--" + flag[2:].replace("_", "-"), "--" + flag[2:].replace("-", "_")):
            if other in self._option_string_actions:
                return other + equals + value
        return arg

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            unknown = message.split(":", 1)[1].split()[0]
            flag = unknown.split("=", 1)[0]
            close = difflib.get_close_matches(flag, self._all_option_strings(), n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; see `{self.prog} --help`"
            raise ConfigError(f"{self.prog}: unknown flag {flag}{hint}")
        raise ConfigError(f"{self.prog}: {message}")

    def _all_option_strings(self) -> list[str]:
        """This parser's flags and its subcommands' (argparse reports a subcommand's unknown flag here)."""
        names = list(self._option_string_actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    names += list(sub._option_string_actions)
        return names


def flags_in(message: str) -> str:
    """A library message with its parameter names in backticks (`batch_size`) turned into this
    command line's flags (--batch-size), for the keys a run config has."""
    return re.sub(r"`([a-z_]+)`", lambda m: _flag(m.group(1)) if m.group(1) in RunConfig.model_fields else m.group(0),
                  message)


def _choices(annotation: Any) -> list[Any]:
    """The values a Literal field (or a Literal inside a union) allows, in order."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return list(typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        return [value for arg in typing.get_args(annotation) for value in _choices(arg)]
    return []


# What a value is, where its type alone does not say.
_METAVARS = {"max_memory": "SIZE|FRACTION", "model": "PATH|NAME", "tokenizer": "PATH|NAME", "dataset": "NAME",
             "train_file": "PATH", "eval_file": "PATH", "plan_cache": "PATH", "output_dir": "PATH",
             "resume_from_checkpoint": "latest|PATH", "batch_ramp": "START,END,SAMPLES"}


def _metavar(annotation: Any) -> str:
    """What a flag's value looks like in --help: {a,b} for a choice, N|auto, true|false, a type name."""
    kinds, choices = _scalar_types(annotation), _choices(annotation)
    if kinds == {bool}:
        return "true|false"
    if choices and kinds <= {str}:
        return "{" + ",".join(str(value) for value in choices) + "}"
    words = [{int: "N", float: "X", str: "TEXT", dict: "MAPPING"}.get(kind, "VALUE") for kind in (int, float, dict, str)
             if kind in kinds and not (kind is str and choices)]
    if int in kinds and float in kinds:
        words.remove("N")
    return "|".join(words + [str(value) for value in choices if isinstance(value, str)])


def field_help(name: str) -> str:
    """A key's help: its description and its default where it has one (None means: the description says
    what happens without it)."""
    field = RunConfig.model_fields[name]
    text = field.description or ""
    if field.default is not None and "default" not in text:
        default = field.default
        shown = str(default).lower() if isinstance(default, bool) else default
        text += f" (default: {shown})"
    return text.replace("%", "%%")


class _FlagsFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {flags_in(record.getMessage())}"


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to sys.stderr as it is when a record comes, not as it was when the handler
    was made: a caller that redirects stderr (contextlib.redirect_stderr, a test's capture) sees the line."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def show_library_warnings() -> None:
    """The library's warnings (accum's loggers: a plan cache entry that is invalid, a batch rounded) on
    stderr, one line each, with parameter names turned into this command line's flags. Idempotent."""
    logger = logging.getLogger("accum")
    if not any(isinstance(handler.formatter, _FlagsFormatter) for handler in logger.handlers):
        handler = _CurrentStderr()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(_FlagsFormatter())
        logger.addHandler(handler)


def build_arg_parser(description: str = "") -> argparse.ArgumentParser:
    """A parser with --config and one flag per RunConfig field, help text, defaults and choices from the
    schema; the aliases above; `--bf16`/`--fp16`. Errors are one line (OneLineParser)."""
    parser = OneLineParser(
        prog="scripts/train.py", description=description,
        usage="%(prog)s [--config FILE] [--KEY VALUE ...]  (every config key is a flag)",
        epilog="Flags override the --config file's keys. Every flag also works with underscores (--max_steps). "
               "A second spelling after a flag is Transformers' TrainingArguments name for the same setting "
               "(--per_device_train_batch_size is the micro-batch); --bf16 / --fp16 are --mixed-precision "
               "bf16 / fp16.")
    parser.add_argument("--config", metavar="FILE", help="run config YAML; flags override its keys")
    parser.add_argument("--debug", action="store_true",
                        help="on a failure, print the traceback before its one line (not a config key)")
    for name, field in RunConfig.model_fields.items():
        aliases = {**ALIASES, **TRAINING_ARGUMENTS_ALIASES}
        flags = [_flag(name)] + ["--" + alias if alias in TRAINING_ARGUMENTS_ALIASES else _flag(alias)
                                 for alias, target in aliases.items() if target == name]
        if field.annotation is bool:
            parser.add_argument(*flags, dest=name, nargs="?", const="true", default=None, metavar="true|false",
                                help=field_help(name))
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=_METAVARS.get(name, _metavar(field.annotation)),
                                help=field_help(name))
    for switch in PRECISION_SWITCHES:
        parser.add_argument(f"--{switch}", dest=f"precision_{switch}", nargs="?", const="true", default=None,
                            metavar="true|false", help=f"TrainingArguments' switch: --mixed-precision {switch}")
    return parser


def format_validation_error(exc: ValidationError) -> str:
    """pydantic's report as one line: `key: problem (got value)`; the first problem only."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("int", "literal", "str")))
    if error["type"] == "extra_forbidden":
        close = _closest_key(key)
        hint = f"; did you mean {close!r}?" if close else "; see `scripts/train.py --help` for the keys"
        return f"unknown config key {key!r}{hint}"
    got = error.get("input")
    message = error["msg"].replace("Value error, ", "")
    where = f"{key}: " if key else ""
    return f"{where}{message} (got {got!r})"[:400]


def _closest_key(key: str) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(RunConfig.model_fields), n=1)
    return matches[0] if matches else None


# A run config is a few dozen keys (the largest file in configs/ has 64 YAML nodes), a sweep
# grid or a batch schedule a few thousand at most. An alias bomb expands a few hundred bytes into
# billions of nodes (and gigabytes once validated): the expanded size is counted before anything is built.
MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB; read in bounded chunks (a FIFO has no size)


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (YAML keeps the last silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then overriding a key is YAML's own idiom
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (lines {seen[key]} and "
                                  f"{key_node.start_mark.line + 1}): keep one")
        except TypeError:  # an unhashable key: the constructor below says so
            continue
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes of the document once every alias is replaced by what it names (shared nodes counted
    each time they are used). Raises ConfigError for an alias that contains itself."""
    if id(node) in open_nodes:
        raise ConfigError("an alias refers to a node that contains it: remove the recursive anchor")
    if id(node) not in memo:
        open_nodes.add(id(node))
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [part for pair in node.value for part in pair] if isinstance(node, yaml.MappingNode) else [])
        memo[id(node)] = 1 + sum(_expanded_nodes(child, memo, open_nodes) for child in children)
        open_nodes.discard(id(node))
    return memo[id(node)]


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, refusing (ConfigError, one line) malformed YAML, a key given twice
    and documents that expand past MAX_YAML_NODES nodes (alias bombs)."""
    loader = None
    try:
        loader = _StrictLoader(text)  # its reader refuses control characters here
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > MAX_YAML_NODES:
            raise ConfigError(f"expands to more than {MAX_YAML_NODES} values (aliases repeat what they name): "
                              "write the values out, or split the file")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        detail = getattr(exc, "problem", None) or str(exc).splitlines()[0]  # ReaderError has no .problem
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{detail}{where}") from None
    except RecursionError:
        raise ConfigError("nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a run config file into a dict. Raises ConfigError on a missing, oversized or malformed file
    (bad YAML, a key given twice, an alias bomb)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: check the path given to --config")
    try:
        text = read_bounded(path, MAX_CONFIG_BYTES).decode()
        data = parse_yaml(text)
    except FileTooLarge:
        raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES // 1024} KiB: a run config "
                          "is a few KiB; check the path given to --config") from None
    except (ConfigError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate a dict into a RunConfig. Raises ConfigError with one line."""
    try:
        return RunConfig(**{str(k): v for k, v in values.items()})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    except TypeError as exc:  # e.g. a non-string key
        raise ConfigError(f"config keys must be names: {exc}") from None


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, set[str]]:
    """Config file, then flags. Returns the config and the set of keys given on the command line.
    Raises ConfigError (one line) for an unknown flag, a bad value or a bad file."""
    parser = build_arg_parser("Fine-tune a transformers model with exact gradient accumulation.")
    args = parser.parse_args(argv)
    values = load_yaml(args.config) if args.config else {}
    cli: dict[str, Any] = {}
    for name, field in RunConfig.model_fields.items():
        raw = getattr(args, name)
        if raw is not None:
            cli[name] = _parse_cli_value(raw, field.annotation)
    switched = [switch for switch in PRECISION_SWITCHES if _switch_on(switch, getattr(args, f"precision_{switch}"))]
    if len(switched) > 1:
        raise ConfigError("--bf16 and --fp16 both given: choose one")
    if switched:
        if cli.get("mixed_precision", switched[0]) != switched[0]:
            raise ConfigError(f"--{switched[0]} and --mixed-precision {cli['mixed_precision']} disagree: give one")
        cli["mixed_precision"] = switched[0]
    values.update(cli)
    return make_config(values), set(cli)


def _switch_on(name: str, raw: str | None) -> bool:
    """A `--bf16 [true|false]` switch: True when given and true. Raises ConfigError for another value."""
    if raw is None:
        return False
    value = _parse_cli_value(raw, bool)
    if not isinstance(value, bool):
        raise ConfigError(f"--{name} {raw!r}: give true or false (or the flag alone)")
    return value


def config_to_json(config: RunConfig) -> str:
    """The resolved config as JSON text (what is saved next to every run)."""
    return json.dumps(config.model_dump(), indent=2, sort_keys=True)
