"""The search, pure (a fake try_step), and plan_for on a tiny real model (leaves no trace)."""

import json
import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accum.errors import ConfigError
from accum.probe import NothingFitsError, find_max_micro_batch, plan_eval_batch, plan_for

OOM = "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"


class Threshold:
    """try_step that fits up to `max_fit`; `flaky` sizes fail the first time they run."""

    def __init__(self, max_fit, flaky=()):
        self.max_fit, self.flaky, self.calls = max_fit, set(flaky), []

    def __call__(self, size):
        self.calls.append(size)
        if size in self.flaky:
            self.flaky.discard(size)
            raise RuntimeError(OOM)
        if size > self.max_fit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")


@pytest.fixture(autouse=True)
def quick_gc(request, monkeypatch):
    """The pure search needs no garbage collection (0.2 s a time once transformers is imported)."""
    if not getattr(request.function, "real_model", False):
        monkeypatch.setattr("accum.probe.free_memory", lambda full=True: None)


def search(step, **kwargs):
    kwargs.setdefault("progress", False)
    return find_max_micro_batch(step, **kwargs)


def test_threshold_found_in_twelve_probes():
    step = Threshold(33)
    result = search(step)
    assert result.size == 33
    assert len(result.probes) <= 12
    assert [p.size for p in result.probes][:7] == [1, 2, 4, 8, 16, 32, 64]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_fit=st.integers(1, 3000), start=st.integers(1, 64))
def test_search_is_exact_and_logarithmic(max_fit, start):
    step = Threshold(max_fit)
    result = search(step, start=start)
    assert result.size == max_fit
    span = max(max_fit, start)
    assert len(result.probes) <= 2 * math.ceil(math.log2(span + 1)) + 2


def test_limit_is_never_exceeded():
    step = Threshold(1000)
    result = search(step, limit=24)
    assert result.size == 24
    assert max(step.calls) == 24
    assert [p.size for p in result.probes] == [1, 2, 4, 8, 16, 24]


def test_start_above_threshold_halves_then_bisects():
    step = Threshold(5)
    result = search(step, start=64)
    assert result.size == 5
    assert step.calls[:5] == [64, 32, 16, 8, 4]
    assert not any(p.fit for p in result.probes if p.size > 5)


def test_flaky_size_never_reported_as_fit_and_retries_recover_it():
    step = Threshold(40, flaky={16})
    result = search(step)
    assert result.size == 15  # believed the transient failure: the answer still fits
    assert all(p.fit == (p.size <= 15) for p in result.probes)
    retried = search(Threshold(40, flaky={16}), retries=1)
    assert retried.size == 40
    assert [p.fit for p in retried.probes if p.size == 16] == [False, True]


def test_over_budget_counts_as_failure_and_cpu_budgets_count_the_step_growth():
    import mmap

    ballast = torch.ones(200 * 2**20 // 4)  # 200 MiB the process holds before probing

    def step(size):
        # size MiB of fresh pages, touched, then returned (an anonymous mapping: glibc's heap, which
        # earlier tests may have left with free resident pages, cannot serve it)
        buffer = mmap.mmap(-1, size * 2**20)
        for offset in range(0, size * 2**20, 4096):
            buffer[offset] = 1
        buffer.close()

    result = search(step, max_memory=40 * 2**20, safety_margin=0.0)
    assert 16 <= result.size < 48  # the step's own growth, not the 200 MiB held before it
    assert all(p.peak_bytes < 48 * 2**20 for p in result.probes if p.fit)
    del ballast
    assert any("over budget" in (p.error or "") for p in result.probes)


def test_non_oom_error_propagates_unchanged():
    def step(size):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        search(step)


def test_nothing_fits_is_one_line():
    with pytest.raises(NothingFitsError) as info:
        search(Threshold(0))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=0), "start"),
    (dict(start=8, limit=4), "below start"),
    (dict(objective="fastest"), "unknown"),
    (dict(max_memory="lots"), "not a size"),
    (dict(safety_margin=1.5), "safety margin"),
])
def test_bad_arguments_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match) as info:
        search(Threshold(8), **kwargs)
    assert "\n" not in str(info.value)


def test_agreement_lets_another_rank_veto_and_takes_the_slowest_time():
    mine, theirs = Threshold(100), Threshold(10)

    def agree(values):  # the other rank ran the same size, fits only up to 10, and is slower
        failed, seconds = values
        size = mine.calls[-1]
        return [max(failed, float(size > theirs.max_fit)), max(seconds, 5.0)]

    result = search(mine, agree=agree, limit=64)
    assert result.size == 10
    assert any(p.error == "failed on another rank" for p in result.probes)
    assert all(p.seconds == 5.0 for p in result.probes)


def test_throughput_objective_reports_fastest_and_largest():
    import time

    def step(size):  # fastest per sample at 8, fits up to 32
        if size > 32:
            raise MemoryError
        time.sleep(0.001 * size * (1 + abs(size - 8) / 4))

    result = search(step, objective="throughput")
    assert result.size == 32
    assert result.fastest_size == 8 and result.chosen_size == 8
    assert result.as_dict()["fastest_size"] == 8


# --------------------------------------------------------------------------- plan_for on a real model


def real_model(test):
    """Tests on a real model keep the real free_memory (see quick_gc)."""
    test.real_model = True
    return test


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def make_batch(size):
    ids = torch.randint(0, 128, (size, 16))
    return {"input_ids": ids, "labels": ids}


def state_of(model, optimizer):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    opt = optimizer.state_dict()
    opt_state = {k: {n: t.clone() for n, t in s.items()} for k, s in opt["state"].items()}
    return weights, grads, opt_state, opt["param_groups"], torch.get_rng_state().clone(), model.training


