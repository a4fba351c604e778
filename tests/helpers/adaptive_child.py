"""One training run of the real-OOM tests (tests/test_recovery.py) in a process of its own, with a real memory limit.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/helpers/adaptive_child.py '<json spec>'
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/helpers/adaptive_child.py '<spec>'

spec: output_dir, batch, micro, accum, steps, samples, long_from_window, and optionally budget_mib
(address space allowed above what the process holds when the cap is set), limit_rank (only that
rank is limited), cap_at (when the cap is set: "window" (default) once the first window has been
trained, so threads, allocator arenas and optimizer state exist (a thread created under a tight
RLIMIT_AS can abort the process instead of raising), lifted before evaluation; "optimizer_step"
right before the first optimizer.step(), after the first forward/backward ran, so AdamW's state is
allocated under it; "evaluation" before the final evaluation, after training), n_embd (the model's
width), eval_tokens (evaluate on 4 samples of this length instead of the first 4 training samples),
extra (run config keys). Exit code: train.py's main() convention (4: out of memory).
"""

import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def set_cap(budget_mib: float | None) -> None:
    """Allow `budget_mib` MiB of address space above what the process holds now (None: lift the cap)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (hard if budget_mib is None else vm_size() + int(budget_mib * 2**20), hard))


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread, which could be born under the limit
    from accum.recovery import OutOfMemoryError
    from accum.window import Callback
    from scripts import train as train_mod
    from tests.helpers.adaptive_case import growing_data, run_config, tiny_gpt2

    cap_at = spec.get("cap_at", "window")

    class MemoryCap(Callback):
        """Caps the address space at the moment `cap_at` names."""

        def on_window_start(self, accumulator, samples):
            if cap_at == "window" and accumulator.stats.optimizer_step == 1:
                set_cap(budget)

        def on_before_optimizer_step(self, accumulator):
            if cap_at == "optimizer_step" and accumulator.stats.optimizer_step == 0:
                set_cap(budget)

        def on_evaluate(self, run):
            # "window": training is over, lift the cap before evaluation and teardown. Under it, a rank can
            # hang while the process group shuts down (seen 1 run in 6), which is the harness, not recovery.
            set_cap(budget if cap_at == "evaluation" else None)

    rank = int(os.environ.get("RANK", "0"))
    budget = spec.get("budget_mib")
    callbacks = [MemoryCap()] if budget is not None and spec.get("limit_rank") in (None, rank) else []
    window = spec["batch"]
    data = growing_data(spec["samples"], window, spec["long_from_window"])
    eval_data = data[:4]
    if spec.get("eval_tokens"):
        eval_data = [{"input_ids": [(7 * i + j) % 4000 + 1 for j in range(spec["eval_tokens"])]} for i in range(4)]
    config = run_config(spec["output_dir"], spec["batch"], spec["micro"], spec["accum"], spec["steps"],
                        **spec.get("extra", {}))
    try:
        train_mod.train(config, model=tiny_gpt2(spec.get("n_embd", 32)), train_data=data, eval_data=eval_data,
                        cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=callbacks)
    except OutOfMemoryError as exc:
        code, reason = train_mod.exit_status_of(exc)  # the one line train.py's main() prints
        print(f"error: {reason}", file=sys.stderr)
        return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
