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

Writes <out>/<date>-gpu-bench-<device>.json and .md: every figure with the command that made it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
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
    common = ["--max-steps", str(args.token_steps), "--report-to", "none", "--noise-scale", "false",
              "--eval-batch-size", "8", "--max-eval-samples", "16", "--overwrite"]
    if gpu:
        common += ["--mixed-precision", "bf16"]
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


SECTIONS = {"planner": section_planner, "tokens": section_tokens}


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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the JSON and Markdown go")
    parser.add_argument("--steps", type=int, default=20, help="planner: steps per fresh-process check")
    parser.add_argument("--long-steps", type=int, default=100, help="planner: steps the default-margin answer trains")
    parser.add_argument("--accelerate-start", type=int, default=512, help="planner: find_executable_batch_size's start")
    parser.add_argument("--token-steps", type=int, default=8, help="tokens: optimizer steps per variant")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}: use {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    device = device_description()
    report = {"command": "python bench/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "device": device, "sections": {}}
    for name in names:
        print(f"[gpu bench] section {name} on {device['name']} ({device['device']})", file=sys.stderr, flush=True)
        report["sections"][name] = SECTIONS[name](args, device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report['date']}-gpu-bench-{device['device']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
