"""Every YAML in configs/ and accelerate_configs/ parses, names only things that exist, and runs as it says."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from accum.cli import data as data_lib
from accum.cli import models
from accum.cli.config import RunConfig, load_yaml, make_config

ROOT = Path(__file__).resolve().parents[1]
RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
EXPECTED_ACCELERATE = {"cpu", "multi_cpu_2proc", "single_gpu", "multi_gpu", "fp16", "bf16", "fsdp",
                       "deepspeed_zero2", "multi_node"}


def ids(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def commands_in(path: Path) -> list[str]:
    """The shell commands quoted in a file's comments (lines holding `accelerate launch` or `python`)."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    return [line for line in lines if re.search(r"\baccelerate launch\b|\bpython\b", line)]


def files_named_by(command: str) -> list[str]:
    """Repo files a command refers to: the values of --config_file/--config and the script."""
    words = shlex.split(command)
    named = [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("--config_file", "--config")]
    return named + [word for word in words if word.endswith(".py")]


def test_the_expected_files_exist():
    assert {path.stem for path in ACCELERATE_CONFIGS} >= EXPECTED_ACCELERATE
    assert {"default", "clm_tiny", "classification_tiny"} <= {path.stem for path in RUN_CONFIGS}


# -- run configs ------------------------------------------------------------------------------


def is_train_config(path: Path) -> bool:
    return "scripts/train.py" in path.read_text().splitlines()[0]


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=ids(RUN_CONFIGS))
def test_run_config_begins_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# "), f"{path.name} must begin with a comment holding the command that runs it"
    command = first[2:]
    assert f"--config configs/{path.name}" in command
    for named in files_named_by(command):
        assert (ROOT / named).is_file(), f"{path.name}: its command names {named}, which does not exist"


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if is_train_config(p)],
                         ids=ids([p for p in RUN_CONFIGS if is_train_config(p)]))
def test_run_config_is_valid_and_names_existing_things(path):
    config = make_config(load_yaml(path))  # unknown keys and bad values raise ConfigError
    assert isinstance(config, RunConfig)
    for key in ("train_file", "eval_file"):
        value = getattr(config, key)
        if value and not value.startswith("builtin:"):
            assert (ROOT / value).is_file(), f"{path.name}: {key} {value} does not exist"
    for key in ("model", "tokenizer"):
        value = getattr(config, key)
        if value and (value.startswith("pkg://") or value.startswith((".", "/")) or value.count("/") > 1):
            assert Path(models.resolve_model_path(value)).exists()
    for command in commands_in(path):
        for named in files_named_by(command):
            assert (ROOT / named).is_file(), f"{path.name}: a command names {named}, which does not exist"


@pytest.mark.parametrize("path", [p for p in RUN_CONFIGS if is_train_config(p)],
                         ids=ids([p for p in RUN_CONFIGS if is_train_config(p)]))
def test_run_config_data_loads_and_tokenizes(path, monkeypatch):
    # Relative data paths are meant from the repo root, where the commands run.
    monkeypatch.chdir(ROOT)
    config = make_config(load_yaml(path))
    tokenizer = models.build_tokenizer(config)
    train_raw, eval_raw = data_lib.load_splits(config)
    train, held_out, info = data_lib.tokenize_splits(config, tokenizer, train_raw, eval_raw)
    assert len(train) >= config.batch_size and held_out is not None and len(held_out) > 0
    if config.task == "classification":
        assert info.num_labels >= 2
    if config.model_config_overrides is not None:  # cheap to build: check the model accepts a batch
        model = models.build_model(config, info.num_labels, tokenizer=tokenizer, id2label=info.id2label)
        batch = data_lib.make_collate(config.task, tokenizer.pad_token_id)([train[i] for i in range(2)])
        assert model(**batch).loss.isfinite()


# -- accelerate configs -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=ids(ACCELERATE_CONFIGS))
def test_accelerate_config_parses_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    config = load_config_from_file(str(path))  # raises on keys accelerate does not know
    assert config.num_processes >= 1
    # Nested plugin settings become launch flags: each must be one that `accelerate launch` has.
    flags = {action.dest for action in launch_command_parser()._actions}
    raw = yaml.safe_load(path.read_text())
    for section in ("fsdp_config", "deepspeed_config"):
        unknown = set(raw.get(section) or {}) - flags
        assert not unknown, f"{path.name}: {section} keys accelerate does not know: {sorted(unknown)}"


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=ids(ACCELERATE_CONFIGS))
def test_accelerate_config_says_when_and_how(path):
    text = path.read_text()
    assert text.startswith("# "), f"{path.name} must begin with a comment saying when to use it"
    commands = commands_in(path)
    assert any(f"--config_file accelerate_configs/{path.name}" in command for command in commands)
    for command in commands:
        for named in files_named_by(command):
            assert (ROOT / named).is_file(), f"{path.name}: its command names {named}, which does not exist"


@pytest.mark.slow
def test_multi_cpu_2proc_really_starts_two_ranks():
    path = ROOT / "accelerate_configs" / "multi_cpu_2proc.yaml"
    # The file's own command sets ACCELERATE_USE_CPU=1: without it the 2 processes each see a world of 1.
    assert any(command.startswith("ACCELERATE_USE_CPU=1 ") for command in commands_in(path))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path),
         str(ROOT / "tests" / "helpers" / "print_world.py")],
        capture_output=True, text=True, timeout=180, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # The two ranks write at once, so lines can interleave: match records, not lines.
    ranks = sorted(re.findall(r"rank=(\d+) world=(\d+) type=(\w+)", result.stdout))
    assert ranks == [("0", "2", "MULTI_CPU"), ("1", "2", "MULTI_CPU")], result.stdout


@pytest.mark.parametrize("name", ["clm_tiny", "classification_tiny"])
def test_tiny_configs_really_accumulate_and_state_their_plan(name):
    from accum.cli.planning import resolve_batch_flags

    path = ROOT / "configs" / f"{name}.yaml"
    stated = re.search(r"^# Plan: (\d+) = (\d+) micro x (\d+) accum x 1 process", path.read_text(), re.M)
    assert stated, f"{path.name} must state its plan in its header"
    target, micro, accum, _ = resolve_batch_flags(make_config(load_yaml(path)), set(), 1)  # no probe: micro is fixed
    assert (target, micro, accum) == tuple(int(group) for group in stated.groups())
    assert accum >= 2
