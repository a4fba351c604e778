"""The GPU bench: the checks that need an accelerator, in one script of sections, each at most five
minutes on a GPU. On a machine without one it runs the same code on the CPU with a tiny model (a
test does), so it is ready when a GPU is lent.

    python bench/gpu_bench.py                                  # every section; results to bench/results/
    python bench/gpu_bench.py --sections planner --out /tmp/b  # one section
    PYTHONPATH=. python3 bench/gpu_bench.py ...                # on a lent GPU machine (no `make install`)

Sections:
- tokens: real tokens per second, padding efficiency and utilisation (6 x non-embedding parameters x real
  tokens/s / the device's dense bf16 peak) of configs/gpu_gpt2.yaml (bf16) with windows cut by samples,
  by a token budget, and packed into 512-token blocks; configs/clm_tiny.yaml on the CPU.
- planner: the planner's answer with safety margin 0 and with the default margin (0.1), each in a
  fresh process; the fresh-process maximum, bisected within 10% around the margin-0 answer with
  `--steps` training steps back to back per size (each size a fresh process); whether the
  default-margin answer trains `--long-steps` steps; Accelerate's find_executable_batch_size from
  `--accelerate-start`. Workload: GPT-2 small (124M, from its config), 512 tokens, AdamW, fp32 on a
  GPU (real CUDA OOMs); the tiny LM of scripts/compare_planner.py under a 236 MiB address-space cap
  on the CPU (real allocator OOMs).

- speed: real tokens/s and utilisation of train.py, a plain PyTorch loop and Hugging Face Trainer
  (model_accepts_loss_kwargs=False) on packed blocks at the same effective batch (GPT-2 small, 512
  tokens, bf16 on a GPU; a tiny GPT-2 on the CPU), with and without torch.compile, train.py also with
  --noise-scale, interleaved; host synchronisations per window under CUDA's sync debug mode.

- engines: world-size-1 smoke runs of Accelerate's FSDP2 and DeepSpeed ZeRO-2 plugins (train.py, 3 steps of
  configs/clm_tiny.yaml); skipped, with the reason, without a GPU or without deepspeed installed.

Writes <out>/<date>-gpu-bench-<device>.json and .md: every figure with the command that made it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CPU_CAP_BYTES = 236 * 2**20  # over the warm child (scripts/compare_planner.py's workload): a maximum in the 30s


def device_description() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {"device": "cuda", "name": props.name, "memory_bytes": props.total_memory, "torch": torch.__version__}
    return {"device": "cpu", "name": platform.processor() or platform.machine(), "memory_bytes": None,
            "torch": torch.__version__}


# ----------------------------------------------------------------------------- planner


def section_planner(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    from scripts.compare_planner import fits, run_child

    workload = "gpt2-small" if device["device"] == "cuda" else "tiny"
    cap = 0 if device["device"] == "cuda" else CPU_CAP_BYTES
    began = time.perf_counter()
    margin0 = run_child("accum", cap, workload=workload, margin=0.0, timeout=600)
    default = run_child("accum", cap, workload=workload, margin=0.1, timeout=600)
    lo, hi = max(1, math.floor(0.9 * margin0["size"])), math.ceil(1.1 * margin0["size"])
    fresh_max, tried = bisect_fresh_maximum(lambda size: fits(cap, size, steps=args.steps, workload=workload), lo, hi)
    long_ok = fits(cap, default["size"], steps=args.long_steps, workload=workload)
    accelerate = run_child("accelerate", cap, ["--start", str(args.accelerate_start)], workload=workload, timeout=600)
    return {
        "workload": workload, "cap_bytes": cap or None, "steps_per_size": args.steps,
        "margin_0": {key: margin0[key] for key in ("size", "probes", "seconds")},
        "margin_default": {"margin": 0.1, **{key: default[key] for key in ("size", "probes", "seconds")}},
        "fresh_process_maximum": fresh_max, "bisection_range": [lo, hi], "fresh_checks": tried,
        "margin_0_over_fresh_maximum": margin0["size"] / fresh_max if fresh_max else None,
        "margin_0_trains": bool(tried.get(str(margin0["size"]), fits(cap, margin0["size"], steps=args.steps,
                                                                      workload=workload))),
        "default_margin_trains_long": long_ok, "long_steps": args.long_steps,
        "accelerate": {"start": args.accelerate_start, **{key: accelerate[key] for key in ("size", "probes", "seconds")}},
        "seconds": round(time.perf_counter() - began, 1),
    }


def bisect_fresh_maximum(fits_size, lo: int, hi: int) -> tuple[int | None, dict[str, bool]]:
    """The largest size in [lo, hi] for which `fits_size` holds, by bisection (fit assumed monotone);
    None when even `lo` does not fit. Returns it and every size tried (as strings, for JSON)."""
    tried: dict[str, bool] = {}

    def check(size: int) -> bool:
        tried[str(size)] = fits_size(size)
        return tried[str(size)]

    if not check(lo):
        return None, tried
    if check(hi):
        return hi, tried
    while hi - lo > 1:
        middle = (lo + hi) // 2
        lo, hi = (middle, hi) if check(middle) else (lo, middle)
    return lo, tried


# ----------------------------------------------------------------------------- tokens

# Dense bf16 peak of one device, FLOP/s (vendor data sheets), for utilisation = 6 x non-embedding
# parameters x real tokens per second / peak.
BF16_PEAK = {"H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200": 989e12,
             "A100-SXM4-80GB": 312e12, "A100-SXM4-40GB": 312e12, "A100 80GB PCIe": 312e12, "L4": 121e12,
             "A10G": 125e12, "RTX 4090": 165e12}


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK.items():
        if key in name:
            return peak
    return None


def non_embedding_parameters(config_path: Path) -> int:
    """Parameters of the run config's model, less its token and position embeddings (meta device)."""
    import torch
    import yaml
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(yaml.safe_load(config_path.read_text())["model_config_overrides"])
    overrides.setdefault("vocab_size", 30522)  # the MiniLM tokenizer the configs use
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(overrides.pop("model_type"), **overrides))
    embeddings = {id(p) for name, p in model.named_parameters() if "wte" in name or "wpe" in name or "embed" in name}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def steady_tokens_per_second(metrics_jsonl: Path, skip: int = 2) -> float | None:
    """Real tokens per second over the optimizer steps after the first `skip` (warm-up, compilation)."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    timed = [r for r in records[skip:] if r.get("tokens_per_s")]
    if not timed:
        return None
    tokens = [r["tokens_seen"] - p["tokens_seen"] for p, r in zip(records[skip - 1:], records[skip:], strict=False)]
    seconds = sum(t / r["tokens_per_s"] for t, r in zip(tokens, timed, strict=False))
    return sum(tokens[:len(timed)]) / seconds if seconds > 0 else None


def section_tokens(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    """Real tokens per second and utilisation of the GPU config with windows cut by samples, by a
    token budget, and with packed 512-token blocks; each a train.py run in a fresh process."""
    import subprocess
    import tempfile

    gpu = device["device"] == "cuda"
    config = ROOT / "configs" / ("gpu_gpt2.yaml" if gpu else "clm_tiny.yaml")
    variants = {"samples": ["--cut-by", "samples"], "tokens": ["--cut-by", "tokens"],
                "packing": ["--cut-by", "tokens", "--packing"]}
    common = ["--micro-batch-size", "auto", "--max-steps", str(args.token_steps), "--report-to", "none", "--noise-scale", "false",
              "--eval-batch-size", "8", "--max-eval-samples", "16", "--overwrite"]
    if gpu:
        common += ["--mixed-precision", "bf16"]
        # Accelerate's fp16 path (loss scaling, the scaler's skipped steps) on the same cut
        variants["tokens, fp16"] = ["--cut-by", "tokens", "--mixed-precision", "fp16"]
    if args.tokenizer:
        common += ["--tokenizer", args.tokenizer]
    parameters = non_embedding_parameters(config)
    peak = bf16_peak(device["name"]) if gpu else None
    results = {}
    with tempfile.TemporaryDirectory(prefix="accum-gpu-bench-") as tmp:
        for name, flags in variants.items():
            out = Path(tmp) / name
            command = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config), *common, *flags,
                       "--output-dir", str(out), "--plan-cache", str(Path(tmp) / "plans.json")]
            began = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
            if done.returncode != 0:
                results[name] = {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:300]}
                continue
            metrics = json.loads((out / "metrics.json").read_text())
            rate = steady_tokens_per_second(out / "metrics.jsonl")
            results[name] = {
                "real_tokens_per_s": rate, "padding_efficiency": metrics.get("padding_efficiency"),
                "plan": {key: metrics["plan"].get(key) for key in ("micro_batch_size", "accumulation_steps",
                                                                    "micro_batch_tokens", "cut")},
                "utilisation": 6 * parameters * rate / peak if peak and rate else None,
                "seconds": round(time.perf_counter() - began, 1)}
    return {"config": config.name, "non_embedding_parameters": parameters, "bf16_peak_flops": peak,
            "optimizer_steps": args.token_steps, "variants": results}


# ----------------------------------------------------------------------------- speed


def speed_workload(gpu: bool, compile_arms: bool) -> dict[str, Any]:
    """GPT-2 small on 512-token packed blocks in bf16 on a GPU; a tiny GPT-2 on 64-token blocks in
    fp32 on the CPU (what the test runs). Same effective batch for every arm."""
    if gpu:
        model = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 512, "vocab_size": 50257}
        return {"model": model, "block": 512, "micro": 16, "accum": 4, "steps": 10, "skip": 3, "repeats": 3,
                "precision": "bf16", "compile": compile_arms}
    model = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64, "vocab_size": 1000}
    return {"model": model, "block": 64, "micro": 4, "accum": 2, "steps": 5, "skip": 2, "repeats": 1,
            "precision": "no", "compile": compile_arms}


def gpt2_from(overrides: dict[str, Any]):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**overrides, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def packed_blocks(count: int, block: int, vocab: int) -> list[dict[str, list[int]]]:
    """`count` blocks of exactly `block` token ids (packed text has no padding)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (count, block), generator=generator)
    return [{"input_ids": row} for row in ids.tolist()]


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def steady_rate(marks: list[float], skip: int, tokens_per_window: int) -> float:
    """Tokens per second from the end of window `skip` to the end of the last (warm-up and compilation
    in the first `skip` windows left out). marks: a time after each optimizer step."""
    return tokens_per_window * (len(marks) - skip) / (marks[-1] - marks[skip - 1])


