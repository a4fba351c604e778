"""accum/schedule.py: step schedules, ramps, noise-driven growth, validation and the LR in samples."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import get_scheduler

from accum.cli.config import ConfigError, make_config
from accum.schedule import BatchSchedule, Progress, SampleLR, lr_shape, parse_ramp, schedule_from_config


def run_windows(schedule: BatchSchedule, windows: int, **progress) -> list[int]:
    """The batch of each window when every window is a full one."""
    batches, samples = [], 0
    for step in range(1, windows + 1):
        batches.append(schedule.batch)
        samples += schedule.batch
        schedule.decide(Progress(optimizer_step=step, samples_seen=samples, **progress))
    return batches


def test_step_schedule_changes_at_the_first_window_boundary_at_or_past_each_key():
    schedule = BatchSchedule.steps({0: 8, 64: 16, 100: 32}).bind(4, 1)
    # 8 windows of 8 reach 64 exactly: the 9th window is the first of 16; 64 + 16 + 16 = 96 < 100,
    # 112 >= 100: the 12th window is the first of 32 (no window straddles a key)
    assert run_windows(schedule, 13) == [8] * 8 + [16] * 3 + [32] * 2


def test_token_keyed_schedule_reads_tokens():
    schedule = BatchSchedule.steps({0: 4, 1000: 8}, unit_name="tokens").bind(2, 2)
    assert schedule.decide(Progress(1, samples_seen=4, tokens_seen=999)) is None
    change = schedule.decide(Progress(2, samples_seen=8, tokens_seen=1000))
    assert (change.old, change.new) == (4, 8) and "1000 tokens" in change.reason


def test_ramp_is_rounded_to_valid_splits_and_reaches_the_end():
    schedule = BatchSchedule.ramp(*parse_ramp("8,64,400")).bind(4, 2)  # unit 8
    batches = run_windows(schedule, 20)
    assert batches[0] == 8 and batches[-1] == 64
    assert all(b % 8 == 0 for b in batches)
    assert batches == sorted(batches)
    assert schedule.simulate(20) == sum(batches)


@given(start=st.integers(1, 8), extra=st.integers(0, 8), over=st.integers(1, 500), unit=st.sampled_from([1, 2, 4]))
def test_ramp_values_are_monotone_multiples_within_bounds(start, extra, over, unit):
    schedule = BatchSchedule.ramp(start * unit, (start + extra) * unit, over).bind(unit, 1)
    values = [schedule.batch_at(s) for s in range(0, 2 * over, max(1, over // 50))]
    assert values == sorted(values)
    assert all(v % unit == 0 and start * unit <= v <= (start + extra) * unit for v in values)
    assert schedule.batch_at(over) == (start + extra) * unit


def test_noise_growth_doubles_toward_b_simple_within_bounds_with_a_cooldown_and_never_shrinks():
    schedule = BatchSchedule.noise(8, 64, cooldown=3).bind(4, 1)
    assert schedule.decide(Progress(1, 8, b_simple=None)) is None  # not measured yet
    assert schedule.decide(Progress(3, 24, b_simple=5.0)) is None  # cool-down from step 0
    change = schedule.decide(Progress(3, 24, b_simple=40.0))
    assert (change.old, change.new) == (8, 32) and "B_simple" in change.reason  # 8 -> 16 -> 32 <= 40
    assert schedule.decide(Progress(4, 56, b_simple=1000.0)) is None  # cool-down
    assert schedule.decide(Progress(6, 120, b_simple=1000.0)).new == 64  # the maximum
    assert schedule.decide(Progress(20, 999, b_simple=2.0)) is None  # grows only


def test_noise_growth_in_multiples_and_in_tokens():
    schedule = BatchSchedule.noise(8, 48, cooldown=0, growth="multiple").bind(4, 2)  # unit 8
    # B_simple of 900 tokens at 30 tokens per sample is 30 samples: the valid split below is 24
    assert schedule.decide(Progress(1, 8, b_simple=900.0, items_per_sample=30.0)).new == 24
    assert schedule.decide(Progress(2, 32, b_simple=1e9)).new == 48


def test_state_round_trip_continues_exactly():
    a = BatchSchedule.noise(4, 64, cooldown=2).bind(4, 1)
    a.decide(Progress(5, 20, b_simple=17.0))
    b = BatchSchedule.noise(4, 64, cooldown=2).bind(4, 1)
    b.load_state_dict(a.state_dict())
    assert b.batch == a.batch == 16
    assert b.decide(Progress(6, 36, b_simple=99.0)) is None  # the cool-down carried over
    with pytest.raises(ConfigError, match="resume with the run's own schedule"):
        BatchSchedule.ramp(4, 8, 10).load_state_dict(a.state_dict())


@pytest.mark.parametrize("build, message", [
    (lambda: BatchSchedule.steps({0: 8, 64: 16, 32: 32}), "keys must increase: 32 comes after 64"),
    (lambda: BatchSchedule.steps({10: 8}), "add the batch at 0"),
    (lambda: BatchSchedule.steps({}), "is empty"),
    (lambda: BatchSchedule.steps({0: 8, 64: 0}), "batch at 64 must be a positive integer"),
    (lambda: BatchSchedule.steps({0: 8, 64: 12}).bind(8, 1), "batch at 64 samples 12 cannot be split into "
                                                             "micro-batches of 8 x 1 process: use a multiple of 8 (8 or 16)"),
    (lambda: BatchSchedule.ramp(8, 20, 100).bind(4, 2), "ramp end 20 cannot be split"),
    (lambda: parse_ramp("8,64"), "not start,end,over_samples"),
    (lambda: parse_ramp("64,8,100"), "goes down"),
    (lambda: BatchSchedule.noise(64, 8), "below the minimum"),
    (lambda: BatchSchedule.noise(8, 30).bind(4, 1), "adaptive batch maximum 30 cannot be split"),
])
def test_bad_schedules_are_one_line_config_errors(build, message):
    with pytest.raises(ConfigError) as caught:
        build()
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_keys_build_the_schedule_and_refuse_two_at_once():
    base = {"model": "x"}
    steps = schedule_from_config(make_config(dict(base, accumulation_schedule={0: 8, 100: 16})))
    assert steps.kind == "steps" and steps.start_batch == 8
    noise = schedule_from_config(make_config(dict(base, adaptive_batch="noise", batch_size=16)))
    assert (noise.minimum, noise.maximum, noise.cooldown) == (16, 128, 20)
    assert schedule_from_config(make_config(base)) is None
    with pytest.raises(ConfigError, match="accumulation_schedule and batch_ramp both set the batch"):
        schedule_from_config(make_config(dict(base, accumulation_schedule={0: 8}, batch_ramp="8,16,10")))


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_in_samples_equals_transformers_schedule_in_steps_for_a_fixed_batch(name):
    batch, warmup, total = 24, 3, 17
    param = torch.nn.Parameter(torch.zeros(1))
    reference_opt = torch.optim.SGD([param], lr=0.1)
    reference = get_scheduler({"constant": "constant_with_warmup"}.get(name, name), reference_opt,
                              num_warmup_steps=warmup, num_training_steps=total)
    ours_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ours = SampleLR(ours_opt, 0.1, batch, "linear", name, warmup * batch, total * batch, batch)
    for step in range(total + 1):
        assert ours_opt.param_groups[0]["lr"] == pytest.approx(reference_opt.param_groups[0]["lr"], abs=1e-12)
        reference_opt.step()
        reference.step()
        ours.step()  # does nothing: samples move it
        ours.advance((step + 1) * batch, batch)


def test_lr_follows_the_rule_when_the_batch_changes_and_keeps_its_place_in_samples():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    for rule, factor in (("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)):
        lr = SampleLR(optimizer, 0.1, 8, rule, "linear", 0, 1000, 8)
        assert lr.advance(500, 32) == pytest.approx(0.1 * factor * 0.5)
    restored = SampleLR(optimizer, 0.1, 8, "sqrt", "linear", 0, 1000, 8)
    restored.load_state_dict(lr.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 2.0 * 0.5)
    assert lr_shape("cosine", 1000, 0, 1000) == pytest.approx(0.0)
    assert math.isclose(lr_shape("linear", 5, 10, 100), 0.5)


def test_describe_names_the_schedule():
    assert "32 from 0, 64 from 20000 samples" in BatchSchedule.steps({0: 32, 20000: 64}).describe()
    assert "ramp 8 -> 64 over 1000 samples (in steps of 8)" in BatchSchedule.ramp(8, 64, 1000).bind(4, 2).describe()
    assert "from 8 up to 64" in BatchSchedule.noise(8, 64).describe()
