"""The default run (`make train`'s command and config) as planned, against the run it was before windows
were cut by length, AdamW ran fused and embedding tables got sparse gradients ("before": 8 micro x 4
accumulation, fixed micro-batches of samples, torch's default AdamW, dense embedding gradients), at the
same effective batch (32) and optimizer steps (64), and two arms that tell changes apart (fixed 8 x 4
with everything else as now; cut by length with dense embedding gradients; the fused AdamW alone was
measured at 1.08x in the 2026-11-27 result); then once with --noise-scale (micro-batches cut by
samples: cut by length they are not random draws of the window) and what `python -m accum recommend`
makes of it. The arms rotate (A B C D, D C B A, ...) so drift on a shared machine falls on all. Writes
bench/results/<date>-<machine>-default-runs.md and .json.

    python bench/default_runs.py                 # about 12 minutes on a 2-core CPU
    python bench/default_runs.py --repeats 1 --no-noise --out /tmp/runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.bench import git_commit, machine_info, machine_slug, package_versions  # noqa: E402

LAUNCH = [sys.executable, "-m", "accum", "launch", "--config_file", "accelerate_configs/cpu.yaml",
          "scripts/train.py", "--config", "configs/default.yaml"]
FIXED = ["--micro-batch-size", "8", "--grad-accum-steps", "4"]
UNFUSED = ["--fused-optimizer", "false"]
DENSE = ["--sparse-embedding-grads", "false"]
ARMS = {"tokens": [], "before: fixed 8x4, AdamW unfused, dense embeddings": FIXED + UNFUSED + DENSE,
        "tokens, dense embeddings": DENSE, "fixed 8x4": FIXED}
RATIOS = {  # name: (arm, over arm)
    "default run now / before": ("tokens", "before: fixed 8x4, AdamW unfused, dense embeddings"),
    "cut by tokens / fixed 8x4, both AdamW fused, sparse embeddings": ("tokens", "fixed 8x4"),
    "sparse / dense embedding gradients, both cut by tokens, AdamW fused": ("tokens", "tokens, dense embeddings"),
}


def run(name: str, flags: list[str], out: Path) -> dict:
    """One training run in its own process; its metrics.json, the plan line and wall seconds."""
    command = LAUNCH + ["--output-dir", str(out)] + flags
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    load = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    banner = next((line for line in done.stdout.splitlines() if line.startswith("Effective batch size")), "")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{name}: {banner}; {wall:.0f} s, real tokens/s {metrics['tokens_per_s']:.0f}, "
          f"padding efficiency {metrics['padding_efficiency']:.3f}, eval {metrics['eval']}", flush=True)
    return {"arm": name, "command": " ".join(command[1:]), "wall_s": round(wall, 1), "load_before": load,
            "banner": banner, "train_seconds": metrics["train_seconds"], "tokens_per_s": metrics["tokens_per_s"],
            "train_cpu_seconds": metrics["train_cpu_seconds"],
            "tokens_per_cpu_s": metrics["tokens_seen"] / metrics["train_cpu_seconds"],
            "samples_per_s": metrics["samples_per_s"], "padding_efficiency": metrics["padding_efficiency"],
            "tokens_seen": metrics["tokens_seen"], "optimizer_steps": metrics["optimizer_step"],
            "micro_batches_per_window": statistics.mean(s["gradient_accumulation_steps"] for s in steps),
            "eval": metrics["eval"], "noise_b_simple_samples": metrics.get("noise_b_simple_samples"),
            "plan": metrics["plan"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating (default 2)")
    parser.add_argument("--no-noise", action="store_true", help="skip the --noise-scale run and recommend")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="directory for the .md and .json")
    args = parser.parse_args()
    commit = git_commit()  # the code the runs ran, not what HEAD is when they end
    runs = []
    with tempfile.TemporaryDirectory(prefix="accum-default-") as tmp:
        order = [name for repeat in range(args.repeats)
                 for name in (list(ARMS) if repeat % 2 == 0 else list(ARMS)[::-1])]
        for number, name in enumerate(order):
            runs.append(run(name, ARMS[name], Path(tmp) / f"{number}"))
        recommended = None
        if not args.no_noise:
            noise_dir = Path(tmp) / "noise"
            # micro-batches in the window's order: cut by length they are not random draws, and B_simple reads high
            runs.append(run("--noise-scale --cut-by samples", ["--noise-scale", "--cut-by", "samples"], noise_dir))
            done = subprocess.run([sys.executable, "-m", "accum", "recommend", "--run", str(noise_dir)], cwd=ROOT,
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
            recommended = done.stdout.strip()
    by_arm = {name: [r for r in runs if r["arm"] == name] for name in ARMS}
    median = {name: {key: statistics.median(r[key] for r in rs)
                     for key in ("tokens_per_s", "tokens_per_cpu_s", "train_seconds", "wall_s")}
              for name, rs in by_arm.items()}
    ratios = {name: median[arm]["tokens_per_s"] / median[other]["tokens_per_s"] for name, (arm, other) in RATIOS.items()}
    cpu_ratios = {name: median[arm]["tokens_per_cpu_s"] / median[other]["tokens_per_cpu_s"]
                  for name, (arm, other) in RATIOS.items()}
    info = machine_info()
    report = {"date": datetime.date.today().isoformat(), "commit": commit, "machine": info,
              "versions": package_versions(), "runs": runs, "median": median,
              "real_tokens_per_s_ratios": ratios,
              "real_tokens_per_cpu_s_ratios": cpu_ratios, "recommend": recommended}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['date']}-{machine_slug(info)}-default-runs"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(render(report))
    print("; ".join(f"{name}: {value:.3f}" for name, value in ratios.items()) + f"; wrote {stem}.md and .json")
    return 0


def render(report: dict) -> str:
    info = report["machine"]
    lines = [f"# The default run, {report['date']}", "", "Command: `python bench/default_runs.py`  ",
             f"Commit: {report['commit']}  ",
             f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, GPU: {info['gpu'] or 'none'}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), "",
             "Each run is `make train`'s command (configs/default.yaml: MiniLM, 2,048 tweets, batch 32, 64 optimizer "
             "steps, eval on 1,000) in a fresh process; the arms alternate.", "",
             "| run | plan | micro-batches per window | padding efficiency | real tokens/s | real tokens per CPU s | "
             "train s | train CPU s | wall s | eval accuracy | eval loss | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['arm']} | {r['banner'].replace('Effective batch size: ', '')} | "
                     f"{r['micro_batches_per_window']:.2f} | {r['padding_efficiency']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['tokens_per_cpu_s']:.0f} | {r['train_seconds']:.1f} | {r['train_cpu_seconds']:.1f} | {r['wall_s']:.0f} | {r['eval'].get('accuracy', float('nan')):.4f} | "
                     f"{r['eval'].get('loss', float('nan')):.4f} | {r['load_before'][0]:.2f} |")
    lines += ["", "Real tokens per second (wall; per CPU second of the training process in brackets, which moves less "
              "when the machine is shared), medians of each arm:", ""]
    lines += [f"- {name}: **{value:.3f}** ({report['real_tokens_per_cpu_s_ratios'][name]:.3f})"
              for name, value in report["real_tokens_per_s_ratios"].items()]
    noise = [r for r in report["runs"] if r["noise_b_simple_samples"] is not None]
    if noise:
        lines += ["", f"B_simple with --noise-scale: {noise[0]['noise_b_simple_samples']:.0f} samples after "
                      f"{noise[0]['optimizer_steps']} optimizer steps.", "", "`python -m accum recommend --run <that run>`:",
                  "", "```", report["recommend"] or "", "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
