"""Flags that change how a run trains or reports, each checked by its effect on a real (tiny) run:
an 8-bit optimizer, TensorBoard, --eval-every, --log-every, --use-amp, --weight-decay, --momentum,
--schedule-unit tokens, --fused-optimizer. Runs are in-process and combined where the effects do not interfere."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from scripts.train import main
from tests.helpers.fault_common import final_weights, weights
from tests.test_train import TINY_CLM, step_records

ROOT = Path(__file__).resolve().parents[1]
# SGD at a constant LR from the first step (no warmup), fp32, dropout off: runs differ only by the flag
BASE = [str(ROOT / "data/tiny/public_domain.txt") if arg == "data/tiny/public_domain.txt" else arg for arg in TINY_CLM]
BASE += ["--lr-scheduler", "constant", "--warmup-steps", "0", "--max-train-samples", "40", "--max-eval-samples", "4",
         "--eval-batch-size", "4"]


def run(argv: list[str], capsys) -> str:
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    return capsys.readouterr().out


def test_8bit_optimizer_tensorboard_eval_and_log_every_and_use_amp_in_one_run(tmp_path, capsys, fresh_accelerator_state):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    stdout = run(BASE + ["--batch-size", "4", "--micro-batch-size", "2", "--grad-accum-steps", "2", "--max-steps", "6",
                         "--optimizer", "adamw_8bit", "--lr", "1e-2", "--report-to", "tensorboard", "--eval-every", "2",
                         "--log-every", "4", "--use-amp", "--output-dir", str(out)], capsys)
    # --use-amp on a CPU is bf16 autocast; the loss stays finite
    assert "precision bf16" in stdout and "Optimizer: adamw_8bit" in stdout, stdout
    records = step_records(out)
    assert [r["optimizer_step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]
    # --log-every 4: a console line at step 4 and at the last step, no other
    assert re.findall(r"^step (\d+)/6 ", stdout, re.M) == ["4", "6"], stdout
    # --eval-every 2: at steps 2, 4 and 6 (and the final evaluation)
    assert re.findall(r"^eval at step (\d+):", stdout, re.M) == ["2", "4", "6"], stdout
    # the 8-bit optimizer: bitsandbytes keeps the moments of large tensors in uint8 (blockwise quantised)
    state = torch.load(sorted((out / "checkpoints").glob("step-*"))[-1] / "optimizer.pt", weights_only=True)["state"]
    quantised = [s["__bnb_optimizer_quant_state__"] for s in state.values()]
    assert all(s["step"] == 6 for s in state.values())
    assert quantised[0]["state1"].dtype == quantised[0]["state2"].dtype == torch.uint8  # the embedding's moments
    # TensorBoard: one scalar per optimizer step for what metrics.jsonl holds, read back from the event file
    (events,) = list((out / "accum").glob("events.out.tfevents.*"))  # the scalars (hparams go to a subfolder)
    board = EventAccumulator(str(events))
    board.Reload()
    for tag in ("loss", "lr", "grad_norm", "samples_seen"):
        logged = board.Scalars(tag)
        assert [e.step for e in logged] == list(range(1, 7)), tag
        assert [e.value for e in logged] == pytest.approx([r[tag] for r in records], rel=1e-6), tag


def test_weight_decay_and_momentum_change_the_update_as_sgd_defines_them(tmp_path, capsys):
    common = BASE + ["--batch-size", "4", "--micro-batch-size", "2", "--grad-accum-steps", "2", "--max-steps", "3",
                     "--save-every", "1", "--keep-checkpoints", "5"]
    for name, flags in {"plain": [], "decay": ["--weight-decay", "0.1"], "momentum": ["--momentum", "0.9"]}.items():
        run(common + flags + ["--output-dir", str(tmp_path / name)], capsys)

    def at(name, step):
        return weights(tmp_path / name / "checkpoints" / f"step-{step:08d}")

    plain, decay = final_weights(tmp_path / "plain"), final_weights(tmp_path / "decay")
    # positions 24..63 are never used (max_seq_len 24): no gradient reaches them, so without decay they keep
    # their initial values and with it each SGD step multiplies them by 1 - lr x weight_decay = 0.95
    unused = "transformer.wpe.weight"
    assert torch.equal(plain[unused][24:], at("plain", 1)[unused][24:])
    torch.testing.assert_close(decay[unused][24:], plain[unused][24:] * 0.95**3, rtol=1e-5, atol=0)
    for key in plain:  # and every weight matrix ends smaller
        if plain[key].dim() == 2:
            assert decay[key].norm() < plain[key].norm(), key
    # momentum: the first update is the gradient alone (the buffer starts at it); from the second on it differs
    assert all(torch.equal(at("momentum", 1)[k], at("plain", 1)[k]) for k in plain)
    assert not torch.equal(at("momentum", 2)["transformer.h.0.mlp.c_fc.weight"], at("plain", 2)["transformer.h.0.mlp.c_fc.weight"])
    state = torch.load(tmp_path / "momentum" / "checkpoints" / "step-00000003" / "optimizer.pt", weights_only=True)
    assert all("momentum_buffer" in s for s in state["state"].values())


def test_token_keyed_schedule_changes_the_batch_once_the_tokens_are_seen(tmp_path, capsys):
    out = tmp_path / "run"
    stdout = run(BASE + ["--micro-batch-size", "2", "--accumulation-schedule", "{0: 4, 150: 8}", "--schedule-unit", "tokens",
                         "--max-samples", "40", "--output-dir", str(out)], capsys)
    assert "effective batch 4 from 0, 8 from 150 tokens seen" in stdout, stdout
    records = step_records(out)
    first = next(i for i, r in enumerate(records) if r["tokens_seen"] >= 150)  # the window that crossed 150 tokens
    assert records[first]["samples_seen"] not in (150, 152)  # keyed by tokens, not samples
    assert [r["effective_batch_size"] for r in records] == [4] * (first + 1) + [8] * (len(records) - first - 1)
    (change,) = json.loads((out / "metrics.json").read_text())["adjustments"]
    assert change["optimizer_step"] == first + 1 and change["reason"] == f"schedule: {records[first]['tokens_seen']} tokens seen"
    assert records[-1]["samples_seen"] == 40  # the budget, spent exactly


def test_fused_adamw_updates_as_the_default_adamw_does_and_is_what_auto_picks(tmp_path, capsys):
    """--fused-optimizer: the fused AdamW kernel and torch's default AdamW give the same weights to rounding,
    the checkpoint's optimizer records which ran, and auto picks fused for float parameters on a CPU."""
    common = BASE + ["--optimizer", "adamw", "--lr", "1e-2", "--batch-size", "4", "--micro-batch-size", "2",
                     "--grad-accum-steps", "2", "--max-steps", "3"]
    for name, setting in {"fused": "true", "unfused": "false", "auto": "auto"}.items():
        run(common + ["--fused-optimizer", setting, "--output-dir", str(tmp_path / name)], capsys)
    fused, unfused = final_weights(tmp_path / "fused"), final_weights(tmp_path / "unfused")
    assert fused.keys() == unfused.keys()
    # AdamW moves a weight by about lr whatever its gradient's size, so where a gradient is near 0 rounding can
    # change the direction of a tiny step: measured 1.1e-5 at most, far below one step of 1e-2
    for key in fused:
        torch.testing.assert_close(fused[key], unfused[key], rtol=0, atol=1e-4)

    def fused_flag(name):
        state = torch.load(sorted((tmp_path / name / "checkpoints").glob("step-*"))[-1] / "optimizer.pt",
                           weights_only=True)
        return state["param_groups"][0]["fused"]

    assert (fused_flag("fused"), fused_flag("unfused"), fused_flag("auto")) == (True, None, True)


