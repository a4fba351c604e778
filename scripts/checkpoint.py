"""Checkpoints that survive a kill at any point: safetensors weights, JSON state, atomic rename.

Layout: <output_dir>/checkpoints/step-00000012/ holding model.safetensors,
optimizer.pt (tensors only, loaded with weights_only=True), rng-rank<r>.safetensors
and state.json (our own state as JSON: nothing of ours is unpickled). A checkpoint is
written under a temporary name and renamed once complete, so `latest` never picks a
half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from accum import rng
from accum.errors import ConfigError
from accum.files import make_readable

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary or half-deleted one has no matching name)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(output_dir: str | Path, spec: str) -> Path:
    """'latest' or a path -> the checkpoint directory. Raises ConfigError when there is none."""
    if spec == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"--resume-from-checkpoint latest: no checkpoint in {checkpoint_root(output_dir)}; "
                              "start without it, or point to a checkpoint directory")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"checkpoint {spec!r} not found (no {STATE_FILE} in it): give a step-NNNNNNNN directory or 'latest'")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG state (CPU and every CUDA device), as save_checkpoint(rng_tensors=...) takes it."""
    return rng.tensors(rng.capture(python=False))


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that no kill leaves a half-deleted one under a step-* name:
    rename it out of list_checkpoints' sight first (atomic), then delete."""
    trash = path.with_name(f".trash-{path.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    """Temporary and half-deleted directories left by a process killed while saving."""
    for item in root.iterdir():
        if item.name.startswith((".tmp-step-", ".trash-")) and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: str | Path,
                    keep: int, rng_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint for `state['optimizer_step']` atomically on all ranks; keep the last `keep`.

    `rng_tensors`: this rank's RNG state to save (default: the current one), e.g. from before a window
    that turned out non-finite. Returns the final directory. All ranks must call it (they write
    their RNG state). Raises OSError when a write fails: the temporary directory is removed and
    the complete checkpoints are untouched.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state['optimizer_step']:08d}"
    tmp = root / f".tmp-step-{state['optimizer_step']:08d}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
            save_model(accelerator.unwrap_model(model, keep_torch_compile=False), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            full_state = dict(state, scheduler=scheduler.state_dict() if scheduler is not None else None)
            (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=2, default=_json_default))
        accelerator.wait_for_everyone()
        save_file(rng_tensors if rng_tensors is not None else rng_state(), str(tmp / f"rng-rank{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            make_readable(tmp)  # and flushed: safetensors writes 0600, the rest of the run is group-readable
            _fsync_dir(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (an --overwrite of an older run)
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(output_dir)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def plan_to_resume(output_dir: str | Path, spec: str | None):
    """The Plan saved in the checkpoint `spec` names (None without one, or when it cannot be read:
    resuming then reports the problem itself)."""
    from accum.plan import Plan

    if not spec:
        return None
    try:
        return Plan.from_dict(read_state(resolve_checkpoint(output_dir, spec))["plan"])
    except (ConfigError, KeyError, TypeError):
        return None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint. Raises ConfigError (one line) when it is corrupt."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
        int(state["optimizer_step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt ({type(exc).__name__}: {exc}); "
                          "resume from an older one or start again") from None


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return our JSON state.

    Raises ConfigError (one line) for a corrupt or mismatched checkpoint; nothing is written.
    """
    state = read_state(path)
    try:
        missing, unexpected = load_model(accelerator.unwrap_model(model, keep_torch_compile=False),
                                         str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"weights do not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng-rank{accelerator.process_index}.safetensors"
        if rng_file.is_file():
            rng.restore(load_file(str(rng_file)))
    except ConfigError:
        raise
    except Exception as exc:  # a truncated or foreign file: safetensors/torch raise many kinds
        raise ConfigError(f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                          "resume from an older one or start again") from None
    return state
