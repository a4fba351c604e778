"""accum.Accumulator, WindowSampler and the cutting layout as a user's loop sees them (one process,
in-process, tiny models): events in order, non-finite windows refused, counts, resume through
Accelerate's own save_state/load_state, evaluation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from accum import (
    Accumulator,
    Callback,
    FixedSize,
    NonFiniteError,
    TaskLoss,
    TokenBudget,
    WindowSampler,
    evaluate,
    pad_collate,
    plan_from_accumulation,
)
from accum.loss import IGNORE_INDEX
from accum.windows import rank_micro_batches


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


DATA = [{"input_ids": [(3 * i + j) % 49 + 1 for j in range(3 + i % 7)]} for i in range(20)]


def accumulator_for(model, micro=2, accum=2, **kwargs):
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Accumulator(accelerator, model, optimizer, plan_from_accumulation(micro, accum), loss=TaskLoss("clm"),
                       collate=pad_collate("clm", 0), **kwargs)


# ----------------------------------------------------------------------------- layout


def test_fixed_size_cuts_and_ranks_pad_to_the_same_count():
    assert FixedSize()(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert FixedSize().count(list(range(7)), 3) == 3
    with pytest.raises(ValueError, match="positive"):
        FixedSize()([1], 0)
    window = list(range(5))  # two ranks: shares of 3 and 2, micro-batches of 2
    assert rank_micro_batches(window, FixedSize(), 2, 2, 0) == [[0, 1], [2]]
    assert rank_micro_batches(window, FixedSize(), 2, 2, 1) == [[3, 4], []]  # padded: one empty
    assert rank_micro_batches([0], FixedSize(), 4, 2, 1) == [[]]  # no share at all: still one (empty)


def test_sampler_orders_epochs_by_seed_rolls_over_and_resumes():
    sampler = WindowSampler(10, 4, seed=1)
    epoch0 = list(sampler)
    assert [len(w) for w in epoch0] == [4, 4, 2] and sorted(sum(epoch0, [])) == list(range(10))
    assert list(WindowSampler(10, 4, seed=1)) == epoch0  # the order depends only on seed and epoch
    epoch1_first = sampler.next_window()
    assert sampler.epoch == 1 and len(epoch1_first) == 4 and epoch1_first != epoch0[0]
    state = sampler.state_dict()
    resumed = WindowSampler(10, 4, seed=1)
    resumed.load_state_dict(state)
    assert resumed.next_window(3) == sampler.next_window(3)  # the window size may change between windows
    for bad, match in [({**state, "epoch": -1}, "whole number"), ({**state, "sample_in_epoch": 11}, "past"),
                       ({**state, "seed": 2}, "seed"), ({**state, "epoch": "1"}, "whole number")]:
        with pytest.raises(ValueError, match=match):
            WindowSampler(10, 4, seed=1).load_state_dict(bad)


# ----------------------------------------------------------------------------- one window


class Events(Callback):
    def __init__(self):
        self.seen = []

    def on_window_start(self, accumulator, samples):
        self.seen.append(("start", len(samples)))

    def on_before_optimizer_step(self, accumulator):
        self.seen.append(("before", all(p.grad is not None for p in accumulator.model.parameters())))

    def on_after_optimizer_step(self, accumulator):
        self.seen.append(("after",))

    def on_window_end(self, accumulator, result):
        self.seen.append(("end", result.optimizer_step))


def test_a_window_steps_once_reports_its_counts_and_the_lr_it_used():
    model, events = tiny_gpt2(), Events()
    accumulator = accumulator_for(model, callbacks=[events])
    scheduler = torch.optim.lr_scheduler.LambdaLR(accumulator.optimizer, lambda step: 1.0 / (1 + step))
    accumulator.scheduler = scheduler
    window = DATA[:3]  # a partial window: 3 samples at micro 2 -> 2 micro-batches
    before = [p.detach().clone() for p in model.parameters()]
    result = accumulator.step(window)
    assert events.seen == [("start", 3), ("before", True), ("after",), ("end", 1)]
    assert (result.optimizer_step, result.samples, result.micro_batches, result.micro_batch_size) == (1, 3, 2, 2)
    assert result.tokens == sum(len(s["input_ids"]) for s in window)
    assert result.items == sum(len(s["input_ids"]) - 1 for s in window)
    assert result.lr == pytest.approx(0.1) and accumulator.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert not result.skipped and math.isfinite(result.grad_norm) and result.record["loss"] == result.loss
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next window
    with pytest.raises(ValueError, match="at least one sample"):
        accumulator.step([])


class _InfiniteBackward(torch.autograd.Function):
    """Zero on the way forward, an infinite gradient on the way back."""

    @staticmethod
    def forward(ctx, x):
        return x * 0

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfiniteGradient(TaskLoss):
    """A finite loss whose gradient is infinite: the case a loss check alone would miss."""

    def forward(self, model, batch):
        loss, logits = super().forward(model, batch)
        return loss + _InfiniteBackward.apply(loss), logits


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_windows_never_reach_the_weights(policy):
    model = tiny_gpt2()
    accumulator = accumulator_for(model, nonfinite=policy)
    accumulator.loss = InfiniteGradient("clm")
    before = [p.detach().clone() for p in model.parameters()]
    if policy == "raise":
        with pytest.raises(NonFiniteError, match="gradient norm is (inf|nan) at optimizer step 1"):
            accumulator.step(DATA[:4])
    else:
        result = accumulator.step(DATA[:4])
        assert result.skipped and "gradient norm" in result.skip_reason and math.isfinite(result.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_grad_norm"):
        accumulator_for(tiny_gpt2(), max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        accumulator_for(tiny_gpt2(), max_grad_norm=float("nan"))
    with pytest.raises(ValueError, match="nonfinite"):
        accumulator_for(tiny_gpt2(), nonfinite="ignore")


def test_save_state_and_load_state_resume_a_user_loop_exactly(tmp_path):
    def run(stop_after=None, resume=None, steps=5):
        model = tiny_gpt2()
        accumulator = accumulator_for(model)
        sampler = WindowSampler(len(DATA), 4, seed=0)
        accelerator = accumulator.accelerator
        accelerator.register_for_checkpointing(sampler, accumulator)
        if resume:
            accelerator.load_state(resume)
        while accumulator.stats.optimizer_step < steps:
            accumulator.step([DATA[i] for i in sampler.next_window()])
            if accumulator.stats.optimizer_step == stop_after:
                accelerator.save_state(str(tmp_path / "state"))
                return None
        return [p.detach().clone() for p in model.parameters()], accumulator.stats.as_dict()

    whole, whole_stats = run()
    run(stop_after=2)
    resumed, resumed_stats = run(resume=str(tmp_path / "state"))
    assert all(torch.equal(a, b) for a, b in zip(whole, resumed, strict=True))
    assert resumed_stats["samples_seen"] == whole_stats["samples_seen"] == 20
    assert resumed_stats["grad_norm_history"] == whole_stats["grad_norm_history"]


def test_evaluate_counts_every_item_once_and_halves_on_oom(monkeypatch):
    model = tiny_gpt2()
    accelerator = Accelerator(cpu=True)
    collate, loss = pad_collate("clm", 0), TaskLoss("clm")
    batch = collate(DATA)
    with torch.no_grad():
        expected = loss.forward(model, batch)[0].item() / int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    result = evaluate(accelerator, model, DATA, collate, loss, 8, on_batch=lambda b, logits: len(b["input_ids"]))
    assert result.loss == pytest.approx(expected, rel=1e-6) and sum(result.outputs) == len(DATA)
    assert model.training  # the mode it had

    original, shrinks = TaskLoss.forward, []

    def forward(self, model_, batch_):
        if batch_["input_ids"].shape[0] > 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return original(self, model_, batch_)

    monkeypatch.setattr(TaskLoss, "forward", forward)
    result = evaluate(accelerator, copy.deepcopy(model), DATA, collate, loss, 8,
                      on_shrink=lambda old, new: shrinks.append((old, new)))
    assert shrinks == [(8, 4), (4, 2)] and result.batch_size == 2
    assert result.loss == pytest.approx(expected, rel=1e-6)


def test_an_oom_halves_the_token_budget_at_the_same_batch_and_the_gradient_does_not_change(monkeypatch):
    from accum import plan_batch

    plan = plan_batch(8, 8, cut="tokens", token_length=9)  # 72 tokens a micro-batch
    reference = tiny_gpt2()
    accumulator_for(reference, micro=8, accum=1).step(DATA[:8])  # one micro-batch, no OOM
    original = TaskLoss.forward

    def forward(self, model, batch):
        if model.training and batch["input_ids"].numel() > 36:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return original(self, model, batch)

    monkeypatch.setattr(TaskLoss, "forward", forward)
    model = tiny_gpt2()
    accelerator = Accelerator(cpu=True)
    model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    accumulator = Accumulator(accelerator, model_, optimizer, plan, loss=TaskLoss("clm"), collate=pad_collate("clm", 0),
                              cut=TokenBudget(overhead_tokens=1000))  # the fewest micro-batches: one of 72 tokens
    result = accumulator.step(DATA[:8])
    budgets = [(d.old.micro_batch_tokens, d.new.micro_batch_tokens) for d in result.adjustments]
    assert budgets == [(72, 36)] and accumulator.plan.effective_batch_size == 8 and result.micro_batches > 1
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_the_noise_scale_says_when_windows_cut_by_length_bias_it():
    """One process measures B_simple from micro-batches; cut by length they are not random draws of the window,
    and the Accumulator says so in one line (a cut by samples, or several ranks, is not affected)."""
    from accum import plan_batch
    from accum.window import LENGTH_SORTED_NOISE

    def notes(plan):
        model = tiny_gpt2()
        accelerator = Accelerator(cpu=True)
        model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        return Accumulator(accelerator, model_, optimizer, plan, loss=TaskLoss("clm"), collate=pad_collate("clm", 0),
                           noise_scale=True).notes

    assert notes(plan_batch(8, 4, cut="tokens", token_length=9)) == [LENGTH_SORTED_NOISE]
    assert notes(plan_from_accumulation(2, 4)) == []
    assert "\n" not in LENGTH_SORTED_NOISE and "--cut-by samples" in LENGTH_SORTED_NOISE
