"""One rank of the two-rank planner test: rank 1 gets a tighter memory cap; both must agree.

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \
        tests/helpers/probe_ranks.py OUT_DIR BUDGET_RANK0 BUDGET_RANK1
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from accum.probe import make_train_step, plan_for  # noqa: E402
from scripts.compare_planner import build_workload, cap_memory  # noqa: E402


def main() -> None:
    out_dir, budgets = Path(sys.argv[1]), [int(value) for value in sys.argv[2:4]]
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model, optimizer, make_batch, loss_fn = build_workload(seed=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    with accelerator.no_sync(model):  # warm-up before the cap: threads and arenas exist already
        make_train_step(model, make_batch, accelerator, optimizer, loss_fn)(1)
    accelerator.wait_for_everyone()
    cap_memory(budgets[accelerator.process_index])
    plan = plan_for(accelerator, model, make_batch, 128, optimizer, loss_fn=loss_fn, cache_path=False, progress=False)
    accelerator.wait_for_everyone()
    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
        "plan": plan.to_dict(),
    }
    (out_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
