"""One rank of the test that plan caches differing between ranks cannot split them (tests/test_plan_ranks.py).

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \\
        tests/helpers/plan_ranks.py OUT_DIR

Each rank has its own cache file (OUT_DIR/cache-rankN.json), as two machines would. Three plans in a row:
1. no cache has an entry: a joint probe; the main process writes its cache (rank 0 now has an entry);
2. rank 0 has the entry, rank 1 none: a hit everywhere (rank 1 must not probe alone);
3. the entry moved to rank 1, rank 0 has none: a joint probe (rank 1 must not take its own hit).
Each rank writes OUT_DIR/rankN.json: the plans it got, in order. The collectives time out after 60 s,
so a split fails in a minute instead of hanging.
"""

import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402

from accum.probe import plan_for  # noqa: E402


def make_batch(size: int) -> dict:
    return {"x": torch.randn(size, 16), "y": torch.randn(size, 1)}


def loss_fn(model, batch) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"])


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))])
    rank = accelerator.process_index
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    caches = [out / f"cache-rank{r}.json" for r in range(accelerator.num_processes)]

    def plan() -> dict:
        return plan_for(accelerator, model, make_batch, 8, optimizer, loss_fn=loss_fn, cache_path=caches[rank],
                        progress=False, steps_per_probe=1).to_dict()

    plans = [plan()]
    accelerator.wait_for_everyone()
    entries = [cache.exists() for cache in caches]
    plans.append(plan())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(caches[0], caches[1])
    accelerator.wait_for_everyone()
    plans.append(plan())
    (out / f"rank{rank}.json").write_text(json.dumps({"plans": plans, "entries_before_second": entries}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
