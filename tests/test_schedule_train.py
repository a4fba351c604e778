"""Batch schedules in scripts/train.py: where the change happens, stitched-run equivalence, resume, errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from scripts.train import main
from tests.test_train import TINY_CLM, final_weights, relative_differences, step_records, train_subprocess

# SGD at a constant LR (no warmup), fp32, dropout off: two runs of the same windows give the same weights
COMMON = TINY_CLM + ["--lr-scheduler", "constant", "--warmup-steps", "0", "--micro-batch-size", "2",
                     "--max-train-samples", "40", "--max-eval-samples", "4", "--lr-scaling", "linear",
                     "--base-batch-size", "4"]
SCHEDULE = ["--accumulation-schedule", "{0: 4, 16: 8}"]


def adjustments(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "metrics.json").read_text())["adjustments"]


def run_ok(args: list[str]):
    result = train_subprocess(args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_scheduled_run_equals_two_manual_runs_stitched_at_the_change_and_resumes_across_it(tmp_path):
    scheduled = tmp_path / "scheduled"
    result = run_ok(COMMON + SCHEDULE + ["--max-steps", "7", "--save-every", "1", "--keep-checkpoints", "10",
                                         "--output-dir", str(scheduled)])
    assert "Batch schedule: effective batch 4 from 0, 8 from 16 samples seen" in result.stdout
    assert "effective batch 4 -> 8, accumulation 2 -> 4" in result.stdout

    # the change happens after the 4th window of 4 (16 samples), and no window mixes two sizes:
    # each window ran exactly its accumulation's micro-batches
    records = step_records(scheduled)
    assert [r["effective_batch_size"] for r in records] == [4] * 4 + [8] * 3
    micro_steps = [0] + [r["micro_step"] for r in records]
    assert [b - a for a, b in zip(micro_steps, micro_steps[1:], strict=False)] == [r["gradient_accumulation_steps"] for r in records]
    (change,) = adjustments(scheduled)
    assert (change["optimizer_step"], change["samples_seen"]) == (4, 16)
    assert (change["old_accumulation_steps"], change["new_accumulation_steps"]) == (2, 4)
    assert change["lr"] == pytest.approx(0.5 * 8 / 4)  # linear rule from base batch 4
    assert [r["lr"] for r in records] == pytest.approx([0.5] * 4 + [1.0] * 3)  # the LR each step used

    # two manual runs: 4 steps at batch 4, then resumed from that checkpoint at batch 8
    manual = tmp_path / "manual"
    run_ok(COMMON + ["--batch-size", "4", "--max-steps", "4", "--output-dir", str(manual)])
    second = run_ok(COMMON + ["--batch-size", "8", "--max-steps", "7", "--output-dir", str(manual),
                              "--resume-from-checkpoint", "latest", "--allow-batch-change"])
    assert "resumed from" in second.stdout
    assert [r["lr"] for r in step_records(manual)][4:] == pytest.approx([1.0] * 3)  # the rule applies on resume
    diffs = relative_differences(final_weights(manual), final_weights(scheduled))
    print("scheduled vs stitched manual runs, largest per-tensor difference:", max(diffs.values()))
    assert max(diffs.values()) <= 1e-5

    # resume across the change: from the checkpoint of step 3 (batch 4), the run ends where it did
    resumed = tmp_path / "resumed"
    shutil.copytree(scheduled, resumed)
    for late in sorted((resumed / "checkpoints").glob("step-*"))[3:]:
        shutil.rmtree(late)
    (resumed / "metrics.json").unlink()
    again = run_ok(COMMON + SCHEDULE + ["--max-steps", "7", "--output-dir", str(resumed),
                                        "--resume-from-checkpoint", "latest"])
    assert "resumed from" in again.stdout and "at optimizer step 3" in again.stdout
    assert max(relative_differences(final_weights(resumed), final_weights(scheduled)).values()) == 0.0
    assert adjustments(resumed) == adjustments(scheduled)
    assert [r["effective_batch_size"] for r in step_records(resumed)] == [4] * 4 + [8] * 3


@pytest.mark.slow
def test_ramp_changes_only_at_windows_within_bounds(tmp_path):
    ramp = tmp_path / "ramp"
    result = run_ok(COMMON + ["--batch-ramp", "4,12,24", "--max-samples", "60", "--output-dir", str(ramp)])
    assert "ramp 4 -> 12 over 24 samples" in result.stdout
    records = step_records(ramp)
    batches = [r["effective_batch_size"] for r in records]
    assert batches == sorted(batches) and batches[0] == 4 and batches[-1] == 12
    assert all(b % 2 == 0 for b in batches)
    assert json.loads((ramp / "metrics.json").read_text())["effective_batch_size"] == 12
    assert sum(r["samples_seen"] - p["samples_seen"] for p, r in zip([{"samples_seen": 0}] + records, records, strict=False)) == 60



def grown_batch(growth: str, batch: int, wanted: float, maximum: int) -> int:
    """The noise-driven rule (accum/schedule.py), written out: the largest doubling, or the largest multiple of
    the micro-batch (1 here), within B_simple in samples and the maximum."""
    if growth == "power_of_two":
        return max(batch * 2**k for k in range(8) if batch * 2**k <= max(batch, min(wanted, maximum)))
    return max(batch, min(maximum, math.floor(wanted)))


@pytest.mark.parametrize("growth", ["power_of_two", "multiple"])
def test_noise_driven_batch_grows_whenever_b_simple_exceeds_it_and_the_lr_follows(tmp_path, capsys, growth):
    # A batch of 2 (micro-batch 1 x 2): B_simple of this model and text, measured, is 3.2 samples when the
    # tracker first reports it (step 10) and rises to about 6 by step 25, so the batch must grow.
    out = tmp_path / "noise"
    args = COMMON + ["--micro-batch-size", "1", "--adaptive-batch", "noise", "--adaptive-batch-min", "2",
                     "--adaptive-batch-max", "8", "--adaptive-batch-cooldown", "2", "--adaptive-batch-growth", growth,
                     "--max-samples", "80", "--output-dir", str(out)]
    assert main(args) == 0, capsys.readouterr().err[-3000:]
    changes, records = adjustments(out), step_records(out)
    assert all(r["noise_b_simple"] is None for r in records[:9])  # the tracker needs 10 windows first
    # replay the rule over the B_simple each window reported: the batch changes exactly where it says
    expected, batch, last_change = [], 2, 0
    for record in records:
        step, b_simple = record["optimizer_step"], record["noise_b_simple"]
        if b_simple is None or step - last_change < 2:  # not known yet, or in the cool-down
            continue
        wanted = b_simple * record["samples_seen"] / record["tokens_seen"]  # tokens -> samples
        new = grown_batch(growth, batch, wanted, 8)
        if new > batch:
            expected.append((step, batch, new))
            batch, last_change = new, step
    assert expected, [r["noise_b_simple"] for r in records]  # B_simple exceeded the batch: growth had to happen
    assert [(c["optimizer_step"], c["old_effective_batch_size"], c["new_effective_batch_size"]) for c in changes] == expected
    assert all("B_simple" in c["reason"] for c in changes)
    # the LR each optimizer step used follows the linear rule (base batch 4) for the batch that step trained with
    batches = [r["effective_batch_size"] for r in records]
    for change in changes:
        assert change["lr"] == pytest.approx(0.5 * change["new_effective_batch_size"] / 4)
        assert batches[change["optimizer_step"]:change["optimizer_step"] + 1] in ([], [change["new_effective_batch_size"]])
    assert [r["lr"] for r in records] == pytest.approx([0.5 * b / 4 for b in batches])
    assert len(set(batches)) == len(changes) + 1
    print("noise-driven changes:", [(c["optimizer_step"], c["new_effective_batch_size"]) for c in changes])


@pytest.mark.parametrize("argv, expected", [
    (SCHEDULE[:1] + ["{0: 4, 32: 8, 16: 16}"], "keys must increase: 16 comes after 32"),
    (SCHEDULE[:1] + ["{0: 4, 16: 6}"], "batch at 16 samples 6 cannot be split into micro-batches of 4"),
    (["--batch-ramp", "4,2,10"], "goes down"),
    (SCHEDULE + ["--batch-ramp", "4,8,10"], "both set the batch"),
    (SCHEDULE + ["--grad-accum-steps", "3"], "set by the batch schedule"),
])
def test_bad_schedules_are_one_line_and_exit_2(tmp_path, capsys, argv, expected):
    args = COMMON + ["--micro-batch-size", "4", "--max-steps", "2", "--output-dir", str(tmp_path / "o")] + argv
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
