"""Our planner vs `accelerate.utils.find_executable_batch_size`, each in a fresh process under the same cap.

    python scripts/compare_planner.py                       # defaults: 1.0 GiB over the warm process
    python scripts/compare_planner.py --budget-mib 1536 --json bench/results/planner.json

Every search runs in its own child process: one thread, a warm-up step at micro-batch 1, then
RLIMIT_AS set to (address space in use + budget), so an oversized step raises a real
"DefaultCPUAllocator: can't allocate memory" (docs/architecture.md: a thread or arena created under a tight cap
can abort the process instead; hence threads and warm-up first). The true maximum is found by brute
force, one fresh child per size, around the sizes the searches report.

Children run with MALLOC_MMAP_THRESHOLD_=65536 by default: glibc otherwise raises its mmap threshold
after each large free and serves later tensors from a heap it never shrinks, so after one failed
probe the address space left under the cap shrinks by ~20 MB (measured here), and every in-process
search (ours and Accelerate's) then settles below the true maximum. `--glibc-default` measures that.

Child modes (used by the tests too): --child accum | accelerate | single --size N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

FIT, OOM_EXIT = 0, 3


WORKLOADS = ("tiny", "gpt2-small")


def device_of_run():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_workload(seed: int = 0, vocab: int = 4096, width: int = 64, seq_len: int = 128, name: str = "tiny"):
    """`tiny`: a small causal LM in plain torch (imports fast) whose memory grows ~linearly with the
    batch, dominated by the vocab-sized logits, like a real LM's; `gpt2-small`: GPT-2 small (124M,
    from its config) at 512 tokens, the GPU bench's. With AdamW, whose state appears at step 1. On the
    GPU when there is one."""
    import torch

    if name == "gpt2-small":
        return _gpt2_small(seed)
    torch.manual_seed(seed)

    class TinyLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(vocab, width)
            self.mix = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(), torch.nn.Linear(4 * width, width))
            self.head = torch.nn.Linear(width, vocab)

        def forward(self, input_ids, labels):
            hidden = self.embed(input_ids)
            hidden = hidden + self.mix(hidden)
            logits = self.head(hidden)
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)

    def make_batch(size: int) -> dict:
        ids = torch.randint(0, vocab, (size, seq_len), generator=generator)
        return {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return model(**batch)

    return model, optimizer, make_batch, loss_fn


def _gpt2_small(seed: int, seq_len: int = 512):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    device = device_of_run()
    model = GPT2LMHeadModel(GPT2Config(n_positions=seq_len)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(seed)

    def make_batch(size: int) -> dict:
        ids = torch.randint(0, model.config.vocab_size, (size, seq_len), generator=generator).to(device)
        return {"input_ids": ids, "labels": ids}

    def loss_fn(model, batch):
        return model(**batch).loss

    return model, optimizer, make_batch, loss_fn


def address_space_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def cap_memory(budget_bytes: int) -> None:
    """Limit this process's address space to what it uses now plus `budget_bytes`."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_bytes() + budget_bytes, hard))


def prepare_child(budget_bytes: int, accelerator=None, workload: str = "tiny"):
    """The workload, a warm-up step at size 1, then (on CPU) the cap: one thread first, since a
    thread created under a tight cap can abort the process. On a GPU the device's own size is the
    cap. Returns the workload."""
    import torch

    if device_of_run().type == "cpu":
        torch.set_num_threads(1)
    from accum.probe import make_train_step

    model, optimizer, make_batch, loss_fn = build_workload(name=workload)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    make_train_step(model, make_batch, accelerator, optimizer, loss_fn)(1)
    if device_of_run().type == "cpu" and budget_bytes:
        cap_memory(budget_bytes)
    return model, optimizer, make_batch, loss_fn


PROBE_STEPS = 2  # what plan_for runs per probe: two training steps back to back


def child_accum(budget_bytes: int, workload: str = "tiny", margin: float = 0.1) -> dict:
    """Our search from 1, without a limit, probing as plan_for does (two steps per probe, reserved
    memory against the device's size less `margin` on a GPU); then the smallest failing size is
    tried again."""
    from accum.oom import free_memory, is_oom
    from accum.probe import find_max_micro_batch, make_train_step

    model, optimizer, make_batch, loss_fn = prepare_child(budget_bytes, workload=workload)
    step = make_train_step(model, make_batch, None, optimizer, loss_fn, steps=PROBE_STEPS)
    began = time.perf_counter()
    result = find_max_micro_batch(step, start=1, progress=False, steps=PROBE_STEPS, device=device_of_run(),
                                  safety_margin=margin)
    seconds = time.perf_counter() - began
    failed = [probe.size for probe in result.probes if not probe.fit]
    retry = None
    if failed:
        smallest = min(failed)
        try:
            step(smallest)
            retry = {"size": smallest, "fails_again": False}
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            retry = {"size": smallest, "fails_again": True}
        free_memory()
    return {"method": "accum", "size": result.size, "probes": len(result.probes), "seconds": seconds,
            "sizes": [[p.size, p.fit] for p in result.probes], "retry_smallest_failure": retry}


