"""Exact gradient accumulation in your own Accelerate loop: plan, then one call per optimizer step.

    python examples/exact_accumulation.py
    python -m accum launch --config_file accelerate_configs/multi_cpu_2proc.yaml examples/exact_accumulation.py

A tiny BERT classifier (built from a config, no download) on sequences of 4 to 48 tokens whose label
is whether the first token is even. `plan_for` probes real steps on this run's device and process
count for the largest micro-batch under the budget and splits the target batch exactly; the
Accumulator then makes every optimizer step's gradient the mean over the window's samples on all
ranks, whatever the padding, the partial last window or the number of processes.
"""

import argparse

import torch
from accelerate import Accelerator
from transformers import BertConfig, BertForSequenceClassification

from accum import Accumulator, TaskLoss, WindowSampler, pad_collate, plan_for

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--batch-size", type=int, default=64, help="target effective batch")
parser.add_argument("--max-memory", default="24MiB", help="what a step may add (CPU) / the device budget (GPU)")
parser.add_argument("--epochs", type=int, default=2)
args = parser.parse_args()

accelerator = Accelerator()
torch.manual_seed(0)
model = BertForSequenceClassification(BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128, num_labels=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
rng = torch.Generator().manual_seed(1)
data = []
for _ in range(500):
    ids = torch.randint(1, 200, (int(torch.randint(4, 49, (1,), generator=rng)),), generator=rng).tolist()
    data.append({"input_ids": ids, "labels": ids[0] % 2})
collate = pad_collate("classification", pad_token_id=0)

plan = plan_for(accelerator, model, lambda n: collate([{"input_ids": [1] * 48, "labels": 0}] * n),
                target_batch_size=args.batch_size, optimizer=optimizer, max_memory=args.max_memory, cache_path=False)
accelerator.print(plan.banner())

model, optimizer = accelerator.prepare(model, optimizer)
accumulator = Accumulator(accelerator, model, optimizer, plan, loss=TaskLoss("classification"), collate=collate,
                          max_grad_norm=1.0)
sampler = WindowSampler(len(data), plan.effective_batch_size, seed=0)
for epoch in range(args.epochs):
    for indices in sampler:
        result = accumulator.step([data[i] for i in indices])
        accelerator.print(f"epoch {epoch} step {result.optimizer_step}: loss {result.loss:.4f} on {result.samples} "
                          f"samples in {result.micro_batches} micro-batches of up to {result.micro_batch_size}")
