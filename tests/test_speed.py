"""The loop at accelerator speed, checked on the CPU: tensor-to-Python conversions per window stay a
small constant however many micro-batches the window has (on a GPU each one would stop the host
until the device catches up), the noise meter on fused multi-tensor ops, compile and bf16."""

from __future__ import annotations

import collections
import contextlib
import math
import sys
import threading
from pathlib import Path

import pytest
import torch

from accum.cli.config import make_config
from accum.window import Callback
from scripts.train import train
from tests.test_equivalence import tiny_gpt2, varied_data

CONVERSIONS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


ROOT = Path(__file__).resolve().parents[1]
OURS = (str(ROOT / "accum"), str(ROOT / "scripts"))


class ConversionCounter(Callback):
    """Counts tensor -> Python conversions between each window's start and end (a monkeypatch of
    torch.Tensor's methods, in this test only): all of them, and those made by accum's own code
    (the caller's file under accum/ or scripts/)."""

    def __init__(self, monkeypatch):
        self.per_window: list[collections.Counter] = []
        self.ours: list[collections.Counter] = []
        self.active = self.active_ours = None
        self.main = threading.get_ident()
        for name in CONVERSIONS:
            self._wrap(monkeypatch, name)
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = args[0] if args else kwargs.get("device")
            if self.active is not None and tensor.device.type != "cpu" and str(target).startswith("cpu"):
                self.active["to(cpu)"] += 1
            return original_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _wrap(self, monkeypatch, name):
        original = getattr(torch.Tensor, name)
        counter = self

        def wrapped(tensor, *args, **kwargs):
            # the training thread's: the next window is prepared in a thread of its own (--num-workers),
            # off the critical path
            if counter.active is not None and threading.get_ident() == counter.main:
                counter.active[name] += 1
                if sys._getframe(1).f_code.co_filename.startswith(OURS):
                    counter.active_ours[name] += 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    def on_window_start(self, accumulator, samples):
        self.active, self.active_ours = collections.Counter(), collections.Counter()

    def on_window_end(self, accumulator, result):
        self.per_window.append(self.active)
        self.ours.append(self.active_ours)
        self.active = self.active_ours = None


def conversions_per_window(tmp_path, monkeypatch, micro, accum, data, **extra) -> tuple[list[int], list[int]]:
    """(all conversions, accum's own) in each of three windows of a real train() run."""
    counter = ConversionCounter(monkeypatch)
    config = make_config(dict(task="clm", model_config_overrides={"model_type": "unused"}, optimizer="adamw",
                              lr=1e-3, batch_size=micro * accum, micro_batch_size=micro, grad_accum_steps=accum,
                              max_steps=3, output_dir=str(tmp_path / f"{micro}x{accum}"), report_to="none", **extra))
    model = tiny_gpt2()
    model.config.pad_token_id = None  # else transformers checks input_ids for padding in every forward
    with contextlib.ExitStack():
        train(config, model=model, train_data=data, eval_data=data[:2],
              cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=[counter])
    monkeypatch.undo()
    return [sum(c.values()) for c in counter.per_window], [sum(c.values()) for c in counter.ours]


@pytest.mark.parametrize("extra", [{}, {"noise_scale": True}], ids=["plain", "noise-scale"])
def test_conversions_per_window_do_not_grow_with_the_micro_batches(tmp_path, monkeypatch, extra):
    # sequences of one length: no padding, so no attention mask, and transformers' own all-ones check
    # of the mask (a conversion per forward) does not run; with no pad id, nor its check of the ids
    # for padding: every conversion is then counted, the model's and torch's included
    same_length = [{"input_ids": [(7 * i + j) % 99 + 1 for j in range(12)]} for i in range(48)]
    few, few_ours = conversions_per_window(tmp_path / "a", monkeypatch, 8, 2, same_length, **extra)
    many, many_ours = conversions_per_window(tmp_path / "b", monkeypatch, 2, 8, same_length, **extra)
    print("conversions per window, 2 micro-batches:", few, few_ours, "8 micro-batches:", many, many_ours)
    assert few == many  # the same count whatever the number of micro-batches (AdamW's per-parameter step reads)
    assert max(many_ours) <= (4 if extra else 2)  # accum's own: the counts, then loss, padding and norm at once
    # padded sequences of varied length: accum's own conversions stay the same handful per window
    _, varied_ours = conversions_per_window(tmp_path / "c", monkeypatch, 2, 8, varied_data("clm", 48), **extra)
    assert varied_ours == many_ours


