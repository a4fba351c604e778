"""README, Makefile, .ci/run and the config schema agree."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from accum.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_config_key_has_its_flag_in_the_readme():
    for name in RunConfig.model_fields:
        assert f"`--{name.replace('_', '-')}` (`{name}`)" in README, name


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


@pytest.mark.slow
def test_readme_library_example_runs_as_written(tmp_path):
    code = README.split("## The library", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code)
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Effective batch size: 32 =" in result.stdout
    losses = [float(line) for line in result.stdout.splitlines()[-3:]]
    assert all(5.0 < loss < 8.0 for loss in losses)  # ln(1000) = 6.9 for an untrained model
