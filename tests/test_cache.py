"""The plan cache: keys, atomic writes, a corrupt file ignored."""

import json
import logging

import accum
from accum.cache import PlanCache, default_cache_path
from accum.plan import plan_batch


def test_put_get_round_trip(tmp_path):
    cache = PlanCache(tmp_path / "sub" / "plans.json")
    key = cache.key("gpt2#abc", 128, "no", "cpu", 2**34, 1)
    assert cache.get(key) is None
    cache.put(key, plan_batch(64, 8).to_dict())
    assert cache.get(key)["micro_batch_size"] == 8
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.endswith(".tmp")]


def test_key_includes_everything_that_decides_memory():
    base = dict(model_id="m", seq_len=128, precision="bf16", device_name="cpu", device_memory=1, num_processes=1)
    keys = {PlanCache.key(**base)}
    for field, other in [("model_id", "n"), ("seq_len", 256), ("precision", "no"), ("device_name", "H100"),
                         ("device_memory", 2), ("num_processes", 2)]:
        keys.add(PlanCache.key(**{**base, field: other}))
    keys.add(PlanCache.key(**base, extra={"objective": "throughput"}))
    assert len(keys) == 8
    assert accum.__version__ in PlanCache.key(**base)


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