def fresh_accelerate_state() -> None:
    """Accelerate keeps one process-wide state and refuses a second precision: a clean one per arm."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run_accum_arm(w: dict[str, Any], data, out: Path, compile_: bool, noise: bool) -> list[float]:
    """scripts/train.py's train() in this process; marks after each window (a Callback)."""
    from accum.cli.config import make_config
    from accum.window import Callback
    from scripts.train import train

    marks: list[float] = []

    class Mark(Callback):
        def on_window_end(self, accumulator, result) -> None:
            synchronize()
            marks.append(time.perf_counter())

    fresh_accelerate_state()
    config = make_config(dict(task="clm", model_config_overrides={"model_type": "bench-in-process"}, optimizer="adamw",
                              lr=1e-4, lr_scheduler="constant", max_grad_norm=1.0, batch_size=w["micro"] * w["accum"],
                              micro_batch_size=w["micro"], grad_accum_steps=w["accum"], max_steps=w["steps"],
                              max_seq_len=w["block"], mixed_precision=w["precision"], compile=compile_,
                              noise_scale=noise, output_dir=str(out), overwrite=True, report_to="none", seed=3,
                              log_every=10**6))
    train(config, model=gpt2_from(w["model"]), train_data=data, eval_data=None,
          cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=[Mark()])
    return marks


