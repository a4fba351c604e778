"""accum.sharded on one process: which engine, where OOM recovery is refused (one line) and how
train.py turns its default off there, state dicts of a plain model. FSDP2 itself runs in
tests/test_fsdp.py on 2 gloo ranks."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from accum import Accumulator, TaskLoss, pad_collate, plan_from_accumulation
from accum.errors import ConfigError
from accum.sharded import (
    engine_of,
    full_state_dict,
    is_fully_sharded,
    load_full_state_dict,
    oom_recovery_unavailable,
    refuse_oom_recovery,
)


def stand_in(distributed_type, processes=1):
    """What the Accumulator's setup reads of an Accelerator (DeepSpeed needs a GPU to be real)."""
    return SimpleNamespace(distributed_type=distributed_type, num_processes=processes, device=torch.device("cpu"),
                           process_index=0)


def test_engine_of_names_the_sharded_engines_only():
    model = torch.nn.Linear(2, 2)
    assert not is_fully_sharded(model)
    assert engine_of(stand_in(DistributedType.MULTI_GPU, 2), model) is None
    assert engine_of(stand_in(DistributedType.NO), model) is None
    assert engine_of(stand_in(DistributedType.FSDP, 2), model) == "FSDP"
    assert engine_of(stand_in(DistributedType.DEEPSPEED), model) == "DeepSpeed"


@pytest.mark.parametrize("engine,processes,refused", [
    (None, 4, False), ("FSDP", 1, False), ("FSDP", 2, True), ("DeepSpeed", 1, True), ("DeepSpeed", 8, True)])
def test_oom_recovery_is_refused_in_one_line_where_it_cannot_work(engine, processes, refused):
    assert (oom_recovery_unavailable(engine, processes) is not None) == refused
    if not refused:
        refuse_oom_recovery(engine, processes)
        return
    with pytest.raises(ConfigError) as error:
        refuse_oom_recovery(engine, processes)
    message = str(error.value)
    assert "\n" not in message and engine in message and "--oom-recovery false" in message


def test_the_accumulator_refuses_recovery_under_deepspeed_and_runs_without_it():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    arguments = dict(loss=TaskLoss("clm"), collate=pad_collate("clm", 0))
    with pytest.raises(ConfigError, match="DeepSpeed"):
        Accumulator(stand_in(DistributedType.DEEPSPEED), model, optimizer, plan_from_accumulation(2, 2), **arguments)
    accumulator = Accumulator(stand_in(DistributedType.DEEPSPEED), model, optimizer, plan_from_accumulation(2, 2),
                              recovery=False, **arguments)
    assert accumulator.adaptive is None and not accumulator.defer_sync


def test_train_turns_the_default_recovery_off_with_a_note_and_refuses_an_explicit_one():
    from accum.cli.config import make_config
    from scripts.train import build_accumulator

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = plan_from_accumulation(2, 2)
    accelerator = stand_in(DistributedType.DEEPSPEED)
    arguments = (accelerator, model, optimizer, None, plan, TaskLoss("clm"), pad_collate("clm", 0), [])
    default = build_accumulator(make_config({"task": "clm", "model": "gpt2"}), *arguments)
    assert default.adaptive is None
    assert [n for n in default.notes if n.startswith("OOM recovery off: OOM recovery does not work under DeepSpeed")]
    with pytest.raises(ConfigError, match="--oom-recovery false"):
        build_accumulator(make_config({"task": "clm", "model": "gpt2", "oom_recovery": True}), *arguments)


def test_full_state_dict_of_a_plain_model_loads_into_another():
    torch.manual_seed(0)
    model, other = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = full_state_dict(model, optimizer)
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    load_full_state_dict(other, model_state, other_optimizer, optimizer_state)
    assert torch.equal(other.weight, model.weight) and torch.equal(other.bias, model.bias)
    buffers = [other_optimizer.state[p]["momentum_buffer"] for p in other.parameters()]
    assert all(torch.equal(a, optimizer.state[p]["momentum_buffer"]) for a, p in zip(buffers, model.parameters(),
                                                                                      strict=True))


def test_the_accumulator_refuses_token_cutting_under_deepspeed():
    from accum import plan_batch

    model = torch.nn.Linear(2, 2)
    plan = plan_batch(8, 4, cut="tokens", token_length=16)
    with pytest.raises(ConfigError, match="token-budget cutting does not work under DeepSpeed"):
        Accumulator(stand_in(DistributedType.DEEPSPEED), model, torch.optim.SGD(model.parameters(), lr=0.1), plan,
                    loss=TaskLoss("clm"), collate=pad_collate("clm", 0), recovery=False)
