"""What OOM recovery costs: throughput with it on vs off when nothing fails, the agreement all-reduce,
and one recovery in seconds. Not a test; prints one JSON line per measurement.

    python tests/helpers/adaptive_bench.py one
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/helpers/adaptive_bench.py two-on
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/helpers/adaptive_bench.py two-off
"""

import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from accum.cli.config import make_config  # noqa: E402
from accum.loss import TaskLoss  # noqa: E402
from accum.window import Callback  # noqa: E402
from scripts import train as train_mod  # noqa: E402

CPU_OOM = "DefaultCPUAllocator: can't allocate memory"


def model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=128, n_embd=128, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0))


def data(count):
    rng = random.Random(0)
    return [{"input_ids": [rng.randrange(1, 4096) for _ in range(128)]} for _ in range(count)]


def run(out, micro, accum, steps, processes, **extra):
    config = make_config(dict(task="clm", model_config_overrides={"model_type": "gpt2"}, optimizer="sgd", lr=0.1,
                              max_grad_norm=None, batch_size=micro * accum * processes, micro_batch_size=micro,
                              grad_accum_steps=accum, eval_batch_size=8, max_steps=steps, output_dir=out,
                              report_to="none", plan_cache=f"{out}/plans.json", overwrite=True, **extra))
    train_set = data(micro * accum * processes * steps)
    times = []

    class Timer(Callback):
        def on_window_start(self, accumulator, samples):
            self.start = time.perf_counter()

        def on_window_end(self, accumulator, result):
            times.append(time.perf_counter() - self.start)

    metrics = train_mod.train(config, model=model(), train_data=train_set, eval_data=train_set[:8],
                              cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=[Timer()])
    return times, metrics


def on_vs_off(processes, micro=8, accum=4, steps=12, repeats=3):
    results = {"on": [], "off": []}
    tmp = f"{tempfile.gettempdir()}/accum-adaptive-bench"  # the same on every rank
    for repeat in range(repeats):
        for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
            times, _ = run(f"{tmp}/{mode}", micro, accum, steps, processes, oom_recovery=mode == "on")
            results[mode].append(statistics.median(times[2:]))  # steady state: skip the first windows
    on, off = min(results["on"]), min(results["off"])
    return {"processes": processes, "micro": micro, "accum": accum, "window_s_on": round(on, 4),
            "window_s_off": round(off, 4), "throughput_ratio_on_vs_off": round(off / on, 4)}


def agreement_cost(accelerator_calls=300):
    from accelerate import Accelerator

    from accum.recovery import agree_max

    accelerator = Accelerator()
    agree_max([0.0, 0.0], accelerator.device)
    start = time.perf_counter()
    for _ in range(accelerator_calls):
        agree_max([0.0, 0.0], accelerator.device)
    return {"agree_max_allreduce_us": round((time.perf_counter() - start) / accelerator_calls * 1e6, 1),
            "processes": accelerator.num_processes}


def recovery_cost(micro=8, accum=4, steps=10, fail_at_window=5):
    """One injected OOM in the last micro-batch of a window (the worst case: the whole window is redone)."""
    state = {"forwards": 0}
    original = TaskLoss.forward

    def forward(self, model_, batch):  # a measurement script, not product code: the OOM is injected here
        if model_.training:
            state["forwards"] += 1
            if state["forwards"] == fail_at_window * accum:
                raise RuntimeError(CPU_OOM)
        return original(self, model_, batch)

    TaskLoss.forward = forward
    try:
        with tempfile.TemporaryDirectory() as tmp:
            times, metrics = run(f"{tmp}/rec", micro, accum, steps, 1)
    finally:
        TaskLoss.forward = original
    after = statistics.median(times[fail_at_window:])
    return {"recovery_window_s": round(times[fail_at_window - 1], 3), "normal_window_s_after": round(after, 3),
            "one_recovery_costs_s": round(times[fail_at_window - 1] - after, 3),
            "adjustments": len(metrics["adjustments"])}


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] == "one":
        print(json.dumps(on_vs_off(1)))
        print(json.dumps(recovery_cost()))
    else:  # two-on | two-off: one launch each (end_training ends the process group)
        import os

        mode = sys.argv[1].split("-")[1]
        cost = agreement_cost() if mode == "on" else None
        times, _ = run(f"{tempfile.gettempdir()}/accum-adaptive-bench/{mode}", 4, 4, 12, 2, oom_recovery=mode == "on")
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps({"processes": 2, "recovery": mode, "window_s": round(statistics.median(times[2:]), 4),
                              **(cost or {})}))