def embedding_backward_as_train_py(model, compile_: bool, device: str) -> None:
    """Sparse embedding gradients where train.py's `sparse_embedding_grads: auto` turns them on (one
    process here; GPT-2's wte is tied to its head, so only wpe turns sparse)."""
    from accum.embeddings import SparseEmbeddingGrads, use_sparse_embedding_grads

    if use_sparse_embedding_grads("auto", 1, None, compiled=compile_, device_type=device)[0]:
        SparseEmbeddingGrads(model)


def run_plain_arm(w: dict[str, Any], data, compile_: bool) -> list[float]:
    """A plain PyTorch loop: the same blocks in order, mean token loss / accumulation steps (exact for
    equal-length blocks), clip 1.0, AdamW, bf16 autocast on a GPU."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = gpt2_from(w["model"]).to(device).train()
    from accum.cli.planning import use_fused_adamw

    # the kernels train.py picks (fused_optimizer, sparse_embedding_grads: auto): the arms differ in their
    # loops, not their kernels
    embedding_backward_as_train_py(model, compile_, device)
    forward = torch.compile(model, dynamic=True) if compile_ else model
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=use_fused_adamw("auto", params) or None)
    micro, accum, marks = w["micro"], w["accum"], []
    ids = torch.tensor([row["input_ids"] for row in data])
    for step in range(w["steps"]):
        for k in range(accum):
            first = (step * accum + k) * micro
            batch = ids[first:first + micro].to(device, non_blocking=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=w["precision"] == "bf16"):
                loss = forward(input_ids=batch, labels=batch).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        marks.append(time.perf_counter())
    return marks


def run_trainer_arm(w: dict[str, Any], data, out: Path, compile_: bool) -> list[float]:
    """Hugging Face Trainer used correctly (model_accepts_loss_kwargs = False: its own 1/N scaling of
    each micro-batch's mean loss, exact for equal-length blocks), in order, same optimizer and clip."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    marks: list[float] = []

    class Mark(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize()
            marks.append(time.perf_counter())

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    def collate(rows):
        ids = torch.tensor([row["input_ids"] for row in rows])
        return {"input_ids": ids, "labels": ids}

    fresh_accelerate_state()
    gpu = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=w["micro"], gradient_accumulation_steps=w["accum"],
        max_steps=w["steps"], learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch_fused", logging_steps=10**6, report_to="none", save_strategy="no", eval_strategy="no",
        use_cpu=not gpu, bf16=w["precision"] == "bf16", torch_compile=compile_, dataloader_num_workers=0,
        disable_tqdm=True, seed=3)
    model = gpt2_from(w["model"])
    embedding_backward_as_train_py(model, compile_, "cuda" if gpu else "cpu")
    trainer = InOrder(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Mark()])
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return marks