def test_the_fused_noise_meter_measures_what_the_per_parameter_loop_measured():
    """The same gradients fed to the fused meter and to the loop it replaced: window norms within 1e-6
    relative, B_simple within 1e-4 after a dozen windows."""
    from accum.loss import TaskLoss, pad_collate
    from accum.noise import MicroGradientNorms, NoiseScaleTracker
    from tests.helpers.noise_reference import LoopedMicroGradientNorms

    model, data = tiny_gpt2(), varied_data("clm", 96)
    collate, loss = pad_collate("clm", 0), TaskLoss("clm")
    fused, looped = MicroGradientNorms(model.parameters()), LoopedMicroGradientNorms(model.parameters())
    trackers = [NoiseScaleTracker(min_updates=10), NoiseScaleTracker(min_updates=10)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for window in range(12):
        batches = [collate(data[window * 8 + 2 * k: window * 8 + 2 * k + 2]) for k in range(4)]
        items = [int(loss.count(b)) for b in batches]
        for meter in (fused, looped):
            meter.start_window(grad_scale=1.0 / sum(items))
        for batch, count in zip(batches, items, strict=True):
            (loss.forward(model, batch)[0] / sum(items)).backward()
            for meter in (fused, looped):
                meter.after_backward(count)
        results = [fused.window_result(), looped.window_result()]
        for got, want in zip(*results, strict=True):
            assert got == pytest.approx(want, rel=1e-6)
        for tracker, result in zip(trackers, results, strict=True):
            tracker.update(*result)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # B_simple is the ratio of these two averages (None while the |G|^2 one is not yet positive)
    assert trackers[0].g_sq == pytest.approx(trackers[1].g_sq, rel=1e-4)
    assert trackers[0].trace_sigma == pytest.approx(trackers[1].trace_sigma, rel=1e-4)
    assert (trackers[0].b_simple is None) == (trackers[1].b_simple is None)


def test_the_meter_takes_its_big_batch_norm_from_clipping_and_measures_the_same():
    """The Accumulator hands the noise meter clipping's norm, squared, instead of letting it make its
    own pass over .grad: window by window, the same measurement within 1e-6 relative as the meter's own
    pass before clipping, with clipping active (max_grad_norm below the norms, so a norm read after
    clipping would differ). With a loss scaler (fp16) the meter keeps its own pass."""
    from accelerate import Accelerator

    from accum import Accumulator, TaskLoss, pad_collate, plan_from_accumulation
    from accum.noise import NoiseMeter, NoiseScaleTracker, clip_norm_serves_noise

    class Recording(NoiseScaleTracker):  # the window norms the meter measured, as handed to the tracker
        def update(self, *measured):
            self.measured = measured
            return super().update(*measured)

    def measurements(from_clip: bool):
        accelerator = Accelerator(cpu=True)
        model = tiny_gpt2()
        model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        accumulator = Accumulator(accelerator, model_, optimizer, plan_from_accumulation(2, 4), loss=TaskLoss("clm"),
                                  collate=pad_collate("clm", 0), max_grad_norm=0.05,
                                  noise_scale=NoiseMeter(model_, 1, 4, tracker=Recording()))
        assert accumulator._noise_from_clip
        accumulator._noise_from_clip = from_clip  # the other arm: the meter's own pass, before clipping
        data, rows = varied_data("clm", 96), []
        for window in range(12):
            result = accumulator.step(data[window * 8:(window + 1) * 8])
            assert result.grad_norm > 0.2 and not result.skipped  # clipping shrank every window's gradient 4x or more
            rows.append(accumulator.noise.tracker.measured)  # (g_small_sq, b_small, g_big_sq, b_big)
        return rows, accumulator.noise.tracker

    (from_clip, clip_tracker), (own, own_tracker) = measurements(True), measurements(False)
    for got, want in zip(from_clip, own, strict=True):
        assert got == pytest.approx(want, rel=1e-6)
    # B_simple is the ratio of these two averages (None while the |G|^2 one is not yet positive)
    assert clip_tracker.g_sq == pytest.approx(own_tracker.g_sq, rel=1e-4)
    assert clip_tracker.trace_sigma == pytest.approx(own_tracker.trace_sigma, rel=1e-4)
    assert (clip_tracker.b_simple is None) == (own_tracker.b_simple is None)
    accelerator = Accelerator(cpu=True)  # a loss scaler (fp16): the meter keeps its own pass before clipping
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    model = tiny_gpt2()
    model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not Accumulator(accelerator, model_, optimizer, plan_from_accumulation(2, 4), loss=TaskLoss("clm"),
                           collate=pad_collate("clm", 0), noise_scale=True)._noise_from_clip
    model, half = tiny_gpt2(), tiny_gpt2().half()
    assert clip_norm_serves_noise(None, model, False) and not clip_norm_serves_noise(None, half, False)
    assert not clip_norm_serves_noise(None, model, loss_scaled=True)
    assert not any(clip_norm_serves_noise(engine, model, False) for engine in ("FSDP", "DeepSpeed"))


def test_a_gradient_scaler_unscales_once_per_window_and_an_overflow_is_a_counted_skip():
    """fp16's loss scaling, on the CPU: a torch.amp.GradScaler handed to the Accelerator before
    prepare() scales every backward; clipping unscales once per window (not per micro-batch); an
    overflow makes the scaler skip the step, which the window reports, the stats count and the
    weights do not see, and the scale is lowered."""
    from accelerate import Accelerator

    from accum import Accumulator, TaskLoss, pad_collate, plan_from_accumulation
    from tests.test_window import InfiniteGradient

    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = tiny_gpt2()
    model_, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    accumulator = Accumulator(accelerator, model_, optimizer, plan_from_accumulation(2, 4), loss=TaskLoss("clm"),
                              collate=pad_collate("clm", 0), max_grad_norm=1.0)
    unscales = []
    original = accelerator.scaler.unscale_
    accelerator.scaler.unscale_ = lambda opt: unscales.append(1) or original(opt)
    data = varied_data("clm", 16)
    before = [p.detach().clone() for p in model.parameters()]
    result = accumulator.step(data[:8])
    assert not result.skipped and len(unscales) == 1  # four micro-batches, one unscale
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    accumulator.loss = InfiniteGradient("clm")  # a finite loss whose gradient overflows
    after_first = [p.detach().clone() for p in model.parameters()]
    result = accumulator.step(data[8:16])
    assert result.skipped and result.skip_reason == "fp16 overflow" and len(unscales) == 2
    assert accumulator.stats.skipped_steps == 1 and accelerator.scaler.get_scale() < 2.0**10
    assert all(torch.equal(a, b) for a, b in zip(after_first, model.parameters(), strict=True))


@pytest.mark.slow
def test_compiled_training_equals_eager_and_varying_shapes_do_not_recompile_each_window(tmp_path):
    """--compile (torch.compile, dynamic shapes) against eager on windows whose micro-batches differ in
    shape (padded to each one's longest): the first gradient and the weights after 4 SGD steps within
    1e-5 per tensor, and a handful of graphs however many shapes the windows take."""
    import torch._dynamo

    from tests.test_equivalence import FirstGradient, largest_relative_difference, updates

    data = varied_data("clm", 32)

    def run(compile_: bool):
        model, recorder = tiny_gpt2(), FirstGradient()
        base = tiny_gpt2()
        config = make_config(dict(task="clm", model_config_overrides={"model_type": "unused"}, optimizer="sgd", lr=0.5,
                                  lr_scheduler="constant", max_grad_norm=None, batch_size=8, micro_batch_size=2,
                                  grad_accum_steps=4, max_steps=4, output_dir=str(tmp_path / str(compile_)),
                                  report_to="none", compile=compile_, seed=3))
        train(config, model=model, train_data=data, eval_data=data[:2], cli_keys={"micro_batch_size", "grad_accum_steps"},
              callbacks=[recorder])
        return recorder.grads, updates(base, model), [name for name, _ in base.named_parameters()]

    torch._dynamo.reset()
    eager_grads, eager_updates, names = run(False)
    torch._dynamo.utils.counters.clear()
    compiled_grads, compiled_updates, _ = run(True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    shapes = {len(row["input_ids"]) for row in data}
    print("compiled vs eager:", largest_relative_difference(compiled_grads, eager_grads, names),
          "graphs:", graphs, "shapes in the data:", len(shapes))
    assert largest_relative_difference(compiled_grads, eager_grads, names) <= 1e-5
    assert largest_relative_difference(compiled_updates, eager_updates, names) <= 1e-5
    # Dynamic shapes: a first static graph, one dynamic recompile, and the evaluation's graphs (5 measured
    # here), not one graph per micro-batch shape (11 lengths in the data).
    assert 1 <= graphs <= 6 and graphs < len(shapes)


@pytest.mark.slow
def test_bf16_autocast_trains_end_to_end_close_to_fp32(tmp_path, fresh_accelerator_state):
    """--mixed-precision bf16 on the CPU (autocast; no scaler): every loss finite and the final loss
    within 2% of fp32's (bf16 keeps 8 bits of mantissa: measured differences here are about 0.1%)."""
    from accelerate.state import AcceleratorState

    data = varied_data("clm", 32)
    finals = {}
    for precision in ("no", "bf16"):
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process state
        config = make_config(dict(task="clm", model_config_overrides={"model_type": "unused"}, optimizer="adamw",
                                  lr=1e-3, batch_size=8, micro_batch_size=2, grad_accum_steps=4, max_steps=4,
                                  output_dir=str(tmp_path / precision), report_to="none", mixed_precision=precision))
        metrics = train(config, model=tiny_gpt2(), train_data=data, eval_data=data[:4],
                        cli_keys={"micro_batch_size", "grad_accum_steps"})
        assert metrics["skipped_steps"] == 0 and all(math.isfinite(g) for g in metrics["grad_norm_history"])
        finals[precision] = metrics["final_loss"]
    print("final loss fp32 vs bf16:", finals)
    assert finals["bf16"] == pytest.approx(finals["no"], rel=0.02)
