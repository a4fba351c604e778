"""Checkpoints that survive a kill at any point: safetensors weights, JSON state, atomic rename.

Layout: <output_dir>/checkpoints/step-00000012/ holding model.safetensors,
optimizer.pt (tensors only, loaded with weights_only=True; a sharded (FSDP2) run saves both gathered
into full tensors keyed by parameter name, which resume on any number of ranks, sharded or not), rng-rank<r>.safetensors
and state.json (our own state as JSON: nothing of ours is unpickled). A checkpoint is
written under a temporary name and renamed once complete, so `latest` never picks a
half-written one. state.json names the run that wrote it (`run_id`, accum/cli/rundir.py):
`latest` and the rotation of old checkpoints see only the checkpoints of one run. Every write
failure is an OSError (safetensors and torch.save raise others on a full disk), and the
temporary directory is removed before it propagates.
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
from accum.cli.rundir import owner_of_checkpoint
from accum.errors import ConfigError
from accum.files import as_os_error, fsync_directory, make_readable, read_bounded
from accum.sharded import full_state_dict, is_fully_sharded, load_full_state_dict

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
STATE_FILE = "state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(path.name).group(1))


UNREADABLE = "?"  # the owner of a checkpoint whose state.json cannot be read


def owner(path: Path) -> str | None:
    """The run id a checkpoint's state.json names; None for one written before run ids; UNREADABLE
    when the file cannot be read (read_state says why)."""
    try:
        state = json.loads(read_bounded(path / STATE_FILE, MAX_STATE_BYTES))
    except (OSError, ValueError):  # FileTooLarge is an OSError
        return UNREADABLE
    return owner_of_checkpoint(state) if isinstance(state, dict) else None


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first (a temporary or half-deleted one has no matching name). With
    `run_id`, those of that run only (and those written before run ids existed)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    if run_id is not None:
        found = [p for p in found if owner(p) in (run_id, None)]
    return sorted(found, key=_step_of)


def resolve_checkpoint(output_dir: str | Path, spec: str, run_id: str | None = None) -> Path:
    """'latest' (of the run `run_id`, when the directory names its owner) or a path -> the checkpoint
    directory. Raises ConfigError when there is none."""
    if spec == "latest":
        everything = list_checkpoints(output_dir)
        # an unreadable state.json is not attributed to another run: read_state refuses it in one line
        found = [p for p in everything if run_id is None or owner(p) in (run_id, None, UNREADABLE)]
        if not found and everything:
            raise ConfigError(f"--resume-from-checkpoint latest: the checkpoints in {checkpoint_root(output_dir)} "
                              f"belong to another run than the one that owns {output_dir} (run.json): point to one "
                              "by path, or start again")
        if not found:
            raise ConfigError(f"--resume-from-checkpoint latest: no checkpoint in {checkpoint_root(output_dir)}; "
                              "start without it, or point to a checkpoint directory")
        return found[-1]
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"checkpoint {spec!r} not found (no {STATE_FILE} in it): give a step-NNNNNNNN directory or 'latest'")
    return path


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


def remove_leftovers(output_dir: str | Path) -> None:
    """Temporary and half-deleted checkpoint directories left by a process killed while saving."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        _remove_leftovers(root)


def _remove_leftovers(root: Path) -> None:
    for item in root.iterdir():
        if item.name.startswith((".tmp-step-", ".trash-")) and item.is_dir():
            shutil.rmtree(item, ignore_errors=True)


def _write(path: Path, write) -> None:
    """`write()` a file of a checkpoint; any failure is an OSError naming `path` (accum.files.as_os_error)."""
    try:
        write()
    except Exception as exc:  # noqa: BLE001 - safetensors and torch.save fail without OSError on a full disk
        raise as_os_error(exc, path) from exc