def host_syncs_per_window(w: dict[str, Any], data, out: Path) -> dict[str, Any]:
    """On CUDA, train() windows of `accum` and 2 x `accum` micro-batches under
    torch.cuda.set_sync_debug_mode('warn'): the synchronising operations counted per window (from a
    window's start to its end, the window's one transfer of loss, padding and norm included), and the
    distinct messages. A count that grows with the micro-batches is a sync inside the micro-steps."""
    import warnings

    import torch

    from accum.cli.config import make_config
    from accum.window import Callback
    from scripts.train import train

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: set_sync_debug_mode has nothing to watch"}

    class Count(Callback):
        def __init__(self):
            self.counts, self.messages, self.catcher, self.caught = [], set(), None, None

        def on_window_start(self, accumulator, samples) -> None:
            self.catcher = warnings.catch_warnings(record=True)
            self.caught = self.catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

        def on_window_end(self, accumulator, result) -> None:
            torch.cuda.set_sync_debug_mode(0)
            self.catcher.__exit__(None, None, None)
            syncs = [str(c.message).splitlines()[0] for c in self.caught if "synchroniz" in str(c.message)]
            self.counts.append(len(syncs))
            self.messages.update(syncs)

    result = {}
    for accum in (w["accum"], 2 * w["accum"]):
        counter = Count()
        fresh_accelerate_state()
        config = make_config(dict(task="clm", model_config_overrides={"model_type": "bench-in-process"},
                                  optimizer="adamw", lr=1e-4, lr_scheduler="constant", max_grad_norm=1.0,
                                  batch_size=w["micro"] * accum, micro_batch_size=w["micro"], grad_accum_steps=accum,
                                  max_steps=3, max_seq_len=w["block"], mixed_precision=w["precision"],
                                  output_dir=str(out / f"sync-{accum}"), overwrite=True, report_to="none", seed=3))
        train(config, model=gpt2_from(w["model"]), train_data=data, eval_data=None,
              cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=[counter])
        result[f"accum_{accum}"] = {"syncs_per_window": counter.counts, "messages": sorted(counter.messages)[:10]}
    return result


