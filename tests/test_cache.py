"""The plan cache: keys, atomic writes, a corrupt file ignored."""

import json
import logging

import pytest

import accum
from accum.cache import PlanCache, default_cache_path
from accum.plan import plan_batch


def test_put_get_round_trip(tmp_path):
    cache = PlanCache(tmp_path / "sub" / "plans.json")
    key = cache.key_for({"model": "gpt2#abc", "device": "cpu", "processes": 1})
    assert cache.get(key) is None
    cache.put(key, plan_batch(64, 8).to_dict())
    assert cache.get(key)["micro_batch_size"] == 8
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".tmp-")]


def test_key_includes_everything_that_decides_memory():
    import torch
    from accelerate import Accelerator

    from accum.probe import plan_cache_fields

    model = torch.nn.Linear(4, 4)
    fields = plan_cache_fields(model, Accelerator(cpu=True), torch.optim.AdamW(model.parameters()),
                               {"input_ids": [[128], "torch.int64"]}, processes=1, limit=32, max_memory="1GiB",
                               safety_margin=0.1, objective="largest", steps=2)
    for name in ("model", "attention", "gradient_checkpointing", "compiled", "precision", "optimizer", "objective",
                 "engine", "device", "device_memory", "processes", "budget", "safety_margin", "batch", "torch",
                 "transformers", "accum"):
        assert name in fields, name
    assert fields["accum"] == accum.__version__ and fields["budget"] == 2**30
    keys = {PlanCache.key_for(fields)}
    for name, other in [("model", "other#1"), ("budget", 460 * 2**20), ("safety_margin", 0.0), ("precision", "bf16"),
                        ("batch", {"input_ids": [[256], "torch.int64"]}), ("processes", 2), ("engine", "FSDP"),
                        ("gradient_checkpointing", True), ("compiled", True), ("attention", "sdpa"),
                        ("optimizer", "SGD"), ("objective", "throughput"), ("torch", "2.11.0")]:
        keys.add(PlanCache.key_for({**fields, name: other}))
    assert len(keys) == 14  # every field changes the key
    assert PlanCache.key_for(dict(reversed(list(fields.items())))) == PlanCache.key_for(fields)  # order-free
    # the optimizer's kernel is part of it: a fused step holds other temporaries than the per-tensor loop
    kernels = {plan_cache_fields(model, Accelerator(cpu=True), torch.optim.AdamW(model.parameters(), **kw),
                                 {"input_ids": [[128], "torch.int64"]}, processes=1, limit=32, max_memory="1GiB",
                                 safety_margin=0.1, objective="largest", steps=2)["optimizer"]
               for kw in ({}, {"fused": True}, {"foreach": True})}
    assert kernels == {"AdamW", "AdamW(fused=True)", "AdamW(foreach=True)"}


def test_corrupt_cache_is_reported_once_and_ignored(tmp_path, caplog):
    path = tmp_path / "plans.json"
    path.write_text("{not json")
    cache = PlanCache(path)
    with caplog.at_level(logging.WARNING):
        assert cache.get("k") is None
    assert len(caplog.records) == 1 and "corrupt" in caplog.records[0].getMessage()
    cache.put("k", {"micro_batch_size": 1})
    assert json.loads(path.read_text()) == {"k": {"micro_batch_size": 1}}


def test_env_overrides_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCUM_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "plans.json"
    assert PlanCache().path == tmp_path / "plans.json"


def test_a_rewrite_keeps_the_files_mode_and_a_new_file_follows_the_umask(tmp_path):
    import os
    import stat

    path = tmp_path / "plans.json"
    cache = PlanCache(path)
    umask = os.umask(0o022)
    try:
        cache.put("a", {"micro_batch_size": 1})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
        path.chmod(0o640)
        cache.put("b", {"micro_batch_size": 2})
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_temporaries_of_killed_writers_are_removed_and_a_live_writers_are_kept(tmp_path):
    import os
    import time

    path = tmp_path / "plans.json"
    stale, live = tmp_path / ".tmp-plans.json.killed", tmp_path / ".tmp-plans.json.writing"
    for item in (stale, live):
        item.write_text("{half")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    PlanCache(path).put("k", {"micro_batch_size": 1})
    assert not stale.exists() and live.exists()


POISONED = {  # entries a run must not train with
    "negative sizes that multiply out": {"micro_batch_size": -1, "accumulation_steps": -4, "num_processes": 1,
                                         "effective_batch_size": 4, "target_batch_size": 4},
    "a size as text": {"micro_batch_size": "2", "accumulation_steps": 2, "num_processes": 1,
                       "effective_batch_size": 4, "target_batch_size": 4},
    "a fractional size": {"micro_batch_size": 2.5, "accumulation_steps": 2, "num_processes": 1,
                          "effective_batch_size": 4, "target_batch_size": 4},
    "not a mapping of sizes": {"micro_batch_size": [2]},
    "not a mapping": [4, 2, 1],
}


@pytest.mark.parametrize("case", list(POISONED))
def test_a_poisoned_entry_is_not_a_plan(case):
    from accum.errors import ConfigError
    from accum.plan import Plan

    with pytest.raises(ConfigError):
        Plan.from_dict(POISONED[case])


def test_a_poisoned_entry_is_ignored_and_named_with_the_file_and_replan(tmp_path, capsys):
    """Before, -1 x -4 multiplied out to 4 and reached training."""
    from accum.cli.main import main

    cache = tmp_path / "plans.json"
    argv = ["plan", "--model", "gpt2-tiny", "--seq-len", "8", "--batch-size", "4", "--plan-cache", str(cache), "--json"]
    assert main(argv) == 0
    good = json.loads(capsys.readouterr().out)
    (key,) = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: POISONED["negative sizes that multiply out"]}))
    assert main(argv) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "--replan" in warnings[0], captured.err
    assert json.loads(captured.out)["micro_batch_size"] == good["micro_batch_size"]  # probed again
    assert json.loads(cache.read_text())[key]["micro_batch_size"] == good["micro_batch_size"]  # and rewritten
