"""OOM recovery and the gradient noise scale in your own loop, from the same Accumulator.

    python examples/oom_recovery_and_noise_scale.py

A tiny GPT-2 trained 4 micro-batches per window. With `recovery`, an out-of-memory error in a
forward or backward pass (on any rank) drops the window's gradients, halves the micro-batch at the
same effective batch and replays the window: no step is lost or doubled, and the gradient is the
same. `memory_pressure=0.9` shrinks *before* an error when a window's peak passes 90% of the budget.
With `noise_scale`, the Accumulator measures B_simple (McCandlish et al. 2018) from the gradients
accumulation computes anyway (no extra pass): past about that many tokens, a larger batch stops
paying. `--simulate-oom N` makes the forward pass of micro-batches larger than N samples raise the
CPU allocator's out-of-memory error, to watch a recovery.
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from accum import Accumulator, AdaptiveBatch, TaskLoss, WindowSampler, pad_collate, plan_from_accumulation

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=16)
parser.add_argument("--simulate-oom", type=int, default=None, metavar="N")
args = parser.parse_args()


class Loss(TaskLoss):
    """TaskLoss, with an out-of-memory error for micro-batches above --simulate-oom samples."""

    def forward(self, model, batch):
        if args.simulate_oom is not None and model.training and len(batch["input_ids"]) > args.simulate_oom:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory (simulated)")
        return super().forward(model, batch)


accelerator = Accelerator()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
rng = torch.Generator().manual_seed(2)
data = [{"input_ids": torch.randint(1, 300, (int(n),), generator=rng).tolist()}
        for n in torch.randint(8, 64, (args.steps * 32,), generator=rng)]
plan = plan_from_accumulation(8, 4, accelerator.num_processes)  # or plan_for(...): see exact_accumulation.py
accelerator.print(plan.banner())

model, optimizer = accelerator.prepare(model, optimizer)
accumulator = Accumulator(accelerator, model, optimizer, plan, loss=Loss("clm"), collate=pad_collate("clm", 0),
                          max_grad_norm=1.0, recovery=AdaptiveBatch(plan), noise_scale=True)
sampler = WindowSampler(len(data), plan.effective_batch_size, seed=0)
for _ in range(args.steps):
    result = accumulator.step([data[i] for i in sampler.next_window()])
    for change in result.adjustments:
        accelerator.print(f"step {result.optimizer_step}: {change.describe()}")
    noise = "not known yet" if result.b_simple is None else f"{result.b_simple:.0f} tokens"
    accelerator.print(f"step {result.optimizer_step}: loss {result.loss:.4f}, micro-batch {result.micro_batch_size}, "
                      f"B_simple {noise}")