def section_speed(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    """Real tokens per second of (a) scripts/train.py's train(), (b) a plain PyTorch loop and (c)
    Hugging Face Trainer at the same effective batch on packed blocks, each with and without
    torch.compile (--speed-compile), and train() with --noise-scale; arms interleaved (the order
    reversed every repeat), medians with min and max; utilisation against the dense bf16 peak; host
    synchronisations per window under CUDA's sync debug mode."""
    import statistics
    import tempfile

    gpu = device["device"] == "cuda"
    w = speed_workload(gpu, args.speed_compile if args.speed_compile is not None else gpu)
    tokens_per_window = w["micro"] * w["accum"] * w["block"]
    data = packed_blocks(w["micro"] * w["accum"] * w["steps"], w["block"], w["model"]["vocab_size"])
    model = gpt2_from(w["model"])
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    parameters = sum(p.numel() for p in model.parameters()) - embeddings
    del model
    peak = bf16_peak(device["name"]) if gpu else None
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="accum-gpu-speed-") as tmp:
        arms = {"train.py": lambda: run_accum_arm(w, data, Path(tmp) / "a", False, False),
                "train.py --noise-scale": lambda: run_accum_arm(w, data, Path(tmp) / "n", False, True),
                "plain loop": lambda: run_plain_arm(w, data, False),
                "Trainer": lambda: run_trainer_arm(w, data, Path(tmp) / "t", False)}
        if w["compile"]:
            arms.update({"train.py --compile": lambda: run_accum_arm(w, data, Path(tmp) / "ac", True, False),
                         "plain loop, compiled": lambda: run_plain_arm(w, data, True),
                         "Trainer --torch_compile": lambda: run_trainer_arm(w, data, Path(tmp) / "tc", True)})
        syncs = host_syncs_per_window(w, data, Path(tmp))
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for repeat in range(w["repeats"]):
            if repeat and time.perf_counter() - began > args.speed_budget:
                print(f"[gpu bench] speed: {args.speed_budget:.0f} s spent, stopping after {repeat} repeats",
                      file=sys.stderr, flush=True)
                break
            for name in (list(arms) if repeat % 2 == 0 else list(arms)[::-1]):
                marks = arms[name]()
                rates[name].append(steady_rate(marks, w["skip"], tokens_per_window))
                print(f"[gpu bench] speed {name}: {rates[name][-1]:,.0f} tokens/s", file=sys.stderr, flush=True)
                # a run cut short by its time limit still leaves every rate measured so far
                partial = {"workload": w, "host_syncs": syncs, "rates": rates}
                (Path(args.out) / "speed-partial.json").write_text(json.dumps(partial, indent=1) + "\n")

    def summary(values: list[float]) -> dict[str, Any]:
        median = statistics.median(values)
        return {"median": median, "min": min(values), "max": max(values), "n": len(values),
                "utilisation": 6 * parameters * median / peak if peak else None}

    table = {name: summary(values) for name, values in rates.items()}
    ratios = {"train.py / plain loop": table["train.py"]["median"] / table["plain loop"]["median"],
              "train.py / Trainer": table["train.py"]["median"] / table["Trainer"]["median"],
              "noise scale cost": 1 - table["train.py --noise-scale"]["median"] / table["train.py"]["median"]}
    if w["compile"]:
        ratios["train.py --compile / plain loop, compiled"] = (table["train.py --compile"]["median"]
                                                               / table["plain loop, compiled"]["median"])
    return {"workload": w, "tokens_per_window": tokens_per_window, "non_embedding_parameters": parameters,
            "bf16_peak_flops": peak, "tokens_per_s": table, "ratios": ratios, "host_syncs": syncs,
            "seconds": round(time.perf_counter() - began, 1)}


