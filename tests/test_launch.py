"""`python -m accum launch`: a malformed accelerate config is one line and exit 2 before anything
starts; the training script's own exit code and one-line error come back without the launcher's
traceback; Ctrl-C and SIGTERM reach the script, which saves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from accum.cli.launch import (
    RepeatedErrorFilter,
    check_accelerate_config,
    describe_exit,
    script_exit,
    shell_code,
)
from accum.errors import ConfigError
from tests.helpers.fault_common import ROOT, TINY, tree

CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_accelerate_config_passes(path):
    assert check_accelerate_config(path)["distributed_type"]


MALFORMED = {
    "not YAML": ("distributed_type: [\n", "not valid YAML: expected the node content"),
    "a list": ("- MULTI_GPU\n", "must be a mapping"),
    "empty": ("", "must be a mapping"),
    "unknown key": ("distributed_type: 'NO'\nnum_process: 2\n", "unknown key 'num_process'; did you mean 'num_processes'?"),
    "no distributed_type": ("num_processes: 1\n", "distributed_type is missing"),
    "bare NO": ("distributed_type: NO\n", "distributed_type reads as False: quote it"),
    "bad choice": ("distributed_type: MULTI_GPUS\n", "did you mean 'MULTI_GPU'?"),
    "bad precision": ("distributed_type: 'NO'\nmixed_precision: fp17\n", "mixed_precision 'fp17' is not a choice"),
    "word for a number": ("distributed_type: MULTI_GPU\nnum_processes: two\n", "num_processes must be a whole number"),
    "zero processes": ("distributed_type: MULTI_GPU\nnum_processes: 0\n", "num_processes must be at least 1"),
    "string for a bool": ("distributed_type: 'NO'\nuse_cpu: 'yes'\n", "use_cpu must be true or false"),
    "rank out of range": ("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 2\n", "machine_rank 2 must be in 0..1"),
    "port": ("distributed_type: MULTI_GPU\nmain_process_port: 70000\n", "not a TCP port"),
    "mapping expected": ("distributed_type: FSDP\nfsdp_config: full\n", "fsdp_config must be a mapping"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_accelerate_config_is_one_line_naming_the_key(tmp_path, case):
    text, expected = MALFORMED[case]
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        check_accelerate_config(path)
    message = str(caught.value)
    assert expected in message and "\n" not in message and str(path) in message, message


def test_launch_usage_errors_are_one_line(capsys):
    from accum.cli.main import main

    assert main(["launch", "--config_file", "accelerate_configs/cpu.yaml"]) == 2  # no script
    assert main(["launch", "--num_processes", "two", "scripts/train.py"]) == 2
    assert main(["launch", "--config_file", "accelerate_configs/cpu.yaml", "scripts/nope.py"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert "training_script" in lines[0] and "'two'" in lines[1] and "scripts/nope.py" in lines[2]


def test_a_missing_accelerate_config(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: check --config_file"):
        check_accelerate_config(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- pure pieces


def test_repeated_error_lines_are_shown_once_and_progress_passes_at_once():
    out: list[bytes] = []
    stream = RepeatedErrorFilter(out.append)
    stream.feed(b"\r 10%|#")
    assert b"".join(out) == b"\r 10%|#"  # a progress bar is not held back
    stream.feed(b"   |\r 20%|##  |\n")
    stream.feed(b"error: bad value; fix")
    assert b"".join(out) == b"\r 10%|#   |\r 20%|##  |\n"  # an unfinished error line is held
    stream.feed(b" it\nerror: bad value; fix it\nerror: another\n")
    stream.feed(b"err")
    stream.feed(b"or: another\nlast")
    stream.close()
    assert b"".join(out) == b"\r 10%|#   |\r 20%|##  |\nerror: bad value; fix it\nerror: another\nlast"


def test_an_error_after_a_progress_bar_on_the_same_line_is_shown_once():
    out: list[bytes] = []
    stream = RepeatedErrorFilter(out.append)
    for _ in range(2):  # two ranks, each with its bar still on the line
        stream.feed(b"\rsteps:  0%| 5/100 [00:00]")
        stream.feed(b"error: stopped by SIGINT after optimizer step 6\n")
    stream.close()
    assert b"".join(out) == (b"\rsteps:  0%| 5/100 [00:00]error: stopped by SIGINT after optimizer step 6\n"
                             b"\rsteps:  0%| 5/100 [00:00]")


def test_the_scripts_exit_code_comes_back_and_only_unexplained_exits_get_a_line():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    assert script_exit(subprocess.CalledProcessError(2, "x")) == (2, None)
    failures = {0: ProcessFailure(local_rank=0, pid=10, exitcode=-15, error_file=""),
                1: ProcessFailure(local_rank=1, pid=11, exitcode=4, error_file="")}
    failures[1].timestamp, failures[0].timestamp = 1, 2  # rank 1 failed first; rank 0 was stopped after
    assert script_exit(ChildFailedError("train.py", failures)) == (4, 1)
    assert describe_exit(2, None) is None and describe_exit(4, 1) is None and describe_exit(130, 0) is None
    assert describe_exit(-signal.SIGTERM, None) is None  # 143: train.py says itself where it stopped
    assert "rank 1 was killed by SIGKILL" in describe_exit(-signal.SIGKILL, 1)
    assert "exited with code 1" in describe_exit(1, None)
    assert (shell_code(-signal.SIGKILL), shell_code(2)) == (137, 2)


# ----------------------------------------------------------------------------- the command


def launch(argv: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.Popen([sys.executable, "-m", "accum", "launch", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def finished(argv: list[str]) -> tuple[int, list[str]]:
    process = launch(argv)
    _, stderr = process.communicate(timeout=300)
    return process.returncode, [line for line in stderr.splitlines() if line.strip()]


def test_a_malformed_accelerate_config_stops_the_launch_before_anything_runs(tmp_path):
    bad = tmp_path / "accelerate.yaml"
    bad.write_text("distributed_type: MULTI_GPU\nnum_processes: two\n")
    before = tree(tmp_path)
    code, lines = finished(["--config_file", str(bad), "scripts/train.py", *TINY, "--output-dir", str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1 and "num_processes must be a whole number (got 'two')" in lines[0], lines
    assert tree(tmp_path) == before


def test_bad_input_to_the_script_is_its_one_line_and_its_exit_code(tmp_path):
    code, lines = finished(["--config_file", "accelerate_configs/cpu.yaml", "scripts/train.py", *TINY,
                            "--batch-size", "0", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: batch_size"), lines  # no CalledProcessError
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_script_that_explained_its_exit_gets_no_launcher_line_and_keeps_its_code(tmp_path):
    """Before, a train.py crash came through as exit 1 plus a line of the launcher's. train.py now says
    `error: crashed with ...` itself (tests/test_bad_input.py); the launcher adds nothing to it."""
    script = tmp_path / "crashing.py"
    script.write_text("import sys\nprint('error: crashed with ZeroDivisionError: division by zero (a bug)', "
                      "file=sys.stderr)\nsys.exit(1)\n")
    code, lines = finished(["--config_file", "accelerate_configs/cpu.yaml", str(script)])
    assert code == 1 and lines == ["error: crashed with ZeroDivisionError: division by zero (a bug)"], lines


@pytest.mark.slow
def test_two_ranks_refusing_the_same_input_print_one_line(tmp_path):
    code, lines = finished(["--config_file", "accelerate_configs/multi_cpu_2proc.yaml", "scripts/train.py", *TINY,
                            "--micro-batch-size", "3", "--grad-accum-steps", "1", "--output-dir", str(tmp_path / "out")])
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines  # no ChildFailedError report


@pytest.mark.slow
@pytest.mark.parametrize("setup,who", [("cpu", "the launcher"), ("cpu", "the process group"),
                                       ("multi_cpu_2proc", "the process group")])
def test_ctrl_c_reaches_the_script_which_saves_and_exits_130(tmp_path, setup, who):
    from scripts import checkpoint as ckpt
    from tests.helpers.fault_common import check_complete

    out = tmp_path / "run"
    split = ["--grad-accum-steps", "1"] if setup == "multi_cpu_2proc" else []  # 4 = 2 micro x 1 x 2 ranks
    process = launch(["--config_file", f"accelerate_configs/{setup}.yaml", "scripts/train.py", *TINY, *split,
                      "--max-steps", "100000", "--save-every", "5", "--output-dir", str(out)], start_new_session=True)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-00000005").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, process.communicate()[1][-3000:]
    if who == "the launcher":
        process.send_signal(signal.SIGINT)
    else:
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process at once
    _, stderr = process.communicate(timeout=120)
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert process.returncode == 130, stderr[-3000:]
    assert len(errors) == 1 and "stopped by SIGINT after optimizer step" in errors[0], stderr[-3000:]  # every rank: once
    assert "Traceback" not in stderr
    step = int(errors[0].split("after optimizer step ")[1].split(";")[0])
    assert check_complete(ckpt.list_checkpoints(out)[-1]) == step


def test_cpu_threads_are_what_accelerate_would_pick_and_only_on_cpu(monkeypatch):
    from types import SimpleNamespace

    import psutil

    from accum.cli.launch import cpu_thread_args

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    args = SimpleNamespace(num_cpu_threads_per_process=None, cpu=False, num_processes=None, num_machines=None)
    assert cpu_thread_args(args, {"use_cpu": True, "num_processes": 2}) == ["--num_cpu_threads_per_process", "4"]
    assert cpu_thread_args(args, {"use_cpu": True, "num_processes": 16}) == ["--num_cpu_threads_per_process", "1"]
    assert cpu_thread_args(args, {"use_cpu": True}) == ["--num_cpu_threads_per_process", "8"]
    assert cpu_thread_args(args, {"distributed_type": "MULTI_GPU"}) == []  # a GPU config: accelerate's choice
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_thread_args(args, {"use_cpu": True}) == []  # the user's own setting wins
