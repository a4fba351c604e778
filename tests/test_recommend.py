"""`python -m accum recommend --run DIR`: a batch near the run's measured B_simple."""

import json
import shlex
from pathlib import Path

from accum.cli.main import main, recommend_from_run
from accum.plan import plan_from_accumulation


def make_run(tmp_path, task="classification", b_simple=100.0, tokens_per_sample=1):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"task": task, "loss_normalization": "auto", "lr": 1e-3,
                                                  "lr_scaling": "none"}))
    (run / "plan.json").write_text(json.dumps(plan_from_accumulation(4, 2, 1).to_dict()))
    (run / "metrics.json").write_text(json.dumps({"lr": 1e-3, "samples_seen": 100,
                                                   "tokens_seen": 100 * tokens_per_sample}))
    steps = [{"optimizer_step": i, "noise_b_simple": None if i < 3 else b_simple} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return run


def test_recommends_a_reachable_batch_near_b_simple_with_sqrt_lr(tmp_path):
    result = recommend_from_run(make_run(tmp_path, b_simple=130.0))
    assert result["recommended_batch"] == 132  # nearest multiple of 4 micro x 1 process
    assert result["plan"]["micro_batch_size"] == 4
    assert abs(result["lr"] - 1e-3 * (132 / 8) ** 0.5) < 1e-12 and result["lr_rule"] == "sqrt"


def test_token_noise_scale_is_converted_to_samples(tmp_path):
    result = recommend_from_run(make_run(tmp_path, task="clm", b_simple=640.0, tokens_per_sample=20))
    assert result["items"] == "tokens" and result["b_simple_samples"] == 32.0
    assert result["recommended_batch"] == 32


def test_run_without_noise_scale_is_one_line_exit_2(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "metrics.jsonl").write_text(json.dumps({"optimizer_step": 1, "noise_b_simple": None}) + "\n")
    assert main(["recommend", "--run", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--noise-scale" in err
    assert main(["recommend", "--run", str(tmp_path / "missing")]) == 2


ROOT = Path(__file__).resolve().parents[1]


def walk_through_commands() -> list[str]:
    section = (ROOT / "README.md").read_text().split("### Noise scale walk-through", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_the_readmes_noise_scale_walk_through_works_as_written(tmp_path, monkeypatch, capsys):
    """Train a few steps with --noise-scale, then recommend and report, as the README says (in this
    process, with the run in tmp_path instead of runs/clm_tiny); the numbers it quotes are these."""
    from scripts.train import main as train_main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "clm_tiny"
    commands = walk_through_commands()
    assert [c.split()[:3] for c in commands] == [["python", "scripts/train.py", "--config"],
                                                ["python", "-m", "accum"], ["python", "-m", "accum"]]
    assert train_main(shlex.split(commands[0])[2:] + ["--output-dir", str(out)]) == 0
    trained = capsys.readouterr().out
    assert "Effective batch size: 16 = 4 micro x 4 accum x 1 process" in trained
    for command in commands[1:]:
        argv = [str(out) if word == "runs/clm_tiny" else word for word in shlex.split(command)[3:]]
        assert main(argv) == 0, command
    said = capsys.readouterr().out
    readme = " ".join((ROOT / "README.md").read_text().split())
    quoted = readme.split("### Noise scale walk-through", 1)[1]
    for line in (trained + said).splitlines():
        if line.startswith(("noise scale: B_simple", "Recommended:", "LR:")):
            text = line.split(";")[0].split(" (effective batch")[0] if line.startswith("noise") else line
            assert text.split(": ", 1)[1] in quoted, line
    assert (out / "report.png").is_file() and (out / "report.csv").is_file()
    assert (out / "final" / "model.safetensors").is_file()
