"""Gradient equivalence across (micro x accum) layouts, through the real train() and through a user's
own loop on accum.Accumulator, against an independent full-batch reference computed here.

fp32, dropout off, tiny models built from a config, SGD. The reference is written in this file with
no accum code but the window order: each window's gradient is the mean of a plain cross-entropy over
every item of its samples, each sample run alone (no padding, no micro-batches). For (8x1), (4x2),
(2x4) and (1x8), with padded sequences of varied length and a partial last window, the first
accumulated gradient and the weight *update* after several SGD steps must agree with it per tensor
within 1e-5 (norm of the difference / norm of the reference's update, so a partial-window error is
not diluted by the weights' own size). `mean` normalisation must *fail* the same comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from accum import (
    Accumulator,
    Callback,
    TaskLoss,
    WindowSampler,
    pad_collate,
    plan_batch,
    plan_from_accumulation,
)
from accum.cli.config import make_config
from scripts.train import train

LAYOUTS = [(8, 1), (4, 2), (2, 4), (1, 8)]
TOLERANCE = 1e-5
SEED, LR, STEPS = 3, 0.5, 4


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForSequenceClassification(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def varied_data(task: str, count: int, seed: int = 1) -> list[dict]:
    """Sequences of 3 to 14 tokens (so padding differs between layouts)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        ids = [rng.randrange(1, 100) for _ in range(rng.randrange(3, 15))]
        rows.append({"input_ids": ids, "labels": rng.randrange(3)} if task == "classification" else {"input_ids": ids})
    return rows


# ----------------------------------------------------------------------------- the independent reference


def full_batch_gradient(model, task: str, window: list[dict]) -> list[torch.Tensor]:
    """The gradient of the window's item mean, by hand: every sample alone, a plain loss sum, one backward."""
    model.zero_grad(set_to_none=True)
    total, items = 0.0, 0
    for sample in window:
        ids = torch.tensor([sample["input_ids"]])
        logits = model(input_ids=ids).logits
        if task == "clm":
            total = total + F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            items += ids.shape[1] - 1
        else:
            total = total + F.cross_entropy(logits, torch.tensor([sample["labels"]]), reduction="sum")
            items += 1
    (total / items).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def reference_run(base, task: str, data: list[dict], window_size: int = 8):
    """(first gradient, weight updates after STEPS windows) of plain full-batch SGD over the windows
    accum's sampler draws (which samples form a window is the one thing taken from accum)."""
    model = copy.deepcopy(base)
    model.train()
    sampler = WindowSampler(len(data), window_size, seed=SEED)
    first = None
    for _ in range(STEPS):
        grads = full_batch_gradient(model, task, [data[i] for i in sampler.next_window()])
        first = first if first is not None else grads
        with torch.no_grad():
            for param, grad in zip(model.parameters(), grads, strict=True):
                param -= LR * grad
    return first, updates(base, model)


def updates(base, model) -> list[torch.Tensor]:
    return [(p - p0).detach().clone() for p, p0 in zip(model.parameters(), base.parameters(), strict=True)]


# ----------------------------------------------------------------------------- the two ways to run accum


class FirstGradient(Callback):
    """Each parameter's gradient at the first optimizer step (after clipping, before the step)."""

    def __init__(self):
        self.grads: list[torch.Tensor] | None = None

    def on_before_optimizer_step(self, accumulator):
        if self.grads is None:
            self.grads = [p.grad.detach().clone() for p in accumulator.model.parameters()]


def run_train_py(tmp_path, task, base, data, micro, accum, normalization="auto", **extra):
    model, recorder = copy.deepcopy(base), FirstGradient()
    batch = micro * accum if micro != "auto" else 8
    out = tmp_path / f"{task}-{micro}x{accum}-{normalization}"
    config = make_config(dict(
        task=task, model_config_overrides={"model_type": "unused-in-process"}, optimizer="sgd", lr=LR,
        lr_scheduler="constant", max_grad_norm=None, batch_size=batch, micro_batch_size=micro,
        grad_accum_steps=accum, max_steps=STEPS, output_dir=str(out), plan_cache=str(out / "plans.json"),
        report_to="none", loss_normalization=normalization, seed=SEED, **extra,
    ))
    metrics = train(config, model=model, train_data=data, eval_data=data[:4],
                    cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=[recorder])
    return recorder.grads, updates(base, model), metrics


def run_user_loop(task, base, data, micro, accum, plan=None):
    """A user's own Accelerate loop: prepare, an Accumulator, a WindowSampler, one call per window."""
    model, recorder = copy.deepcopy(base), FirstGradient()
    accelerator = Accelerator(cpu=True)
    model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    plan = plan or plan_from_accumulation(micro, accum)
    accumulator = Accumulator(accelerator, model_, optimizer, plan, loss=TaskLoss(task),
                              collate=pad_collate(task, 0), callbacks=[recorder])
    sampler = WindowSampler(len(data), micro * accum, seed=SEED)
    results = [accumulator.step([data[i] for i in sampler.next_window()]) for _ in range(STEPS)]
    return recorder.grads, updates(base, model), results


def structurally_zero(name: str) -> bool:
    """Attention key biases get an exactly-zero gradient in exact arithmetic (softmax ignores a shift
    shared by all keys), so in floating point theirs is rounding noise of ~1e-9: no relative comparison
    means anything there."""
    return name.endswith("key.bias")


def largest_relative_difference(tensors, reference, names, floors=None) -> float:
    """max over tensors of |value - ref| / max(|ref|, floor). `floors` (for weight updates): 1e-3 of each
    weight's norm, so that a tensor that barely moved is not judged by the fp32 rounding of its weights
    (an update of 1e-5 of the weight is at the resolution of fp32 itself)."""
    worst = 0.0
    floors = floors or [0.0] * len(reference)
    for name, value, ref, floor in zip(names, tensors, reference, floors, strict=True):
        denominator = max(ref.norm().item(), floor)
        if denominator > 0 and not structurally_zero(name):
            worst = max(worst, (value - ref).norm().item() / denominator)
    return worst


