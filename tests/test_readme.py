"""README, Makefile, .ci/run and the config schema agree."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accum.cli.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_config_key_has_its_flag_in_the_readme():
    for name in RunConfig.model_fields:
        assert f"`--{name.replace('_', '-')}` (`{name}`)" in README, name


def test_the_flag_table_shows_the_schemas_defaults_and_choices_and_the_transformers_spellings():
    from accum.cli.config import TRAINING_ARGUMENTS_ALIASES, _choices

    table = README.split("### Every flag", 1)[1].split("###", 1)[0]
    rows = {line.split("`")[1]: line for line in table.splitlines() if line.startswith("| `--")}
    for name, field in RunConfig.model_fields.items():
        row = rows["--" + name.replace("_", "-")]
        default = "-" if field.default is None else str(field.default).lower() if isinstance(field.default, bool) \
            else str(field.default)
        assert row.split("|")[2].strip() == f"`{default}`", (name, row)
        for choice in _choices(field.annotation):
            assert f"`{choice}`" in row or choice == "auto", (name, choice)
    for alias, target in TRAINING_ARGUMENTS_ALIASES.items():
        assert f"| `--{alias}` | `--{target.replace('_', '-')}` |" in README, alias


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_one():
    assert "make train" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("install", "train", "test", "sweep", "bench", "lint"):
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "torch==2.13.0" in makefile


def test_no_placeholder_left_in_readme():
    for marker in ("FLAGS_TABLE", "EXAMPLE\n", "SWEEP_SECTION", "BENCH_SECTION", "MEASURED\n"):
        assert marker not in README, marker


def library_example() -> str:
    return README.split("## The library", 1)[1].split("```python", 1)[1].split("```", 1)[0]


def first_window_truth() -> tuple[float, int]:
    """The example's first window, computed here without accum's loop: the mean next-token loss over
    every token of the 32 samples (both ranks' shares) and their token count, with the same weights."""
    import torch.nn.functional as F

    namespace: dict = {}
    setup = library_example().split("# 1.", 1)[0]  # imports, model, data and collate: nothing trained yet
    exec(compile(setup.replace("accelerator = Accelerator()", ""), "readme-setup", "exec"), namespace)
    data, model = namespace["data"], namespace["model"]
    from accum import WindowSampler

    window = WindowSampler(len(data), 32, seed=0).next_window()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in window:  # one sample at a time: no padding, no batching shared with the library
            ids = torch.tensor([data[i]["input_ids"]])
            logits = model(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            tokens += ids.shape[1]
    return total / sum(len(data[i]["input_ids"]) - 1 for i in window), tokens


def step_lines(stdout: str) -> list[dict]:
    rows = []
    for line in stdout.splitlines():
        if line.startswith("step "):
            words = line.split()
            rows.append({"step": int(words[1]), "loss": float(words[3]), "samples": int(words[5]),
                         "tokens": int(words[7])})
    return rows


@pytest.mark.slow
def test_readme_library_example_is_exact_on_one_process_and_on_two_ranks(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(library_example())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accum", "launch", "--config_file",
                          "accelerate_configs/multi_cpu_2proc.yaml", str(script)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "Effective batch size: 32 = 32 micro x 1 accum x 1 process" in one.stdout
    assert "Effective batch size: 32 = 16 micro x 1 accum x 2 processes" in two.stdout
    assert two.stdout.count("Effective batch size") == 1  # printed by the main process only
    loss, tokens = first_window_truth()
    for run in (one, two):
        rows = step_lines(run.stdout)
        assert [r["step"] for r in rows] == list(range(1, 9))  # 256 samples in windows of 32
        assert all(r["samples"] == 32 for r in rows)
        assert rows[0]["tokens"] == tokens  # both ranks' tokens, agreed over the ranks
        assert rows[0]["loss"] == pytest.approx(loss, rel=1e-5), (rows[0], loss)
    # the same windows train the same way on one process and on two
    for a, b in zip(step_lines(one.stdout), step_lines(two.stdout), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
