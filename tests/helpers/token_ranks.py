"""Two CPU ranks training tiny GPT-2 windows cut by a token budget (tests/test_equivalence.py).

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \\
        tests/helpers/token_ranks.py OUT_DIR

Rank 0 writes OUT_DIR/result.json: the weights' updates after the windows (as lists) and, per window,
each rank's count of non-empty micro-batches (the ranks' shares cut into different numbers).
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from accum import Accumulator, TaskLoss, TokenBudget, WindowSampler, pad_collate, plan_batch  # noqa: E402
from accum.windows import rank_micro_batches  # noqa: E402
from tests.test_equivalence import LR, SEED, STEPS, tiny_gpt2, varied_data  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    base, data = tiny_gpt2(), varied_data("clm", 28)
    model = tiny_gpt2()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=LR))
    # 24 tokens a micro-batch: in 3 of the 4 windows the two ranks' shares cut into different counts
    plan = dataclasses.replace(plan_batch(8, 2, accelerator.num_processes, cut="tokens", token_length=14),
                               micro_batch_tokens=24)
    accumulator = Accumulator(accelerator, model, optimizer, plan, loss=TaskLoss("clm"), collate=pad_collate("clm", 0))
    sampler = WindowSampler(len(data), 8, seed=SEED)
    counts = []
    for _ in range(STEPS):
        window = [data[i] for i in sampler.next_window()]
        counts.append([sum(1 for part in rank_micro_batches(window, TokenBudget(), plan.micro_batch_tokens, 2, rank)
                           if part) for rank in range(2)])
        accumulator.step(window)
    if accelerator.is_main_process:
        inner = accelerator.unwrap_model(model)
        updates = [(p - p0).detach().tolist() for p, p0 in zip(inner.parameters(), base.parameters(), strict=True)]
        (out / "result.json").write_text(json.dumps({"updates": updates, "counts": counts}))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
