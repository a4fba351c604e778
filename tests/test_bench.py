"""scripts/bench.py --quick end to end (a tiny model, every section), and the report's structure.

The timings of a quick run mean little (a tiny model on a shared CPU); what is checked is that every
section ran, every figure is a ratio with its repeats, the report names the command, versions and
machine, that what must hold exactly holds (Trainer's default applies N times the gradient, the fair
Trainer and train() apply 1x and end at the same loss, layouts agree within 1e-5, a cached plan costs
zero probes, peak memory at N=8 within 5% of N=1), the planner's answer is within one of the
brute-force largest and beats Accelerate's helper, and timing ratios lie within wide sanity bounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    jsons, mds = list(out.glob("*.json")), list(out.glob("*.md"))
    assert len(jsons) == 1 and len(mds) == 1 and jsons[0].stem == mds[0].stem
    assert jsons[0].stem.endswith("-quick")
    return json.loads(jsons[0].read_text()), mds[0].read_text()


def assert_spread(stat: dict, repeats: int) -> None:
    assert stat["n"] == repeats == len(stat["values"])
    assert stat["min"] <= stat["median"] <= stat["max"]
    assert all(value > 0 for value in stat["values"])


@pytest.mark.slow
def test_quick_bench_reports_every_section(quick_report):
    report, markdown = quick_report
    cfg = report["config"]
    assert report["command"].startswith("python scripts/bench.py --quick")
    for key in ("torch", "accelerate", "transformers", "python"):
        assert report["versions"][key]
    assert report["machine"]["cores"] >= 1 and report["machine"]["memory_gib"] > 0 and report["machine"]["cpu"]
    results = report["results"]
    assert set(results) == {"overhead", "noise", "integrity", "data", "tokens", "memory", "planner", "trainer",
                            "equivalence"}
    assert not [name for name, section in results.items() if "error" in section]

    # Throughput ratios on a shared 2-core CPU are noisy (the aims are for `make bench`): here they must only lie
    # within [0.5, 1.5], which a loop twice as slow as the plain one, or a noise meter halving throughput, fails
    # (quick runs measured here: overhead 0.91, noise 0.88, Trainer/accum loop 1.10). The overhead's upper
    # bound is 2.5: its 2 repeats of 3 windows on a tiny model, run first in a fresh clone right after the
    # install, once gave 1.56 (accum faster); only a loop slower than the plain one is what it must catch.
    overhead = results["overhead"]
    assert_spread(overhead["ratio"], cfg["overhead"]["repeats"])
    assert_spread(overhead["ratio_cpu"], cfg["overhead"]["repeats"])
    assert isinstance(overhead["met"], bool)
    assert 0.5 <= overhead["ratio"]["median"] <= 2.5 and 0.5 <= overhead["ratio_cpu"]["median"] <= 2.5

    per_window = overhead["accum_ms_per_window"]["values"], overhead["plain_ms_per_window"]["values"]
    assert overhead["overhead_ms_per_window"]["values"] == pytest.approx([a - b for a, b in zip(*per_window, strict=True)])
    assert overhead["plain_ms_per_window"]["q1"] <= overhead["plain_ms_per_window"]["median"]

    noise = results["noise"]
    meter = noise["meter"]
    for figure in ("own_ms_per_micro_step", "own_fraction", "gradient_pass_ms"):
        assert_spread(meter[figure], cfg["noise"]["meter_windows"])
    assert meter["ms_per_micro_step"]["n"] == cfg["noise"]["meter_windows"]  # a difference: may come out negative
    # one read of the fresh gradients per micro-step: less than the forward and backward themselves (the tiny model
    # is mostly a 2M-parameter embedding with little compute, so its fraction is far above MiniLM's 5%); the meter's
    # own time is a part of a window, so positive and below the whole window
    assert -0.2 < meter["fraction"]["median"] < 1.0 and isinstance(noise["met_meter"], bool)
    assert 0 < meter["own_fraction"]["median"] < 1.0 and meter["gradient_pass_ms"]["median"] > 0

    integrity = results["integrity"]  # a check or a copy costing more than a window would be a bug
    for arm in ("check", "copy"):
        assert integrity[arm]["cpu"]["n"] == cfg["integrity"]["windows"]
        assert -0.5 < integrity[arm]["cpu"]["median"] < 1.0
    assert isinstance(integrity["met"], bool)
    data = results["data"]
    for arm in ("inline", "prefetch"):
        assert_spread(data["data_wait_fraction"][arm], cfg["data"]["repeats"])
        assert data["data_wait_fraction"][arm]["median"] < 1
    tokens = results["tokens"]
    assert tokens["padding_efficiency"]["tokens"] > tokens["padding_efficiency"]["fixed"]
    assert_spread(noise["ratio"], cfg["noise"]["repeats"])
    assert_spread(noise["ratio_cpu"], cfg["noise"]["repeats"])
    assert isinstance(noise["met"], bool)
    # the meter's cost is CPU time: per CPU second it must not halve throughput. Wall time under the loaded suite
    # mostly measures the neighbours (single repeats spread 0.50-2.40 beside two busy processes), so its bound
    # is wider: a meter that quadruples a window still fails it
    assert 0.5 <= noise["ratio_cpu"]["median"] <= 1.5 and 0.25 <= noise["ratio"]["median"] <= 2.5

    memory = results["memory"]
    for key in ("peak_ratio_accum_vs_m", "peak_ratio_accum_vs_big", "growth_ratio_accum_vs_m"):
        assert_spread(memory[key], cfg["memory"]["repeats"])
    # one micro-batch's activations at a time: accumulating 8 micro-batches peaks within the aim of 5% of one
    # (measured here: 1.002-1.019). The step's own growth is small on the tiny model (8 MiB): accumulating adds
    # one gradient set while autograd adds a micro-batch's gradient to .grad (measured 1.9x of 8 MiB since AdamW
    # runs fused, whose step no longer hides it); 8 micro-batches' activations held at once would be about 8x
    assert memory["peak_ratio_accum_vs_m"]["median"] <= 1.05 and memory["met"] is True
    assert memory["growth_ratio_accum_vs_m"]["median"] <= 2.5 and memory["peak_ratio_accum_vs_big"]["median"] <= 1.05

    planner = results["planner"]
    assert planner["true_largest"] >= 1
    assert 0 < planner["accum"]["size"] <= planner["true_largest"] + 1
    # within one of the brute-force largest (measured here: 5 of 6, where 6 fits alone but failed again when
    # retried inside the long-lived process), in at most 12 probes; and at least Accelerate's helper, in fewer probes
    assert planner["accum"]["size"] >= planner["true_largest"] - 1 and planner["accum"]["probes"] <= 12
    assert planner["accum"]["size"] >= planner["febs"]["size"] and planner["accum"]["probes"] <= planner["febs"]["probes"]
    assert planner["met_vs_febs"] is True
    assert planner["febs_from_1"]["size"] == 1  # Accelerate's helper only shrinks
    assert planner["cache"]["second"] == {**planner["cache"]["second"], "source": "cache", "probes": 0}

    trainer = results["trainer"]
    accum_steps = cfg["trainer"]["accum"]
    scale = trainer["gradient_scale"]
    assert scale["trainer_default"]["grad_norm_ratio"] == pytest.approx(accum_steps, rel=1e-3)
    assert scale["trainer_default"]["logged_loss_ratio"] == pytest.approx(accum_steps, rel=1e-3)
    for name in ("trainer_fair", "accum"):
        assert scale[name]["grad_norm_ratio"] == pytest.approx(1.0, rel=1e-3)
        assert scale[name]["residual_after_scale"] < 1e-4
    assert_spread(trainer["ratio_loop"], cfg["trainer"]["repeats"])
    for run in trainer["runs"]["accum"] + trainer["runs"]["trainer"]:
        assert run["optimizer_steps"] == cfg["trainer"]["optimizer_steps"]
    assert 0.5 <= trainer["ratio_loop"]["median"] <= 2.0
    # the same micro-batches in the same order: the same final loss (measured here: equal to every digit)
    assert trainer["final_loss_trainer"]["median"] == pytest.approx(trainer["final_loss_accum"]["median"], rel=1e-5)

    equivalence = results["equivalence"]
    assert set(equivalence["layouts"]) == {"4x2", "2x4", "1x8"}
    assert equivalence["largest"] <= 1e-5  # measured here: 7.9e-07
    assert all(layout["weights"] <= 1e-5 and layout["first_gradient"] <= 1e-5 for layout in equivalence["layouts"].values())

    assert "| figure | measured | aim | met |" in markdown
    for phrase in ("overhead", "noise scale cost", "memory: peak", "planner from 1", "find_executable_batch_size from",
                   "Trainer default", "equivalence", report["versions"]["torch"]):
        assert phrase in markdown