def update_floors(base) -> list[float]:
    return [1e-3 * p.norm().item() for p in base.parameters()]


@pytest.mark.parametrize("task,build", [("classification", tiny_bert), ("clm", tiny_gpt2)])
def test_every_layout_gives_the_full_batch_gradient(tmp_path, task, build):
    base = build()
    data = varied_data(task, 28)  # 3 full windows of 8 and a partial one of 4
    names = [name for name, _ in base.named_parameters()]
    ref_grad, ref_update = reference_run(base, task, data)
    for micro, accum in LAYOUTS:
        for way, (grads, deltas, _) in (("train.py", run_train_py(tmp_path, task, base, data, micro, accum)),
                                        ("user loop", run_user_loop(task, base, data, micro, accum))):
            grad_diff = largest_relative_difference(grads, ref_grad, names)
            update_diff = largest_relative_difference(deltas, ref_update, names, update_floors(base))
            print(f"{task} {micro}x{accum} {way}: first gradient {grad_diff:.2e}, update after {STEPS} steps "
                  f"{update_diff:.2e}")
            assert grad_diff <= TOLERANCE, (way, micro, accum)
            assert update_diff <= TOLERANCE, (way, micro, accum)


@pytest.mark.parametrize("task,build", [("classification", tiny_bert), ("clm", tiny_gpt2)])
def test_windows_cut_by_a_token_budget_give_the_full_batch_gradient(tmp_path, task, build):
    """Sorted by length and cut by budgets of 14 to 112 tokens (one to eight samples of the longest),
    through a user's loop; and through train.py, planning the budget by probing (whatever it finds,
    the gradient must not change)."""
    base = build()
    data = varied_data(task, 28)
    names = [name for name, _ in base.named_parameters()]
    floors = update_floors(base)
    ref_grad, ref_update = reference_run(base, task, data)
    counts = set()
    for budget in (14, 28, 56, 112):
        plan = dataclasses.replace(plan_batch(8, 8, cut="tokens", token_length=14), micro_batch_tokens=budget)
        grads, deltas, results = run_user_loop(task, base, data, 8, 1, plan=plan)
        counts.add(tuple(r.micro_batches for r in results))
        assert largest_relative_difference(grads, ref_grad, names) <= TOLERANCE, budget
        assert largest_relative_difference(deltas, ref_update, names, floors) <= TOLERANCE, budget
        assert all(r.padded_tokens >= r.tokens for r in results)
    assert len(counts) == 4  # four budgets, four different cuts of the same windows
    budget = "500KiB" if task == "classification" else "1MiB"  # about 4 samples of the longest (measured)
    grads, deltas, metrics = run_train_py(tmp_path, task, base, data, "auto", "auto", cut_by="tokens",
                                          max_memory=budget, safety_margin=0.0)
    assert metrics["plan"]["cut"] == "tokens" and metrics["plan"]["micro_batch_tokens"] > 0
    records = [json.loads(line) for line in (tmp_path / f"{task}-autoxauto-auto" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["gradient_accumulation_steps"] for r in records) >= 2  # some window was cut in two or more
    assert largest_relative_difference(grads, ref_grad, names) <= TOLERANCE
    assert largest_relative_difference(deltas, ref_update, names, floors) <= TOLERANCE


def test_user_loop_reports_the_window_as_train_py_logs_it(tmp_path):
    base, data = tiny_gpt2(), varied_data("clm", 28)
    _, _, metrics = run_train_py(tmp_path, "clm", base, data, 2, 4)
    _, _, results = run_user_loop("clm", base, data, 2, 4)
    assert [r.samples for r in results] == [8, 8, 8, 4]  # the partial last window: one step, its true size
    assert [r.micro_batches for r in results] == [4, 4, 4, 2]
    assert results[-1].optimizer_step == metrics["optimizer_step"] == STEPS
    assert results[-1].loss == pytest.approx(metrics["final_loss"], rel=1e-6)
    assert sum(r.tokens for r in results) == metrics["tokens_seen"] == sum(len(d["input_ids"]) for d in data)


def test_mean_of_means_is_not_equivalent(tmp_path):
    """Accelerate's default weighting (what --loss-normalization mean reproduces) is measurably off."""
    base = tiny_gpt2()
    names = [name for name, _ in base.named_parameters()]
    data = varied_data("clm", 28)
    ref_grad, ref_update = reference_run(base, "clm", data)
    grads, deltas, _ = run_train_py(tmp_path, "clm", base, data, 2, 4, normalization="mean")
    assert largest_relative_difference(grads, ref_grad, names) > 1e-3
    assert largest_relative_difference(deltas, ref_update, names, update_floors(base)) > 1e-3


@pytest.mark.slow
def test_two_ranks_whose_windows_cut_into_different_counts_give_the_full_batch_gradient(tmp_path):
    from tests.helpers.two_ranks import ROOT, run_on_two_ranks

    run_on_two_ranks(ROOT / "tests" / "helpers" / "token_ranks.py", tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    assert any(a != b for a, b in result["counts"]), result["counts"]  # the ranks' shares cut differently
    base = tiny_gpt2()
    names = [name for name, _ in base.named_parameters()]
    _, ref_update = reference_run(base, "clm", varied_data("clm", 28))
    updates = [torch.tensor(u) for u in result["updates"]]
    assert largest_relative_difference(updates, ref_update, names, update_floors(base)) <= TOLERANCE