def child_accelerate(budget_bytes: int, start: int, workload: str = "tiny") -> dict:
    """Accelerate's helper as its docs use it: decorate the step, start at `start`, shrink x0.9 per OOM."""
    from accelerate.utils import find_executable_batch_size

    from accum.probe import make_train_step

    model, optimizer, make_batch, loss_fn = prepare_child(budget_bytes, workload=workload)
    step = make_train_step(model, make_batch, None, optimizer, loss_fn)
    sizes: list[int] = []

    @find_executable_batch_size(starting_batch_size=start)
    def run(batch_size):
        sizes.append(batch_size)
        step(batch_size)
        return batch_size

    began = time.perf_counter()
    size = run()
    seconds = time.perf_counter() - began
    return {"method": "accelerate.find_executable_batch_size", "start": start, "size": size,
            "probes": len(sizes), "seconds": seconds, "sizes": sizes}


def child_single(budget_bytes: int, size: int, steps: int = 1, workload: str = "tiny") -> dict:
    """`steps` training steps back to back at `size` in a fresh, capped process (a run's steady
    state, optimizer state included): do they all fit?"""
    from accum.oom import is_oom
    from accum.probe import make_train_step

    model, optimizer, make_batch, loss_fn = prepare_child(budget_bytes, workload=workload)
    try:
        make_train_step(model, make_batch, None, optimizer, loss_fn, steps=steps)(size)
        return {"size": size, "steps": steps, "fit": True}
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        return {"size": size, "steps": steps, "fit": False}


MMAP_THRESHOLD = "65536"


def child_env(glibc_default: bool = False) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if not glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
    return env


def run_child(mode: str, budget_bytes: int, extra: list[str] = (), timeout: float = 300,
              glibc_default: bool = False, workload: str = "tiny", margin: float = 0.1) -> dict:
    """Run this script as a fresh child process; returns its JSON line (the last line of stdout)."""
    env = child_env(glibc_default)
    command = [sys.executable, __file__, "--child", mode, "--budget-bytes", str(budget_bytes),
               "--workload", workload, "--margin", str(margin), *extra]
    began = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - began
    return result


def fits(budget_bytes: int, size: int, glibc_default: bool = False, steps: int = 3, workload: str = "tiny") -> bool:
    """Whether `steps` training steps at `size` run in a fresh process under the cap."""
    return run_child("single", budget_bytes, ["--size", str(size), "--steps", str(steps)],
                     glibc_default=glibc_default, workload=workload)["fit"]


def brute_force_max(budget_bytes: int, hint: int, glibc_default: bool = False) -> tuple[int, dict[int, bool]]:
    """The largest size that fits, each size tried in a fresh child, walking from `hint` up or down.
    Assumes fit is monotone in size (checked only in the range walked)."""
    seen: dict[int, bool] = {}
    size = max(1, hint)
    seen[size] = fits(budget_bytes, size, glibc_default)
    if seen[size]:
        while True:
            seen[size + 1] = fits(budget_bytes, size + 1, glibc_default)
            if not seen[size + 1]:
                return size, seen
            size += 1
    while size > 1:
        size -= 1
        seen[size] = fits(budget_bytes, size, glibc_default)
        if seen[size]:
            return size, seen
    return 0, seen


def compare(budget_bytes: int, accelerate_start: int, glibc_default: bool = False) -> dict:
    ours = run_child("accum", budget_bytes, glibc_default=glibc_default)
    theirs = run_child("accelerate", budget_bytes, ["--start", str(accelerate_start)], glibc_default=glibc_default)
    true_max, seen = brute_force_max(budget_bytes, ours["size"], glibc_default)
    return {
        "budget_bytes": budget_bytes,
        "malloc_mmap_threshold": None if glibc_default else int(MMAP_THRESHOLD),
        "true_max": true_max,
        "brute_force": {str(k): v for k, v in sorted(seen.items())},
        "accum": ours,
        "accelerate": theirs,
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}, {os.uname().sysname}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["accum", "accelerate", "single"])
    parser.add_argument("--budget-bytes", type=int, default=None)
    parser.add_argument("--budget-mib", type=float, default=1024, help="memory over the warm process, MiB")
    parser.add_argument("--workload", default="tiny", choices=WORKLOADS, help="what to train (gpt2-small: the GPU bench's)")
    parser.add_argument("--margin", type=float, default=0.1, help="our search's safety margin (on a GPU)")
    parser.add_argument("--size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="training steps a fresh process runs at --size")
    parser.add_argument("--start", type=int, default=512, help="find_executable_batch_size's starting size")
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's dynamic mmap threshold on")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    budget = args.budget_bytes or int(args.budget_mib * 2**20)
    if args.child:
        handler = {"accum": lambda: child_accum(budget, args.workload, args.margin),
                   "accelerate": lambda: child_accelerate(budget, args.start, args.workload),
                   "single": lambda: child_single(budget, args.size, args.steps, args.workload)}[args.child]
        print(json.dumps(handler()), flush=True)
        return 0
    result = compare(budget, args.start, args.glibc_default)
    print(f"cap: {budget / 2**20:.0f} MiB over the warm process; MALLOC_MMAP_THRESHOLD_="
          f"{result['malloc_mmap_threshold'] or 'glibc default'}; each search in a fresh process")
    for key in ("accum", "accelerate"):
        row = result[key]
        print(f"{row['method']:40s} size {row['size']:5d} of true {result['true_max']:5d}  "
              f"probes {row['probes']:3d}  search {row['seconds']:7.2f} s  process {row['process_seconds']:7.2f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