def test_auto_fuses_only_float_parameters_on_devices_torch_has_the_kernel_for():
    from accum.cli.config import make_config
    from accum.cli.planning import build_optimizer, use_fused_adamw

    floats = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    meta = [torch.nn.Parameter(torch.zeros(2, device="meta"))]
    complex_ = [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))]
    assert use_fused_adamw("auto", floats) is True
    assert use_fused_adamw("auto", floats + meta) is False and use_fused_adamw("auto", floats + complex_) is False
    assert use_fused_adamw("auto", []) is False
    assert use_fused_adamw(False, floats) is False and use_fused_adamw(True, meta) is True
    groups = [build_optimizer(make_config({"model": "unused", "fused_optimizer": setting}), model, 1e-3).param_groups[0]
              for setting, model in (("auto", torch.nn.ParameterList(meta)), ("auto", torch.nn.ParameterList(floats)),
                                     (False, torch.nn.ParameterList(floats)))]
    assert [group["fused"] for group in groups] == [None, True, None]


def test_micro_batch_overhead_tokens_sets_what_the_cut_by_length_charges(tmp_path, capsys):
    """--micro-batch-overhead-tokens: charged 1 token a micro-batch the cut keeps padding near zero with many
    micro-batches; charged a million it takes the fewest the budget allows. Same windows, so the same samples."""
    common = ["--config", "configs/classification_tiny.yaml", "--max-steps", "2", "--max-train-samples", "32",
              "--max-eval-samples", "8", "--eval-batch-size", "8", "--batch-size", "16", "--micro-batch-size", "auto",
              "--cut-by", "tokens", "--max-memory", "40MiB", "--plan-cache", str(tmp_path / "plans.json")]
    counts, samples = {}, {}
    for name, tokens in {"cheap": "1", "dear": "1000000"}.items():
        run(common + ["--micro-batch-overhead-tokens", tokens, "--output-dir", str(tmp_path / name)], capsys)
        records = step_records(tmp_path / name)
        counts[name] = [r["gradient_accumulation_steps"] for r in records]
        samples[name] = [r["samples_seen"] for r in records]
        padding = json.loads((tmp_path / name / "metrics.json").read_text())["padding_efficiency"]
        counts[name + " padding"] = padding
    assert samples["cheap"] == samples["dear"] == [16, 32]
    assert all(c > d for c, d in zip(counts["cheap"], counts["dear"], strict=True)), counts
    assert counts["cheap padding"] > counts["dear padding"], counts
