"""Plan arithmetic: micro x accum x processes == target, exactly, or a one-line error."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accum.errors import ConfigError
from accum.plan import Plan, plan_batch, plan_from_accumulation, resolve_batch


@given(
    per_process=st.integers(1, 2000),
    processes=st.integers(1, 16),
    max_micro=st.integers(1, 600),
)
def test_plan_multiplies_out_to_the_target(per_process, processes, max_micro):
    target = per_process * processes
    plan = plan_batch(target, max_micro, processes)
    assert plan.micro_batch_size * plan.accumulation_steps * plan.num_processes == target
    assert plan.effective_batch_size == plan.target_batch_size == target
    assert 1 <= plan.micro_batch_size <= max_micro
    # the largest divisor of the per-process share that fits
    assert all(per_process % d for d in range(plan.micro_batch_size + 1, min(max_micro, per_process) + 1))


@given(target=st.integers(1, 5000), processes=st.integers(2, 16), max_micro=st.integers(1, 64))
def test_indivisible_target_names_nearest_valid_targets(target, processes, max_micro):
    if target % processes == 0 or target < processes:
        return
    with pytest.raises(ConfigError) as info:
        plan_batch(target, max_micro, processes)
    message = str(info.value)
    assert "\n" not in message
    below = target // processes * processes
    assert str(below) in message and str(below + processes) in message


@given(target=st.integers(1, 5000), processes=st.integers(2, 16))
def test_rounding_when_allowed_says_so(target, processes):
    if target % processes == 0 or target < processes:
        return
    with pytest.warns(UserWarning, match="rounded"):
        plan = plan_batch(target, 8, processes, allow_rounding=True)
    assert plan.effective_batch_size % processes == 0
    assert abs(plan.effective_batch_size - target) <= processes // 2 + 1
    assert plan.target_batch_size == target


@given(bad=st.integers(-100, 0))
def test_non_positive_sizes_are_one_line_errors(bad):
    for call in (lambda: plan_batch(bad, 4), lambda: plan_batch(8, bad), lambda: plan_batch(8, 4, bad),
                 lambda: plan_from_accumulation(bad, 2)):
        with pytest.raises(ConfigError) as info:
            call()
        assert "\n" not in str(info.value) and str(bad) in str(info.value)


def test_target_smaller_than_processes():
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        plan_batch(3, 8, 4)


def test_banner_and_round_trip():
    plan = plan_batch(256, 16, 1)
    assert plan.banner() == "Effective batch size: 256 = 16 micro x 16 accum x 1 process"
    assert plan_batch(256, 16, 2).banner() == "Effective batch size: 256 = 16 micro x 8 accum x 2 processes"
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan_from_accumulation(4, 8, 2).effective_batch_size == 64


def test_from_dict_rejects_inconsistent_plans():
    data = plan_batch(32, 4).to_dict() | {"accumulation_steps": 3}
    with pytest.raises(ConfigError, match="does not multiply out"):
        Plan.from_dict(data)


def test_resolve_any_two_determine_the_third():
    assert resolve_batch(64, "auto", "auto", 2, set()) == (64, None, None, None)
    assert resolve_batch(64, 8, "auto", 2, set()) == (64, 8, 4, None)
    assert resolve_batch(64, "auto", 4, 2, set()) == (64, 8, 4, None)
    assert resolve_batch(64, 8, 4, 2, set()) == (64, 8, 4, None)


def test_resolve_cli_micro_and_accum_override_config_batch():
    target, micro, accum, note = resolve_batch(32, 4, 4, 1, {"micro_batch_size", "grad_accum_steps"})
    assert (target, micro, accum) == (16, 4, 4)
    assert "overridden" in note and "32" in note and "\n" not in note


def test_resolve_cli_batch_rederives_config_accumulation():
    target, micro, accum, note = resolve_batch(64, 4, 4, 1, {"batch_size"})
    assert (target, micro, accum) == (64, 4, 16)
    assert "overridden" in note


def test_resolve_three_disagreeing_values_on_the_cli_is_an_error():
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_batch(32, 4, 4, 1, {"batch_size", "micro_batch_size", "grad_accum_steps"})
    with pytest.raises(ConfigError, match="disagrees"):
        resolve_batch(32, 4, 4, 1, set())  # a config file that contradicts itself


@given(batch=st.integers(1, 500), micro=st.integers(1, 64), processes=st.integers(1, 8))
def test_resolve_inexact_split_is_one_line(batch, micro, processes):
    try:
        target, m, a, _ = resolve_batch(batch, micro, "auto", processes, set())
    except ConfigError as exc:
        assert "\n" not in str(exc)
        assert batch % (micro * processes) != 0
    else:
        assert m * a * processes == target == batch


# -- balanced and token plans (windows cut by length) ------------------------------------------------


def test_balanced_split_uses_nearly_the_largest_fit_in_equal_parts():
    from accum.plan import plan_batch

    plan = plan_batch(1024, 97, cut="balanced")
    assert (plan.micro_batch_size, plan.smallest_micro_batch, plan.accumulation_steps) == (94, 93, 11)
    assert plan.banner() == "Effective batch size: 1024 = 11 micro-batches of 93-94 x 1 process"
    assert plan_batch(1024, 97).micro_batch_size == 64  # a fixed split: the largest divisor, 16 of 64
    even = plan_batch(32, 8, cut="balanced")
    assert even.banner() == "Effective batch size: 32 = 8 micro x 4 accum x 1 process"


def test_a_token_plan_budgets_its_largest_equal_part_at_the_longest_sequence():
    from accum.plan import Plan, plan_batch

    plans = {fit: plan_batch(32, fit, cut="tokens", token_length=64) for fit in range(11, 16)}
    assert {(p.micro_batch_tokens, p.accumulation_steps) for p in plans.values()} == {(704, 3)}  # one plan
    plan = plans[13]
    assert "token budget 704" in plan.banner() and plan.sequence_length == 64 and plan.cut == "tokens"
    assert Plan.from_dict(plan.to_dict()) == plan and Plan.from_dict(plan.to_dict()).micro_batch_tokens == 704
    with pytest.raises(ConfigError, match="token_length"):
        plan_batch(32, 8, cut="tokens")


def test_replan_keeps_the_cut_and_recovery_halves_a_token_budget():
    from accum.plan import plan_batch, replan
    from accum.recovery import grow_plan, limit_of, shrink_plan

    plan = plan_batch(32, 11, cut="tokens", token_length=64)
    smaller = shrink_plan(plan)
    assert (limit_of(smaller), smaller.effective_batch_size, smaller.cut) == (352, 32, "tokens")
    assert limit_of(grow_plan(smaller, ceiling=704)) == 704 and grow_plan(plan, ceiling=704) is None
    bigger_batch = replan(plan, target_batch_size=64)
    assert (bigger_batch.effective_batch_size, bigger_batch.micro_batch_tokens) == (64, 704)
    balanced = shrink_plan(plan_batch(1024, 97, cut="balanced"))
    assert (balanced.micro_batch_size, balanced.accumulation_steps, balanced.effective_batch_size) == (47, 22, 1024)


def test_an_inconsistent_plan_is_refused():
    from accum.plan import Plan, plan_batch

    data = plan_batch(1024, 97, cut="balanced").to_dict()
    with pytest.raises(ConfigError, match="does not multiply out"):
        Plan.from_dict({**data, "accumulation_steps": 5})
    with pytest.raises(ConfigError, match="does not multiply out"):
        Plan.from_dict({**data, "cut": "diagonal"})