def save_checkpoint(accelerator, model, optimizer, scheduler, state: dict[str, Any], output_dir: str | Path,
                    keep: int, rng_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint for `state['optimizer_step']` atomically on all ranks; keep the last `keep` of
    the run `state['run_id']` (another run's checkpoints are never deleted).

    `rng_tensors`: this rank's RNG state to save (default: the current one), e.g. from before a window
    that turned out non-finite. Returns the final directory. All ranks must call it (they write
    their RNG state). Raises OSError when a write fails: the temporary directory is removed and
    the complete checkpoints are untouched. Raises ValueError for a step that is not a whole number >= 0.
    """
    step = state["optimizer_step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"optimizer_step {step!r} cannot name a checkpoint: it must be a whole number >= 0")
    run_id = state.get("run_id")
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    full_state = dict(state, scheduler=scheduler.state_dict() if scheduler is not None else None)
    text = json.dumps(full_state, indent=2, default=_json_default)
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    gathered = _gathered_state(unwrapped, optimizer)  # every rank takes part
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            _remove_leftovers(root)
            tmp.mkdir()
            if gathered is None:
                _write(tmp / "model.safetensors", lambda: save_model(unwrapped, str(tmp / "model.safetensors")))
                _write(tmp / "optimizer.pt", lambda: torch.save(optimizer.state_dict(), tmp / "optimizer.pt"))
            else:
                _write(tmp / "model.safetensors", lambda: save_file(gathered[0], str(tmp / "model.safetensors")))
                _write(tmp / "optimizer.pt", lambda: torch.save(gathered[1], tmp / "optimizer.pt"))
            _write(tmp / STATE_FILE, lambda: (tmp / STATE_FILE).write_text(text))
        accelerator.wait_for_everyone()
        rng_file = tmp / f"rng-rank{accelerator.process_index}.safetensors"
        _write(rng_file, lambda: save_file(rng_tensors if rng_tensors is not None else rng_state(), str(rng_file)))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            make_readable(tmp)  # and flushed: safetensors writes 0600, the rest of the run is group-readable
            fsync_directory(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk stays full while it is there
        raise
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (a resume from an earlier checkpoint of this run)
            if owner(final) not in (run_id, None):
                shutil.rmtree(tmp, ignore_errors=True)
                raise FileExistsError(17, f"{final} belongs to another run; it is kept", str(final))
            _remove(final)
        os.replace(tmp, final)
        fsync_directory(root)
        for old in list_checkpoints(output_dir, run_id)[:-keep]:
            _remove(old)
    accelerator.wait_for_everyone()
    return final


def _gathered_state(model, optimizer) -> tuple[dict[str, torch.Tensor], dict] | None:
    """For a sharded model (FSDP2), its weights and optimizer state gathered into full CPU tensors keyed
    by parameter name (accum.sharded.full_state_dict; the main process gets them, the others empty
    dicts), so that the checkpoint resumes on any number of ranks, sharded or not. None for a plain model:
    its own state dicts are saved as they are."""
    if not is_fully_sharded(model):
        return None
    weights, optimizer_state = full_state_dict(model, optimizer)
    # tied weights (an LM head sharing the embedding) come back as one tensor under two names, which
    # safetensors refuses to save: each name gets its own copy
    return {name: tensor.detach().clone().contiguous() for name, tensor in weights.items()}, optimizer_state


def _saved_gathered(optimizer_state: Any) -> bool:
    """Whether an optimizer.pt holds a gathered state (parameters named, not numbered): saved by a
    sharded run, loaded through accum.sharded.load_full_state_dict."""
    groups = optimizer_state.get("param_groups", []) if isinstance(optimizer_state, dict) else []
    return any(isinstance(param, str) for group in groups for param in group.get("params", []))


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


# state.json's counters: whole numbers >= 0 (a hand-edited -5 would name a directory step--0000005 and
# overwrite real checkpoints on the way back up).
COUNTERS = ("optimizer_step", "micro_step", "samples_seen", "tokens_seen")
POSITION = ("epoch", "window_in_epoch", "sample_in_epoch")
MAX_STATE_BYTES = 64 << 20  # state.json holds counters and short histories; a larger one is not ours


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def validate_state(state: Any, path: Path) -> dict[str, Any]:
    """`state` if it is a checkpoint state this code wrote: counters and positions whole and >= 0, the
    statistics' counters equal to them, the step the directory's name says, a run id that is a string.
    Raises ValueError naming what is wrong. (Positions within the data are the sampler's to check.)"""
    if not isinstance(state, dict):
        raise ValueError(f"holds {type(state).__name__}, not a mapping")
    for key in COUNTERS + POSITION:
        if not _whole(state.get(key)):
            raise ValueError(f"{key} {state.get(key)!r} is not a whole number >= 0")
    stats = state.get("stats")
    if not isinstance(stats, dict):
        raise ValueError(f"stats {stats!r:.60} is not a mapping")
    for key in COUNTERS:
        if stats.get(key) != state[key]:
            raise ValueError(f"stats.{key} {stats.get(key)!r} differs from {key} {state[key]}")
    named = CHECKPOINT_RE.match(path.name)
    if named and int(named.group(1)) != state["optimizer_step"]:
        raise ValueError(f"optimizer_step {state['optimizer_step']} differs from the directory's step {int(named.group(1))}")
    if "run_id" in state and not (isinstance(state["run_id"], str) and state["run_id"]):
        raise ValueError(f"run_id {state['run_id']!r} is not a run id")
    for key in ("fingerprint", "plan"):
        if key in state and not isinstance(state[key], dict):
            raise ValueError(f"{key} {state[key]!r:.60} is not a mapping")
    return state


def read_state(path: Path) -> dict[str, Any]:
    """state.json of a checkpoint, validated (`validate_state`). Raises ConfigError (one line) when it is
    missing, corrupt or holds values this code never writes."""
    try:
        return validate_state(json.loads(read_bounded(path / STATE_FILE, MAX_STATE_BYTES)), path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"checkpoint {str(path)!r} is corrupt ({type(exc).__name__}: {exc}); "
                          "resume from an older one or start again") from None


def nonfinite_tensor(tensors: Any) -> str | None:
    """The name of the first floating-point tensor in `tensors` (a dict or list, nested) that holds a
    NaN or an infinity, or None when all are finite."""
    stack = [("", tensors)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return name or "a tensor"
        elif isinstance(value, dict):
            stack.extend((f"{name}.{key}".lstrip("."), item) for key, item in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{name}[{index}]", item) for index, item in enumerate(value))
    return None


def verified_finite(path: Path) -> bool:
    """Whether a checkpoint's weights and optimizer state can be read and are all finite."""
    try:
        if nonfinite_tensor(load_file(str(path / "model.safetensors"))) is not None:
            return False
        return nonfinite_tensor(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")) is None
    except Exception:  # noqa: BLE001 - a truncated or foreign file: not a checkpoint to name
        return False


def load_checkpoint(accelerator, model, optimizer, scheduler, path: Path, require_rng: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from `path`; return our JSON state.

    Raises ConfigError (one line) for a corrupt or mismatched checkpoint, non-finite weights or optimizer
    state, or (with `require_rng`) a missing RNG file of this rank; nothing is written.
    """
    state = read_state(path)
    rng_file = path / f"rng-rank{accelerator.process_index}.safetensors"
    if require_rng and not rng_file.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} has no {rng_file.name}: without it the resumed run is not "
                          "bit-identical to an uninterrupted one; pass `resume_without_rng` to go on anyway, or "
                          "resume from another checkpoint")
    try:
        weights = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        bad = nonfinite_tensor(weights) or nonfinite_tensor(optimizer_state)
        if bad is not None:
            raise ConfigError(f"checkpoint {str(path)!r} holds non-finite values ({bad}): resume from an older one "
                              "or start again")
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if _saved_gathered(optimizer_state):  # from a sharded run: loads on any number of ranks, sharded or not
            if set(weights) != set(unwrapped.state_dict()):
                raise ValueError(f"weights do not match the model ({sorted(set(weights) ^ set(unwrapped.state_dict()))[:3]})")
            load_full_state_dict(unwrapped, weights, optimizer, optimizer_state)
        elif is_fully_sharded(unwrapped):
            raise ConfigError(f"checkpoint {str(path)!r} was saved by a run without FSDP and a sharded model cannot "
                              "take its optimizer state: resume it without FSDP (accelerate_configs/cpu.yaml or "
                              "multi_gpu.yaml), or start again")
        else:
            missing, unexpected = load_model(unwrapped, str(path / "model.safetensors"), strict=False)
            if missing or unexpected:
                raise ValueError(f"weights do not match the model (missing {list(missing)[:3]}, "
                                 f"unexpected {list(unexpected)[:3]})")
            optimizer.load_state_dict(optimizer_state)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if rng_file.is_file():
            rng.restore(load_file(str(rng_file)))
    except ConfigError:
        raise
    except Exception as exc:  # a truncated or foreign file: safetensors/torch raise many kinds
        raise ConfigError(f"checkpoint {str(path)!r} cannot be loaded ({type(exc).__name__}: {str(exc)[:200]}); "
                          "resume from an older one or start again") from None
    return state
