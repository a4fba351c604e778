"""`python -m accum report --run DIR`: one picture of a run over optimizer steps, and its numbers.

report.png: loss and EMA loss, LR, gradient norm, the batch (effective batch, micro-batch size,
micro-batches per window), the gradient noise scale B_simple against the effective batch, tokens/s
and peak memory, each over optimizer steps, with every plan change marked on every panel (a batch
schedule's change in blue, an out-of-memory or memory-pressure adjustment in red, an evaluation's
in grey: metrics.json `adjustments`). report.csv: one row per optimizer step with the numbers the
panels plot and the adjustment made at that step. Both are read from metrics.jsonl (written as the
run goes, so a run in progress can be reported) and metrics.json when the run has finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accum.errors import ConfigError
from accum.files import write_bytes_atomic, write_text_atomic

PNG, CSV = "report.png", "report.csv"
COLUMNS = ("optimizer_step", "samples_seen", "tokens_seen", "loss", "ema_loss", "lr", "grad_norm",
           "effective_batch_size", "micro_batch_size", "gradient_accumulation_steps", "noise_b_simple",
           "noise_b_simple_samples", "tokens_per_s", "samples_per_s", "peak_memory_bytes", "adjustment")
KIND_STYLE = {"schedule": ("tab:blue", ":"), "memory": ("tab:red", "--"), "evaluation": ("grey", "-.")}
KIND_LEGEND = {"schedule": "blue dotted: batch schedule change",
               "memory": "red dashed: micro-batch change (out of memory, memory pressure, regrowth)",
               "evaluation": "grey dash-dot: eval batch change (out of memory in evaluation)"}


@dataclass(frozen=True)
class Mark:
    """A change of plan at an optimizer step (the first step that runs with it)."""

    optimizer_step: int
    kind: str  # schedule | memory | evaluation
    text: str


def metrics_lines(path: Path) -> list[dict[str, Any]]:
    """The steps of a metrics.jsonl, read line by line (one line per optimizer step and no bound on its
    size); lines torn by a kill mid-write or not holding a mapping are skipped."""
    steps = []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                try:
                    step = json.loads(line)
                except ValueError:
                    continue
                if isinstance(step, dict):
                    steps.append(step)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc})") from None
    return steps


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's lines (a torn last line, from a run killed mid-write, is skipped). Raises ConfigError
    when there is none."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: --run must be the output dir of a scripts/train.py run that has "
                          "trained at least one optimizer step")
    records = [record for record in metrics_lines(path) if isinstance(record.get("optimizer_step"), int)]
    if not records:
        raise ConfigError(f"{path} holds no optimizer step yet: report once the run has trained one")
    return records


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a finished run; {} while the run goes on (or when it cannot be read)."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def marks_of(adjustments: list[dict[str, Any]]) -> list[Mark]:
    """metrics.json's adjustments as marks at the first optimizer step that ran with them: a batch
    schedule's change, a micro-batch change (out of memory, memory pressure, regrowth), an evaluation
    batch change (at the step the evaluation followed)."""
    marks = []
    for entry in adjustments:
        step = int(entry.get("optimizer_step") or 0)
        reason = str(entry.get("reason", ""))
        if "new_effective_batch_size" in entry:  # logged at the step after which the batch changed
            marks.append(Mark(step + 1, "schedule", f"batch {entry.get('old_effective_batch_size')} -> "
                                                f"{entry['new_effective_batch_size']}: {reason}"))
        elif "new_eval_batch_size" in entry:
            marks.append(Mark(step, "evaluation", f"eval batch {entry.get('old_eval_batch_size')} -> "
                                                  f"{entry['new_eval_batch_size']}: {reason}"))
        else:
            marks.append(Mark(step, "memory", f"micro-batch {entry.get('old_micro_batch_size')} -> "
                                              f"{entry.get('new_micro_batch_size')}: {reason}"))
    return marks


def marks_from_records(records: list[dict[str, Any]]) -> list[Mark]:
    """For a run without metrics.json yet: where the effective batch or the micro-batch changed."""
    marks = []
    for before, after in zip(records, records[1:], strict=False):
        for key, kind, name in (("effective_batch_size", "schedule", "batch"),
                                ("micro_batch_size", "memory", "micro-batch")):
            if before.get(key) is not None and after.get(key) is not None and before[key] != after[key]:
                marks.append(Mark(after["optimizer_step"], kind, f"{name} {before[key]} -> {after[key]}"))
    return marks


def rows_of(records: list[dict[str, Any]], marks: list[Mark], tokens: bool = False) -> list[dict[str, Any]]:
    """report.csv's rows: one per optimizer step. B_simple is also given in samples (over the tokens per
    sample seen so far) when `tokens` (the run measured it in tokens), to compare with the effective batch."""
    by_step: dict[int, list[str]] = {}
    for mark in marks:
        by_step.setdefault(mark.optimizer_step, []).append(mark.text)
    rows = []
    for record in records:
        row = {key: record.get(key) for key in COLUMNS}
        b_simple = record.get("noise_b_simple")
        per_sample = (record.get("tokens_seen") or 0) / max(record.get("samples_seen") or 1, 1) if tokens else 1.0
        row["noise_b_simple_samples"] = b_simple / per_sample if isinstance(b_simple, (int, float)) and per_sample else None
        row["adjustment"] = "; ".join(by_step.get(record["optimizer_step"], []))
        rows.append(row)
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            xs.append(row["optimizer_step"])
            ys.append(float(value))
    return xs, ys


def build_figure(rows: list[dict[str, Any]], marks: list[Mark], title: str, summary: list[str]):
    """The report's Figure: eight panels over optimizer steps (the last one the run's summary in words)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 13))
    axes = fig.subplots(4, 2, sharex=False).ravel()
    steps = [row["optimizer_step"] for row in rows]
    rows = [dict(row, peak_memory_mib=row["peak_memory_bytes"] / 2**20)
            if isinstance(row.get("peak_memory_bytes"), (int, float)) else row for row in rows]

    def panel(ax, series: list[tuple[str, str, dict]], ylabel: str, log: bool = False, empty: str = "") -> None:
        """Plot `series` (key, label, style); when the first one has no value, say `empty` instead."""
        from matplotlib.ticker import MaxNLocator

        ax.set(xlabel="optimizer step", ylabel=ylabel)
        ax.set_xlim(min(steps) - 0.5, max(steps) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        for mark in marks:
            color, line = KIND_STYLE[mark.kind]
            ax.axvline(mark.optimizer_step, color=color, linestyle=line, linewidth=1.2)
        if not _series(rows, series[0][0])[0]:
            ax.text(0.5, 0.5, empty or "not recorded", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            return
        for key, label, style in series:
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label, **({"marker": "."} if len(xs) < 40 else {}), **style)
        if log:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log", base=2)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        else:  # values as they are: no "+1.039" offset above the axis
            ax.ticklabel_format(axis="y", useOffset=False)
        if len(series) > 1:
            ax.legend(fontsize=8)

    panel(axes[0], [("loss", "loss per optimizer step", {"alpha": 0.45, "linewidth": 1}),
                    ("ema_loss", "EMA loss", {"linewidth": 2})], "training loss")
    panel(axes[1], [("lr", "LR the step used", {})], "learning rate")
    panel(axes[2], [("grad_norm", "global norm before clipping", {})], "gradient norm")
    panel(axes[3], [("effective_batch_size", "effective batch (samples)", {"drawstyle": "steps-post"}),
                    ("micro_batch_size", "micro-batch (samples)", {"drawstyle": "steps-post"}),
                    ("gradient_accumulation_steps", "micro-batches per window, per process",
                     {"drawstyle": "steps-post"})], "batch", log=True)
    panel(axes[4], [("noise_b_simple_samples", "B_simple (samples)", {}),
                    ("effective_batch_size", "effective batch (samples)", {"drawstyle": "steps-post",
                                                                           "linestyle": "--"})],
          "gradient noise scale", empty="B_simple not measured: train with --noise-scale\n"
                                        "(accumulation >= 2 or 2+ processes; known after 10 steps)")
    panel(axes[5], [("tokens_per_s", "tokens/s", {})], "throughput (tokens/s)")
    panel(axes[6], [("peak_memory_mib", "peak memory so far", {})], "peak memory (MiB)")
    axes[7].axis("off")
    legend = [KIND_LEGEND[kind] for kind in sorted({mark.kind for mark in marks})]
    lines = summary + ([""] + legend + [f"step {m.optimizer_step}: {m.text}"[:90] for m in marks[:8]] if marks
                       else ["", "no plan changes during the run"])
    axes[7].text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace",
                 transform=axes[7].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def summary_lines(config: dict[str, Any], plan: dict[str, Any], metrics: dict[str, Any],
                  rows: list[dict[str, Any]]) -> list[str]:
    """The run in a few lines of text, for the figure's last panel."""
    lines = []
    if plan:
        processes = plan.get("num_processes")
        lines.append(f"plan at the end: {plan.get('effective_batch_size')} = {plan.get('micro_batch_size')} micro x "
                     f"{plan.get('accumulation_steps')} accum x {processes} process{'' if processes == 1 else 'es'}")
    if config:
        lines.append(f"task {config.get('task')}, optimizer {config.get('optimizer')}, lr {config.get('lr')}, "
                     f"schedule {config.get('lr_scheduler')}")
    last = rows[-1]
    lines.append(f"{last['optimizer_step']} optimizer steps, {last.get('samples_seen')} samples, "
                 f"{last.get('tokens_seen')} tokens")
    if metrics:
        evals = ", ".join(f"{k} {v:.4g}" for k, v in (metrics.get("eval") or {}).items())
        lines.append(f"final loss {metrics.get('final_loss') or float('nan'):.4g}; eval {evals or '-'}")
    else:
        lines.append("run not finished (no metrics.json yet)")
    return lines


def write_report(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write report.png and report.csv for the run in `run_dir` (into `output_dir`, default the run's own
    directory), atomically. Returns their paths. Raises ConfigError when the run has no steps."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    metrics = read_metrics(run_dir)
    config = _read_optional(run_dir / "config.json")
    plan = _read_optional(run_dir / "plan.json")
    marks = marks_of(metrics["adjustments"]) if "adjustments" in metrics else marks_from_records(records)
    rows = rows_of(records, marks, tokens=_tokens(config))  # B_simple is in tokens under token-weighted loss
    out = Path(output_dir) if output_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)
    fig = build_figure(rows, marks, f"{run_dir.name}: one run over optimizer steps", summary_lines(config, plan, metrics,
                                                                                                  rows))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    write_bytes_atomic(out / PNG, buffer.getvalue())
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / CSV, text.getvalue())
    return [out / PNG, out / CSV]


def _tokens(config: dict[str, Any]) -> bool:
    normalization = config.get("loss_normalization", "auto")
    return normalization == "tokens" or (normalization == "auto" and config.get("task") == "clm")


def _read_optional(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