def engine_skip_reason(engine: str, cuda: bool, deepspeed_installed: bool) -> str | None:
    """Why an engine's smoke run cannot run here (None: it can). Accelerate 1.15 enables its FSDP and
    DeepSpeed plugins only on GPUs, and DeepSpeed is not a dependency of accum."""
    if not cuda:
        return f"no CUDA device: Accelerate enables {engine} only on GPUs"
    if engine == "DeepSpeed" and not deepspeed_installed:
        return "deepspeed is not installed (pip install deepspeed; it is not a dependency of accum)"
    return None


def section_engines(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    """World-size-1 smoke runs of Accelerate's FSDP (FSDP2) and DeepSpeed (ZeRO-2) plugins: train.py on
    configs/clm_tiny.yaml for 3 optimizer steps through accelerate_configs/fsdp.yaml and
    deepspeed_zero2.yaml with one process. Each says whether it ran to the end (exit 0) and its final
    loss, or why it was skipped."""
    import importlib.util

    import torch

    cuda = torch.cuda.is_available()
    installed = importlib.util.find_spec("deepspeed") is not None
    results = {}
    for engine, config in (("FSDP", "fsdp.yaml"), ("DeepSpeed", "deepspeed_zero2.yaml")):
        reason = engine_skip_reason(engine, cuda, installed)
        if reason is not None:
            results[engine] = {"skipped": reason}
            continue
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(ROOT / "accelerate_configs" / config), "--num_processes", "1",
                       str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "clm_tiny.yaml"),
                       "--max-steps", "3", "--output-dir", out, "--report-to", "none"]
            if args.tokenizer:
                command += ["--tokenizer", args.tokenizer]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
            metrics = Path(out) / "metrics.json"
            final = json.loads(metrics.read_text()).get("final_loss") if metrics.exists() else None
            results[engine] = {"exit_code": done.returncode, "final_loss": final, "command": " ".join(command),
                               "stderr_tail": done.stderr[-600:] if done.returncode else ""}
    return results