def assert_identical(before, after):
    weights, grads, opt_state, groups, rng, training = before
    weights2, grads2, opt_state2, groups2, rng2, training2 = after
    assert weights.keys() == weights2.keys()
    for key in weights:
        assert torch.equal(weights[key], weights2[key]), key
    for g, g2 in zip(grads, grads2, strict=True):
        assert (g is None and g2 is None) or torch.equal(g, g2)
    assert opt_state.keys() == opt_state2.keys()
    for key in opt_state:
        for name in opt_state[key]:
            assert torch.equal(opt_state[key][name], opt_state2[key][name]), (key, name)
    assert groups == groups2
    assert torch.equal(rng, rng2)
    assert training == training2


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCUM_CACHE_DIR", str(tmp_path))
    return tmp_path


class AdamWFailingAfterUpdate(torch.optim.AdamW):
    """AdamW whose step, for a micro-batch above `fits`, updates every weight and moment and then runs
    out of memory: a probe that fails after it has changed everything it can change."""

    fits, size = 6, 0

    def step(self, closure=None):
        loss = super().step(closure)
        if self.size > self.fits:
            raise RuntimeError(OOM)
        return loss


@real_model
def test_probing_leaves_model_and_adamw_bit_identical(cache_dir):
    model = tiny_gpt2()
    optimizer = AdamWFailingAfterUpdate(model.parameters(), lr=1e-2)
    model(**make_batch(2)).loss.backward()  # real state: Adam moments, and gradients pending
    optimizer.step()
    model(**make_batch(2)).loss.backward()
    model.eval()
    before = state_of(model, optimizer)

    def sized_batch(size):
        optimizer.size = size
        return make_batch(size)

    plan = plan_for(None, model, sized_batch, 24, optimizer=optimizer, progress=False)
    failed = [p["size"] for p in plan.probes if not p["fit"]]
    assert failed and min(failed) == 7, plan.probes  # probes really failed, after changing weights and moments
    assert_identical(before, state_of(model, optimizer))
    assert plan.effective_batch_size == 24 and plan.micro_batch_size == 6
    assert max(p["size"] for p in plan.probes) <= 24  # limit: target / processes
    assert plan.micro_batch_size * plan.accumulation_steps == 24


@real_model
def test_cache_hit_costs_zero_probes_and_replan_probes_again(cache_dir):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters())
    first = plan_for(None, model, make_batch, 16, optimizer=optimizer, progress=False)
    assert first.source == "probe" and first.probes
    calls = []

    def counting_batch(size):
        calls.append(size)
        return make_batch(size)

    hit = plan_for(None, model, counting_batch, 16, optimizer=optimizer, progress=False)
    assert hit.source == "cache" and hit.probes == ()
    assert calls == [1]  # only to read the batch's shape for the key; no step ran
    assert hit.micro_batch_size == first.micro_batch_size
    again = plan_for(None, model, make_batch, 16, optimizer=optimizer, progress=False, replan=True)
    assert again.source == "probe"


@real_model
def test_a_plan_cached_under_one_budget_is_not_used_under_another(cache_dir):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters())
    roomy = plan_for(None, model, make_batch, 16, optimizer=optimizer, max_memory="8GiB", progress=False)
    assert roomy.source == "probe" and roomy.cache_key
    again = plan_for(None, model, make_batch, 16, optimizer=optimizer, max_memory="8GiB", progress=False)
    assert again.source == "cache" and again.cache_key == roomy.cache_key
    tight = plan_for(None, model, make_batch, 16, optimizer=optimizer, max_memory="460MiB", progress=False)
    assert tight.source == "probe" and tight.cache_key != roomy.cache_key


@real_model
def test_an_invalid_cache_entry_is_probed_again_naming_the_file(cache_dir, caplog):
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters())
    first = plan_for(None, model, make_batch, 16, optimizer=optimizer, progress=False)
    entries = json.loads((cache_dir / "plans.json").read_text())
    entries[first.cache_key]["micro_batch_size"] = 5  # 5 x accum x 1 no longer multiplies out to 16
    (cache_dir / "plans.json").write_text(json.dumps(entries))
    with caplog.at_level(logging.WARNING):
        again = plan_for(None, model, make_batch, 16, optimizer=optimizer, progress=False)
    assert again.source == "probe"
    assert any(str(cache_dir / "plans.json") in r.getMessage() and "`replan`" in r.getMessage() for r in caplog.records)


@real_model
def test_corrupt_cache_file_is_ignored(cache_dir):
    (cache_dir / "plans.json").write_text("\x00 garbage")
    model = tiny_gpt2()
    plan = plan_for(None, model, make_batch, 8, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), progress=False)
    assert plan.source == "probe" and plan.effective_batch_size == 8


@real_model
def test_plan_for_validates_before_probing(cache_dir):
    model = tiny_gpt2()
    for kwargs, match in [(dict(target_batch_size=0), "positive"),
                          (dict(target_batch_size=3, num_processes=4), "smaller than"),
                          (dict(target_batch_size=10, num_processes=4), "cannot be split"),
                          (dict(target_batch_size=8, start=16), "above the per-process"),
                          (dict(target_batch_size=8, objective="fast"), "unknown")]:
        with pytest.raises(ConfigError, match=match):
            plan_for(None, model, make_batch, progress=False, cache_path=False, **kwargs)


@real_model
def test_eval_probe_restores_mode_and_finds_a_size(cache_dir):
    model = tiny_gpt2()
    model.train()
    rng = torch.get_rng_state().clone()
    result = plan_eval_batch(model, make_batch, limit=64, progress=False)
    assert result.size == 64
    assert model.training and torch.equal(rng, torch.get_rng_state())
