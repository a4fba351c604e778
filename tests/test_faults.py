"""Faults injected into real runs: signals, SIGKILL at chosen and random points (also in the middle
of writing a checkpoint), NaN/inf, failing writes, a rank that dies. Each run is compared with an
uninterrupted one: resuming must end bit-identical (CPU, dropout on, AdamW)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

import scripts.train as train_module
from accum.loss import TaskLoss
from accum.signals import StopRequest
from scripts import checkpoint as ckpt
from tests.helpers.fault_common import (
    TINY,
    check_complete,
    final_weights,
    identical,
    in_child,
    kill_self,
    run_main,
    tree,
    weights,
)

SAVE = ["--save-every", "3", "--keep-checkpoints", "2"]  # saves at 3, 6, 9 and 10 (the end)
CALLS_PER_WINDOW = 2  # micro 2 x accum 2 on one process: forward_loss_sum runs twice per optimizer step


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint after every optimizer step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, err = run_main(TINY + ["--output-dir", str(out), "--save-every", "1", "--keep-checkpoints", "20"])
    assert code == 0, err
    return out


def at_step(reference: Path, step: int) -> dict[str, torch.Tensor]:
    return weights(reference / "checkpoints" / f"step-{step:08d}")


def logged_steps(out: Path) -> list[int]:
    return [json.loads(line)["optimizer_step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def resume_and_compare(out: Path, reference: Path, extra: list[str] = ()) -> None:
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE, "--resume-from-checkpoint", "latest", *extra])
    assert code == 0, err
    assert identical(final_weights(out), final_weights(reference))
    assert logged_steps(out) == list(range(1, 11))  # no optimizer step lost or doubled


def on_call(monkeypatch, calls: set[int], action) -> None:
    """Wrap the training forward (TaskLoss.forward with gradients on): on its n-th call (n in `calls`)
    apply `action` to the loss sum it returns."""
    original, count = TaskLoss.forward, [0]

    def wrapped(self, model, batch):
        loss, logits = original(self, model, batch)
        if not torch.is_grad_enabled():  # evaluation
            return loss, logits
        count[0] += 1
        return (action(loss) if count[0] in calls else loss), logits

    monkeypatch.setattr(TaskLoss, "forward", wrapped)


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signum,call", [(signal.SIGTERM, 7), (signal.SIGINT, 12)])
def test_signal_finishes_the_step_saves_and_resume_is_identical(tmp_path, monkeypatch, reference, signum, call):
    out = tmp_path / "run"
    stop_after = (call - 1) // CALLS_PER_WINDOW + 1  # the signal lands inside this optimizer step
    before = signal.getsignal(signum)

    def send(loss):
        os.kill(os.getpid(), signum)
        return loss

    on_call(monkeypatch, {call}, send)
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 128 + signum
    assert len(err) == 1 and f"after optimizer step {stop_after};" in err[0] and "resume-from-checkpoint" in err[0], err
    assert signal.getsignal(signum) is before  # handlers are ours only while training
    assert not (out / "metrics.json").exists()
    saved = ckpt.list_checkpoints(out)[-1]
    assert check_complete(saved) == stop_after
    assert identical(weights(saved), at_step(reference, stop_after))  # the step in flight was finished
    monkeypatch.undo()
    resume_and_compare(out, reference)


def twice(signum, apart: float = 0.0):
    """Send `signum` twice; `apart` > 0: the second after Python ran the handler for the first (a signal
    may land on the prefetch thread, and two landing before the main thread handles them are one)."""
    def send(loss):
        os.kill(os.getpid(), signum)
        if apart:
            time.sleep(apart)  # returns once the main thread's handler has run
        os.kill(os.getpid(), signum)
        return loss
    return send


def test_one_signal_delivered_twice_at_once_is_one_request(tmp_path, monkeypatch):
    """Ctrl-C reaches the rank from the terminal and again from its launcher, milliseconds apart."""
    out = tmp_path / "run"
    on_call(monkeypatch, {3}, twice(signal.SIGINT))
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 128 + signal.SIGINT and len(err) == 1 and "stopped by SIGINT after optimizer step 2;" in err[0], err
    assert check_complete(ckpt.list_checkpoints(out)[-1]) == 2


def test_a_second_signal_stops_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(StopRequest, "duplicate_window_s", 0.0)  # the second one counts as a second request
    on_call(monkeypatch, {3}, twice(signal.SIGINT, apart=0.05))
    code, err = run_main(TINY + ["--output-dir", str(tmp_path / "int")])
    assert code == 130 and len(err) == 1 and "stopped by SIGINT at once (asked twice)" in err[0], err
    on_call(monkeypatch, {3}, twice(signal.SIGTERM, apart=0.05))
    assert in_child(run_main, TINY + ["--output-dir", str(tmp_path / "term")]) == -signal.SIGTERM
    assert ckpt.list_checkpoints(tmp_path / "term") == []


def send_then(signum, original):
    """`original`, but this process gets `signum` first (the phase it belongs to is running)."""
    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return original(*args, **kwargs)
    return wrapped


def test_sigterm_while_preparing_data_stops_before_planning_and_writes_nothing(tmp_path, monkeypatch):
    from accum.cli import data

    monkeypatch.setattr(data, "tokenize_splits", send_then(signal.SIGTERM, data.tokenize_splits))
    code, err = run_main(TINY + ["--output-dir", str(tmp_path / "run")])
    assert code == 143 and len(err) == 1 and "stopped by SIGTERM during data preparation;" in err[0], err
    assert "run the same command again" in err[0] and not (tmp_path / "run").exists()


def test_sigterm_while_planning_stops_after_the_probe_in_flight_and_caches_nothing(tmp_path, monkeypatch):
    """Before, planning went on for 17 more probes after SIGTERM (224 s, up to 11 GiB)."""
    forwards = []
    original = TaskLoss.forward

    def forward(self, model, batch):
        forwards.append(len(batch["input_ids"]))
        if len(forwards) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # in the unmeasured warm-up step, before the first probe
        return original(self, model, batch)

    monkeypatch.setattr(TaskLoss, "forward", forward)
    cache = tmp_path / "plans.json"
    code, err = run_main(TINY + ["--output-dir", str(tmp_path / "run"), "--micro-batch-size", "auto",
                                 "--grad-accum-steps", "auto", "--plan-cache", str(cache)])
    assert code == 143 and len(err) == 1 and "stopped by SIGTERM during planning;" in err[0], err
    assert forwards == [1, 1]  # the warm-up's two steps at micro-batch 1: no probe ran after the signal
    assert not cache.exists() and not (tmp_path / "run").exists()


def test_sigterm_during_the_final_evaluation_saves_stops_and_resume_only_evaluates(tmp_path, monkeypatch, reference):
    """Before, the signal was acknowledged and the run exited 0."""
    out = tmp_path / "run"
    original = TaskLoss.forward

    def forward(self, model, batch):
        if not torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model, batch)

    monkeypatch.setattr(TaskLoss, "forward", forward)
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 143 and len(err) == 1, err
    assert "stopped by SIGTERM during evaluation (after optimizer step 10); checkpoint" in err[0], err
    assert not (out / "metrics.json").exists() and check_complete(ckpt.list_checkpoints(out)[-1]) == 10
    monkeypatch.undo()
    resume_and_compare(out, reference)  # nothing trained again: only the evaluation, then metrics.json
    assert (out / "metrics.json").exists()


def test_sigterm_while_saving_finishes_the_checkpoint_then_stops(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    monkeypatch.setattr(ckpt, "save_model", send_then(signal.SIGTERM, ckpt.save_model))  # the step-3 save
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 143 and len(err) == 1 and "after optimizer step 3;" in err[0], err
    assert [check_complete(p) for p in ckpt.list_checkpoints(out)] == [3]
    monkeypatch.undo()
    resume_and_compare(out, reference)


@pytest.mark.slow
def test_sigint_to_accum_plan_stops_after_the_probe_in_flight_in_one_line(tmp_path):
    """A real process and a real Ctrl-C: before, `python -m accum plan` printed a traceback."""
    import subprocess
    import sys

    from tests.helpers.fault_common import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCUM_CACHE_DIR=str(tmp_path))
    process = subprocess.Popen([sys.executable, "-m", "accum", "plan", "--model", "gpt2-tiny", "--seq-len", "128",
                                "--batch-size", "4096", "--max-memory", "8GiB"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stderr:  # wait for the first probe: the planner is running
        lines.append(line)
        if line.startswith("probe "):
            process.send_signal(signal.SIGINT)
            break
    rest, stdout = process.stderr.read(), process.stdout.read()
    process.wait(timeout=120)
    stderr = "".join(lines) + rest
    probes_after = [line for line in rest.splitlines() if line.startswith("probe ")]
    assert process.returncode == 130, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: stopped by SIGINT during planning; nothing was cached: run the same command again"], \
        stderr[-3000:]
    assert "Traceback" not in stderr and len(probes_after) <= 1 and "Effective batch size" not in stdout
    assert not (tmp_path / "plans.json").exists()


# ----------------------------------------------------------------------------- SIGKILL


def kill_on_nth(n: int, original, before: bool = False, after=None):
    """A stand-in for `original` that SIGKILLs this process on its n-th call (before or after the real work)."""
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] == n and before:
            kill_self()
        result = original(*args, **kwargs)
        if count[0] == n:
            if after is not None:
                after(*args)
            kill_self()
        return result

    return wrapped


def half_truncate(model, path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def patch_kill_point(monkeypatch, point: str) -> None:
    """Arrange, in the child, a SIGKILL at `point` of the third checkpoint (step 9)."""
    if point == "model file half written":
        monkeypatch.setattr(ckpt, "save_model", kill_on_nth(3, ckpt.save_model, after=half_truncate))
    elif point == "optimizer state written":
        monkeypatch.setattr(ckpt.torch, "save", kill_on_nth(3, torch.save))
    elif point == "before the rng file":
        monkeypatch.setattr(ckpt, "save_file", kill_on_nth(3, ckpt.save_file, before=True))
    elif point == "renamed, old one not yet deleted":
        real, count = os.replace, [0]

        def replace(src, dst):
            real(src, dst)
            if Path(src).name.startswith(".tmp-step-"):
                count[0] += 1
                if count[0] == 3:
                    kill_self()

        monkeypatch.setattr(ckpt.os, "replace", replace)
    elif point == "half-way through deleting the oldest":
        real_rmtree = ckpt.shutil.rmtree

        def rmtree(path, *args, **kwargs):
            if Path(path).name.startswith(".trash-step-"):
                next(Path(path).iterdir()).unlink()
                kill_self()
            return real_rmtree(path, *args, **kwargs)

        monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    elif point == "metrics line torn":
        real_write = train_module.MetricsLog.write

        def write(self, record):
            if record["optimizer_step"] == 8:
                with open(self.path, "a") as handle:
                    handle.write(json.dumps(record)[:25])
                kill_self()
            real_write(self, record)

        monkeypatch.setattr(train_module.MetricsLog, "write", write)
    else:
        raise AssertionError(point)


KILL_POINTS = {  # point -> (the step `latest` must then pick, steps that may be listed)
    "model file half written": 6,
    "optimizer state written": 6,
    "before the rng file": 6,
    "renamed, old one not yet deleted": 9,
    "half-way through deleting the oldest": 9,
    "metrics line torn": 6,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_at_a_chosen_point_leaves_only_complete_checkpoints(tmp_path, monkeypatch, reference, point):
    out = tmp_path / "run"

    def child():
        patch_kill_point(monkeypatch, point)
        return run_main(TINY + ["--output-dir", str(out), *SAVE])[0]

    assert in_child(child) == -signal.SIGKILL
    found = ckpt.list_checkpoints(out)
    assert check_complete(found[-1]) == KILL_POINTS[point]
    for path in found:
        check_complete(path)
    resume_and_compare(out, reference)
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in (out / "checkpoints").iterdir())


KILLED_RUN = TINY + SAVE + ["--save-every", "1"]


def timed_child(function) -> tuple[int, float]:
    """in_child(function) and the seconds from fork to exit."""
    started = time.perf_counter()
    ended = in_child(function)
    return ended, time.perf_counter() - started


@pytest.fixture(scope="module")
def warm_run_seconds(tmp_path_factory, reference) -> float:
    """How long the run that the random-time test kills takes from fork to exit, measured here, uninterrupted
    (after `reference` has warmed up imports and kernels, as it has for the killed children)."""
    seconds = []
    for _ in range(2):  # the first fork after the in-process reference runs about twice as long: take the shorter
        out = tmp_path_factory.mktemp("timed") / "run"
        ended, took = timed_child(lambda out=out: run_main(KILLED_RUN + ["--output-dir", str(out)])[0])
        assert ended == 0
        seconds.append(took)
    print("uninterrupted runs, s:", [round(s, 2) for s in seconds])
    return min(seconds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_time_then_resume_is_identical(tmp_path, reference, warm_run_seconds, seed):
    rng, seconds = random.Random(seed), warm_run_seconds
    for attempt in range(3):
        # anywhere inside the measured run, setup included
        delay = rng.uniform(0.05, 0.95) * seconds
        out = tmp_path / f"run{attempt}"

        def child(delay=delay, out=out):
            threading.Timer(delay, kill_self).start()
            return run_main(KILLED_RUN + ["--output-dir", str(out)])[0]

        ended, took = timed_child(child)
        if ended != 0:
            break
        # the run finished first (the shared machine was slower when it was measured): that run is a new
        # measurement; draw again within it
        print(f"finished in {took:.2f} s, before the kill at {delay:.2f} s: drawing again")
        seconds = took
    assert ended == -signal.SIGKILL, f"ended with {ended}; the last kill was drawn at {delay:.2f} s of {seconds:.2f} s"
    assert not (out / "metrics.json").exists()
    found = ckpt.list_checkpoints(out)
    for path in found:
        check_complete(path)
    print(f"killed at {delay:.2f} s of a {seconds:.2f} s run, after checkpoint", check_complete(found[-1]) if found else None)
    if not found:  # killed before the first save: resuming is refused in one line, a fresh start works
        code, err = run_main(TINY + ["--output-dir", str(out), "--resume-from-checkpoint", "latest"])
        assert code == 2 and "no checkpoint" in err[0]
        return
    resume_and_compare(out, reference, ["--save-every", "1"])


# ----------------------------------------------------------------------------- NaN / inf


def gradient_scaled_by(factor: float):
    """Identity forward (the loss stays finite), the gradient times `factor` backward: math.inf makes it
    infinite, 1e16 huge but finite."""

    class ScaledGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value):
            return value.view_as(value)

        @staticmethod
        def backward(ctx, grad):
            return grad * factor

    return ScaledGradient.apply


NONFINITE = {"nan loss": lambda loss: loss * math.nan, "inf gradient": gradient_scaled_by(math.inf)}


def poison_optimizer_step(monkeypatch, nth: int) -> None:
    """AdamW's n-th step writes inf into a weight, as a huge but finite LR or weight decay would."""
    real, count = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == nth:
            with torch.no_grad():
                self.param_groups[0]["params"][0].mul_(math.inf)
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def no_checkpoint_holds_nonfinite_values(out: Path) -> None:
    for path in ckpt.list_checkpoints(out):
        assert ckpt.verified_finite(path), path


