"""One training run of tests/test_adaptive.py in a process of its own, with a real memory limit.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/helpers/adaptive_child.py '<json spec>'
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/helpers/adaptive_child.py '<spec>'

spec: output_dir, batch, micro, accum, steps, samples, long_from_window, and optionally budget_mib
(address space allowed above what the process holds after its first optimizer step) and limit_rank
(only that rank is limited). The limit is set once the first window has been trained, so threads,
allocator arenas and optimizer state exist (a thread created under a tight RLIMIT_AS can abort
the process instead of raising). Exit code: train.py's main() convention (4: out of memory).
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


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no monitor thread, which could be born under the limit
    from accum.recovery import OutOfMemoryError
    from accum.window import Callback
    from scripts import train as train_mod
    from tests.helpers.adaptive_case import growing_data, run_config, tiny_gpt2

    class MemoryCap(Callback):
        """Caps the address space once the first window is trained; lifts it before evaluation."""

        def on_window_start(self, accumulator, samples):
            if accumulator.stats.optimizer_step == 1:
                _, hard = resource.getrlimit(resource.RLIMIT_AS)
                resource.setrlimit(resource.RLIMIT_AS, (vm_size() + int(budget * 2**20), hard))

        def on_evaluate(self, run):
            # Training is over: lift the cap before evaluation and teardown. Under it, a rank can hang
            # while the process group shuts down (seen 1 run in 6), which is the harness, not recovery.
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))

    rank = int(os.environ.get("RANK", "0"))
    budget = spec.get("budget_mib")
    callbacks = [MemoryCap()] if budget is not None and spec.get("limit_rank") in (None, rank) else []
    window = spec["batch"]
    data = growing_data(spec["samples"], window, spec["long_from_window"])
    config = run_config(spec["output_dir"], spec["batch"], spec["micro"], spec["accum"], spec["steps"],
                        **spec.get("extra", {}))
    try:
        train_mod.train(config, model=tiny_gpt2(), train_data=data, eval_data=data[:4],
                        cli_keys={"micro_batch_size", "grad_accum_steps"}, callbacks=callbacks)
    except OutOfMemoryError as exc:
        code, reason = train_mod.exit_status_of(exc)  # the one line train.py's main() prints
        print(f"error: {reason}", file=sys.stderr)
        return int(code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
