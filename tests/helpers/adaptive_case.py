"""The model and data of the OOM-recovery tests: tiny GPT-2 whose logits dominate memory, and a data set
whose later windows (in the training order) hold long sequences, so memory runs out mid-run."""

from __future__ import annotations

import random

import torch

from accum.windows import epoch_order

VOCAB, SHORT, LONG = 4096, 16, 384
SEED = 5


def tiny_gpt2(n_embd: int = 32) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LONG, n_embd=n_embd, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2LMHeadModel(config)


def growing_data(num_samples: int, window_size: int, long_from_window: int) -> list[dict]:
    """Samples of SHORT tokens, except those that the seed's first epoch puts in window
    `long_from_window` or later, which hold LONG tokens."""
    rng = random.Random(1)
    order = epoch_order(num_samples, SEED, 0)
    long_positions = set(order[long_from_window * window_size:])
    return [{"input_ids": [rng.randrange(1, VOCAB) for _ in range(LONG if i in long_positions else SHORT)]}
            for i in range(num_samples)]


def run_config(output_dir: str, batch: int, micro: int, accum: int, steps: int, **extra):
    from accum.cli.config import make_config

    values = dict(
        task="clm", model_config_overrides={"model_type": "gpt2"}, optimizer="sgd", lr=0.5, lr_scheduler="linear",
        warmup_steps=1, max_grad_norm=None, batch_size=batch, micro_batch_size=micro, grad_accum_steps=accum,
        eval_batch_size=2, max_steps=steps, output_dir=output_dir, report_to="none", seed=SEED,
        plan_cache=f"{output_dir}/plans.json",
    )
    return make_config({**values, **extra})