SECTIONS = {"planner": section_planner, "tokens": section_tokens, "speed": section_speed, "engines": section_engines}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU bench: {report['device']['name']} ({report['device']['device']})", "",
             f"`{report['command']}` on {report['date']}, torch {report['device']['torch']}.", ""]
    planner = report["sections"].get("planner")
    if planner:
        lines += ["## planner", "",
                  f"Workload {planner['workload']}; each size a fresh process training {planner['steps_per_size']} steps.", "",
                  "| what | micro-batch | probes | seconds |", "|---|---|---|---|",
                  f"| accum, safety margin 0 | {planner['margin_0']['size']} | {planner['margin_0']['probes']} | "
                  f"{planner['margin_0']['seconds']:.1f} |",
                  f"| accum, safety margin 0.1 | {planner['margin_default']['size']} | "
                  f"{planner['margin_default']['probes']} | {planner['margin_default']['seconds']:.1f} |",
                  f"| accelerate find_executable_batch_size from {planner['accelerate']['start']} | "
                  f"{planner['accelerate']['size']} | {planner['accelerate']['probes']} | "
                  f"{planner['accelerate']['seconds']:.1f} |",
                  f"| fresh-process maximum (bisected in {planner['bisection_range']}) | "
                  f"{planner['fresh_process_maximum']} | - | - |", "",
                  f"margin-0 answer / fresh maximum: {planner['margin_0_over_fresh_maximum']}; margin-0 answer trains "
                  f"{planner['steps_per_size']} steps: {planner['margin_0_trains']}; margin-0.1 answer trains "
                  f"{planner['long_steps']} steps: {planner['default_margin_trains_long']}.", ""]
    tokens = report["sections"].get("tokens")
    if tokens:
        lines += ["## tokens", "", f"{tokens['config']}, {tokens['optimizer_steps']} optimizer steps per variant, "
                  f"{tokens['non_embedding_parameters']:,} non-embedding parameters.", "",
                  "| variant | real tokens/s | padding efficiency | utilisation | plan |", "|---|---|---|---|---|"]
        for name, row in tokens["variants"].items():
            if "error" in row:
                lines.append(f"| {name} | error: {row['error']} | | | |")
                continue
            util = "-" if row["utilisation"] is None else f"{row['utilisation']:.1%}"
            lines.append(f"| {name} | {row['real_tokens_per_s'] or 0:,.0f} | {row['padding_efficiency'] or 0:.3f} | "
                         f"{util} | {row['plan']} |")
        lines.append("")
    speed = report["sections"].get("speed")
    if speed:
        w = speed["workload"]
        lines += ["## speed", "", f"GPT-2 ({w['model']['n_layer']} layers, {w['model']['n_embd']} wide) on packed "
                  f"{w['block']}-token blocks, {w['micro']} x {w['accum']} per window, {w['precision']}, {w['steps']} "
                  f"optimizer steps per run (the first {w['skip']} untimed), {w['repeats']} interleaved repeats.", "",
                  "| arm | real tokens/s (median [min-max]) | utilisation of dense bf16 peak |", "|---|---|---|"]
        for name, row in speed["tokens_per_s"].items():
            util = "-" if row["utilisation"] is None else f"{row['utilisation']:.1%}"
            lines.append(f"| {name} | {row['median']:,.0f} [{row['min']:,.0f}-{row['max']:,.0f}] | {util} |")
        lines += ["", "| ratio | value |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in speed["ratios"].items()]
        lines += ["", f"Host synchronisations per window (CUDA sync debug mode): {json.dumps(speed['host_syncs'])}", ""]
    engines = report["sections"].get("engines")
    if engines:
        lines += ["## engines (one process)", "", "| engine | result |", "|---|---|"]
        for name, row in engines.items():
            result = row.get("skipped") and f"skipped: {row['skipped']}" or \
                f"exit {row['exit_code']}, final loss {row['final_loss']}"
            lines.append(f"| {name} | {result} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and Markdown go")
    parser.add_argument("--steps", type=int, default=20, help="planner: steps per fresh-process check")
    parser.add_argument("--long-steps", type=int, default=100, help="planner: steps the default-margin answer trains")
    parser.add_argument("--accelerate-start", type=int, default=512, help="planner: find_executable_batch_size's start")
    parser.add_argument("--token-steps", type=int, default=8, help="tokens: optimizer steps per variant")
    parser.add_argument("--speed-compile", type=lambda v: v.lower() in ("1", "true", "yes"), default=None,
                        help="speed: also time the torch.compile arms (true/false; default: on a GPU only)")
    parser.add_argument("--speed-budget", type=float, default=240.0,
                        help="speed: seconds after which no further interleaved repeat starts (at least one runs)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokens, engines: tokenizer path for train.py (a GPU machine without the MiniLM package)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}: use {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = device_description()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"command": "python bench/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": device, "sections": {}}
    for name in names:
        print(f"[gpu bench] section {name} on {device['name']} ({device['device']})", file=sys.stderr, flush=True)
        report["sections"][name] = SECTIONS[name](args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subset = "" if names == list(SECTIONS) else "-" + "-".join(names)
    stem = f"{report['date']}-gpu-bench-{device['device']}{subset}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