def test_finite_loss_and_gradients_that_make_weights_infinite_stop_without_saving_them(tmp_path, monkeypatch):
    """SGD at a huge but finite LR with a huge but finite gradient: the update overflows. Before, NaN/inf
    went into every weight and the run named a checkpoint that was all NaN."""
    out = tmp_path / "run"
    on_call(monkeypatch, {1, 2}, gradient_scaled_by(1e16))  # the first window
    code, err = run_main(TINY + ["--output-dir", str(out), "--optimizer", "sgd", "--lr", "1e23",
                                 "--max-grad-norm", "0"])
    assert code == 3, err
    assert len(err) == 1 and "a weight became NaN/inf in the optimizer step at optimizer step 1" in err[0], err
    assert "no checkpoint of this run is verified finite" in err[0]
    assert ckpt.list_checkpoints(out) == [] and not (out / "metrics.json").exists()


def test_a_step_that_makes_a_weight_infinite_stops_naming_the_last_checkpoint_verified_finite(
        tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    poison_optimizer_step(monkeypatch, 5)
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 3, err
    named = out / "checkpoints" / "step-00000003"
    assert len(err) == 1 and "at optimizer step 5" in err[0] and f"verified finite is {named}" in err[0], err
    assert [check_complete(p) for p in ckpt.list_checkpoints(out)] == [3]  # nothing after it was saved
    no_checkpoint_holds_nonfinite_values(out)
    monkeypatch.undo()
    resume_and_compare(out, reference)


def test_skip_nonfinite_undoes_a_step_that_made_a_weight_infinite(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_optimizer_step(monkeypatch, 5)
    code, err = run_main(TINY + ["--output-dir", str(out), "--skip-nonfinite", "--save-every", "1",
                                 "--keep-checkpoints", "20"])
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["skipped_steps"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_step"] for r in records if r["skipped"]] == [5]
    step = lambda n: out / "checkpoints" / f"step-{n:08d}"  # noqa: E731
    assert identical(weights(step(5)), weights(step(4)))  # weights and optimizer state as before the step
    before, after = (torch.load(step(n) / "optimizer.pt", weights_only=True)["state"] for n in (4, 5))
    assert all(torch.equal(before[k][name], after[k][name]) for k in before for name in before[k])
    no_checkpoint_holds_nonfinite_values(out)


def test_nonfinite_loss_stops_naming_the_step_after_saving_the_last_good_state(tmp_path, monkeypatch, reference):
    out = tmp_path / "run"
    on_call(monkeypatch, {9}, NONFINITE["nan loss"])  # in optimizer step 5
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 3
    assert len(err) == 1 and "loss is nan at optimizer step 5" in err[0] and "skip-nonfinite" in err[0], err
    last = ckpt.list_checkpoints(out)[-1]
    assert check_complete(last) == 4
    assert identical(weights(last), at_step(reference, 4))  # nothing of step 5 reached the weights
    monkeypatch.undo()
    resume_and_compare(out, reference)  # counters and RNG were rolled back to before step 5 too


@pytest.mark.parametrize("kind", list(NONFINITE))
def test_skip_nonfinite_skips_the_window_and_counts_it(tmp_path, monkeypatch, kind):
    out = tmp_path / "run"
    on_call(monkeypatch, {9}, NONFINITE[kind])
    code, err = run_main(TINY + ["--output-dir", str(out), "--skip-nonfinite", "--save-every", "1",
                                 "--keep-checkpoints", "20"])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_steps"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["optimizer_step"] for r in records if r["skipped"]] == [5]
    step = lambda n: weights(out / "checkpoints" / f"step-{n:08d}")  # noqa: E731
    assert identical(step(5), step(4))  # the non-finite update was never applied
    assert all(torch.isfinite(t).all() for t in final_weights(out).values())


# ----------------------------------------------------------------------------- disk


def test_unwritable_output_dir_is_one_line_and_creates_nothing(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(train_module.tempfile, "TemporaryFile", refuse)  # as root, chmod would not stop a write
    out = tmp_path / "new" / "run"
    code, err = run_main(TINY + ["--output-dir", str(out)])
    assert code == 2 and len(err) == 1 and "cannot be written (Permission denied)" in err[0], err
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("failing", ["model", "optimizer"])
def test_a_write_failing_mid_checkpoint_loses_nothing_earlier(tmp_path, monkeypatch, reference, failing):
    out = tmp_path / "run"
    count = [0]

    def disk_full(original):
        def wrapped(obj, path, *args, **kwargs):
            count[0] += 1
            if count[0] == 3:  # the step-9 checkpoint: half a file, then the disk is full
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(28, "No space left on device", str(path))
            return original(obj, path, *args, **kwargs)
        return wrapped

    if failing == "model":
        monkeypatch.setattr(ckpt, "save_model", disk_full(ckpt.save_model))
    else:
        monkeypatch.setattr(ckpt.torch, "save", disk_full(torch.save))
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 5
    assert len(err) == 1 and "No space left on device" in err[0] and "resume-from-checkpoint" in err[0], err
    assert [check_complete(p) for p in ckpt.list_checkpoints(out)] == [3, 6]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    monkeypatch.undo()
    resume_and_compare(out, reference)


# ----------------------------------------------------------------------------- one run per directory


def test_overwrite_moves_the_old_run_aside_and_latest_never_resumes_it(tmp_path, reference):
    """The issue's case: a finished 6-step run, then --overwrite for 3 steps keeping 2. Before, rotation
    kept the old step-5 and step-6, deleted the new run's, and `latest` resumed the old run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)  # a finished run: 10 steps, a checkpoint after each
    old_files = tree(out)
    code, err = run_main(TINY + ["--output-dir", str(out), "--overwrite", "--max-steps", "3", "--save-every", "1",
                                 "--keep-checkpoints", "2"])
    assert code == 0, err
    aside = next(out.glob(".overwritten-*"))
    moved = {path.replace(str(out), str(aside), 1): value for path, value in old_files.items() if path != str(out)}
    assert {p: v for p, v in tree(aside).items() if p != str(aside)} == moved  # every old file, untouched
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002", "step-00000003"]
    assert logged_steps(out) == [1, 2, 3]
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert ckpt.read_state(ckpt.list_checkpoints(out)[-1])["run_id"] == run_id
    # another run's checkpoint put into the directory by hand: never rotated away, never `latest`
    foreign = out / "checkpoints" / "step-00000010"
    shutil.copytree(aside / "checkpoints" / "step-00000010", foreign)
    (out / "metrics.json").unlink()
    code, err = run_main(TINY + ["--output-dir", str(out), "--max-steps", "5", "--save-every", "1",
                                 "--keep-checkpoints", "2", "--resume-from-checkpoint", "latest"])
    assert code == 0, err
    assert logged_steps(out) == [1, 2, 3, 4, 5]  # resumed at the new run's step 3, not the old run's 10
    assert ckpt.read_state(out / "checkpoints" / "step-00000005")["run_id"] == run_id
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000005",
                                                                        "step-00000010"]
    assert identical(weights(foreign), at_step(reference, 10))
    code, err = run_main(TINY + ["--output-dir", str(out), "--max-steps", "11", "--resume-from-checkpoint",
                                 str(foreign)])
    assert code == 2 and len(err) == 1 and "not of run" in err[0] and "an --overwrite started it" in err[0], err


# ----------------------------------------------------------------------------- a real full disk


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a chosen size (root only): `mount(size_bytes)` mounts it, or remounts it at a new
    size with its files kept; the test is skipped where no tmpfs can be mounted."""
    import subprocess

    where = tmp_path / "disk"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        options = f"{'remount,' if mounted else ''}size={size}"
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.skip(f"no tmpfs can be mounted here ({done.stderr.strip()[:120]}): a real full disk needs one")
        mounted.append(size)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


MIB = 2**20


@pytest.mark.parametrize("full_at", ["model file", "optimizer file"])
def test_a_real_full_disk_is_one_line_exit_5_leaves_no_temporary_and_resume_works_once_freed(
        reference, small_disk, full_at):
    """Checkpoints at 3 and 6 fit, the one at 9 does not: safetensors (model file) and torch.save
    (optimizer file) fail there without an OSError; before, that was a traceback, exit 1, and a
    .tmp-step directory that kept the disk full so that the resume failed too."""
    checkpoint = size_of(reference / "checkpoints" / "step-00000001")
    model = (reference / "checkpoints" / "step-00000001" / "model.safetensors").stat().st_size
    room = MIB // 2 if full_at == "model file" else model + MIB  # what is left after two checkpoints
    out = small_disk(2 * checkpoint + room) / "run"
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE])
    assert code == 5, err
    assert len(err) == 1 and "No space left on device" in err[0] and "resume-from-checkpoint latest" in err[0], err
    assert f"{'model.safetensors' if full_at == 'model file' else 'optimizer.pt'}:" in err[0], err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    for step in (3, 6):
        assert check_complete(out / "checkpoints" / f"step-{step:08d}") == step
        assert identical(weights(out / "checkpoints" / f"step-{step:08d}"), at_step(reference, step))
    small_disk(3 * checkpoint + MIB)  # space freed: room for one more checkpoint and 1 MiB
    # a writer killed mid-save (SIGKILL: nothing of ours runs) leaves its temporary; this one takes more
    # than the 1 MiB to spare, so the resume saves its checkpoints only if it removes it first
    leftover = out / "checkpoints" / ".tmp-step-00000009"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * (MIB + MIB // 2))
    resume_and_compare(out, reference)
    assert not any(p.name.startswith((".tmp-", ".trash-")) for p in (out / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- the lock


def run_main_all_stderr(argv: list[str]) -> tuple[int, list[str]]:
    import contextlib
    import io

    from scripts.train import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, [line for line in err.getvalue().splitlines() if line.startswith(("error:", "note:"))]


def owned_by(out: Path, pid: int, host: str | None = None) -> None:
    import socket

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text('{"optimizer_step": 1}\n')  # the owner's files
    (out / ".accum.lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_a_live_owner_refuses_a_second_run_which_writes_nothing_there(tmp_path):
    import subprocess

    out = tmp_path / "run"
    owner = subprocess.Popen(["sleep", "60"])  # a real, live process holds the directory
    try:
        owned_by(out, owner.pid)
        before = tree(out)
        code, err = run_main_all_stderr(TINY + ["--output-dir", str(out)])
    finally:
        owner.kill()
        owner.wait()
    assert code == 2 and len(err) == 1 and f"is in use by a running process (pid {owner.pid})" in err[0], err
    assert tree(out) == before  # no status.json, no metrics, no lock change


def test_a_lock_of_a_dead_process_is_taken_over_with_one_line(tmp_path):
    import subprocess

    out = tmp_path / "run"
    dead = subprocess.Popen(["true"])
    dead.wait()
    owned_by(out, dead.pid)
    (out / "metrics.jsonl").unlink()  # a run killed before its first step
    code, err = run_main_all_stderr(TINY + ["--output-dir", str(out), "--max-steps", "2"])
    assert code == 0, err
    assert err == [f"note: output dir {out}: taking over the lock of pid {dead.pid}, which has ended"], err
    assert not (out / ".accum.lock").exists()  # released at the end


def test_a_lock_of_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    owned_by(out, os.getpid() + 1, host="another-host")
    before = tree(out)
    code, err = run_main_all_stderr(TINY + ["--output-dir", str(out)])
    assert code == 2 and len(err) == 1 and "on host 'another-host'" in err[0], err
    assert tree(out) == before


@pytest.mark.slow
def test_two_runs_at_once_on_one_directory_the_second_is_refused_and_the_first_is_whole(tmp_path):
    """Before, one crashed and the other's metrics.jsonl mixed both runs."""
    import subprocess
    import sys
    import time

    from tests.helpers.fault_common import ROOT

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    first = subprocess.Popen([sys.executable, "scripts/train.py", *TINY, "--output-dir", str(out),
                              "--max-steps", "40", "--max-train-samples", "160"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / ".accum.lock").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    code, err = run_main_all_stderr(TINY + ["--output-dir", str(out), "--max-steps", "40",
                                            "--max-train-samples", "160"])
    assert first.poll() is None, "the first run ended before the second was refused: make it longer"
    assert code == 2 and len(err) == 1 and f"in use by a running process (pid {first.pid})" in err[0], err
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert logged_steps(out) == list(range(1, 41))  # the first run's steps, once each
    status = json.loads((out / "status.json").read_text())
    assert status["exit_code"] == 0 and status["pid"] == first.pid


# ----------------------------------------------------------------------------- safety


def test_nothing_in_the_output_dir_is_unpickled(tmp_path, monkeypatch):
    import pickle

    import accelerate

    out = tmp_path / "run"
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE, "--max-steps", "4"])
    assert code == 0, err
    (out / "metrics.json").unlink()
    suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
    # .md: the final export's model card (text)
    assert suffixes <= {".json", ".jsonl", ".safetensors", ".pt", ".md"}, suffixes

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    class NoUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(accelerate.Accelerator, "load_state", refuse)  # it unpickles registered objects
    real_load, loaded = torch.load, []

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, kwargs
        loaded.append(args[0])
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", weights_only_load)
    code, err = run_main(TINY + ["--output-dir", str(out), *SAVE, "--max-steps", "4", "--resume-from-checkpoint",
                                 "latest"])
    assert code == 0, err
    assert [Path(p).name for p in loaded] == ["optimizer.pt"]


@pytest.mark.parametrize("flag,expected", [([], False), (["--trust-remote-code"], True)])
def test_model_repo_code_runs_only_when_asked(monkeypatch, flag, expected):
    import transformers

    from accum.cli import models
    from accum.cli.config import ConfigError, parse_config

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", record)
    config, _ = parse_config(TINY + flag)
    with pytest.raises(ConfigError):
        models.build_tokenizer(config)
    assert seen["trust_remote_code"] is expected


# ----------------------------------------------------------------------------- two ranks

TWO_RANKS = TINY + ["--dropout", "0.0", "--optimizer", "sgd", "--lr", "0.5", "--micro-batch-size", "1",
                    "--grad-accum-steps", "auto", "--max-steps", "30", "--save-every", "3", "--dist-timeout-s", "10"]


def launch_two_ranks(args: list[str]):
    import subprocess
    import sys

    from tests.helpers.fault_common import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT),
               ACCELERATE_USE_CPU="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--main_process_port", "0", "scripts/train.py", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_one_once_saved(process, out: Path):
    """Wait for the first checkpoint, then return rank 1's process."""
    import time

    import psutil

    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000003").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-3000:]
    ranks = [c for c in psutil.Process(process.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(ranks) == 1
    return ranks[0]


def close_to(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a if b[k].norm() > 0) <= 1e-5


@pytest.fixture(scope="module")
def one_rank_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-rank") / "run"
    code, err = run_main(TWO_RANKS + ["--output-dir", str(out)])
    assert code == 0, err
    return out


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, one_rank_reference):
    out = tmp_path / "run"
    process = launch_two_ranks(TWO_RANKS + ["--output-dir", str(out)])
    rank_one_once_saved(process, out).send_signal(signal.SIGTERM)  # rank 0 never gets a signal
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    # each rank prints its line; under load the two can share a line of the launcher's stderr
    stops = re.findall(r"error: (stopped by SIGTERM after optimizer step \d+;)", stderr)
    assert len(stops) == 2 and stops[0] == stops[1], stderr[-3000:]  # both ranks, the same optimizer step
    latest = ckpt.list_checkpoints(out)[-1]
    assert f"after optimizer step {check_complete(latest)};" in stops[0]
    assert (latest / "rng-rank1.safetensors").is_file()
    # resume on one process: the same effective batch (4 = 1 x 2 x 2 ranks = 1 x 4 x 1) is re-planned
    code, err = run_main(TWO_RANKS + ["--output-dir", str(out), "--resume-from-checkpoint", "latest"])
    assert code == 0, err
    assert close_to(final_weights(out), final_weights(one_rank_reference))


@pytest.mark.slow
def test_a_hung_rank_makes_the_other_stop_within_the_timeout_and_resume_works(tmp_path, one_rank_reference):
    import time

    out = tmp_path / "run"
    process = launch_two_ranks(TWO_RANKS + ["--output-dir", str(out)])
    rank_one = rank_one_once_saved(process, out)
    import psutil

    rank_zero = [c for c in psutil.Process(process.pid).children(recursive=True) if c.environ().get("RANK") == "0"][0]
    rank_one.suspend()  # SIGSTOP: alive but silent, so no connection reset tells rank 0 anything
    stopped_at = time.time()
    try:
        rank_zero.wait(timeout=120)  # it must give up on its own
        waited = time.time() - stopped_at
    finally:
        rank_one.kill()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "error: lost contact with another rank" in stderr and "--dist-timeout-s" in stderr, stderr[-3000:]
    assert waited < 60, waited  # --dist-timeout-s 10 (gloo's default would be 30 minutes)
    for path in ckpt.list_checkpoints(out):
        check_complete(path)
    code, err = run_main(TWO_RANKS + ["--output-dir", str(out), "--resume-from-checkpoint", "latest"])
    assert code == 0, err
    assert close_to(final_weights(out), final_weights(one_rank_reference))


def test_a_run_cut_by_a_token_budget_resumes_bit_identical(tmp_path, monkeypatch):
    """Stopped by SIGTERM mid-run and resumed: the resumed run takes the checkpoint's plan (its token
    budget) instead of probing again, so its windows are cut the same way and the weights match an
    uninterrupted run bit for bit."""
    fixed = ["--micro-batch-size", "2", "--grad-accum-steps", "2"]
    start = TINY.index(fixed[0])
    assert TINY[start:start + 4] == fixed
    tokens = TINY[:start] + TINY[start + 4:] + ["--micro-batch-size", "auto", "--grad-accum-steps", "auto",
                                                "--cut-by", "tokens", "--max-memory", "28MiB", "--safety-margin", "0",
                                                "--plan-cache", str(tmp_path / "plans.json")]
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    code, err = run_main(tokens + ["--output-dir", str(whole)])
    assert code == 0, err
    plan = json.loads((whole / "plan.json").read_text())
    assert plan["cut"] == "tokens" and plan["micro_batch_tokens"]
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert max(r["gradient_accumulation_steps"] for r in records) >= 2  # windows really are cut

    def send(loss):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss

    on_call(monkeypatch, {5}, send)
    code, err = run_main(tokens + ["--output-dir", str(stopped)])  # the cached plan: the same cut
    assert code == 143, err
    monkeypatch.undo()
    code, err = run_main(tokens + ["--output-dir", str(stopped), "--resume-from-checkpoint", "latest"])
    assert code == 0, err
    assert json.loads((stopped / "plan.json").read_text())["source"] == "checkpoint"
    assert identical(final_weights(stopped), final_weights(whole))
