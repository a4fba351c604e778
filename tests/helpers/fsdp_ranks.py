"""Two CPU gloo ranks training tiny models sharded with FSDP2 (`fully_shard`), for tests/test_fsdp.py.

    ACCELERATE_USE_CPU=1 python -m accelerate.commands.launch --multi_gpu --num_processes 2 \\
        tests/helpers/fsdp_ranks.py OUT_DIR

Accelerate 1.15 does not enable its FSDP plugin on the CPU, so the model is sharded here by hand
(accum.sharded.fully_shard_model) and handed to the Accumulator unprepared, as the plugin hands it over
on GPUs. Rank 0 writes OUT_DIR/result.json (full tensors as lists, keyed by parameter name):
- "exact": per task and layout, the first window's gradient, the weights' updates after the windows and
  the gradient norms; 29 samples, so the last window holds 5 (3 + 2: the second rank runs an empty micro-batch);
- "resume": SGD with momentum and clipping at 1 x 4: the weights of a straight run, whether a run resumed
  on 2 ranks from train.py's checkpoint after window 2 ended bit-identical (and its largest difference),
  the gradient norms; the checkpoint (scripts/checkpoint.py: gathered full tensors) stays in
  OUT_DIR/checkpoints for a resume on 1 process.
"""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import Accelerator  # noqa: E402

from accum import Accumulator, Callback, TaskLoss, WindowSampler, pad_collate, plan_batch  # noqa: E402
from accum.errors import ConfigError  # noqa: E402
from accum.sharded import full_state_dict, fully_shard_model  # noqa: E402
from scripts import checkpoint as ckpt  # noqa: E402
from tests.test_equivalence import LR, SEED, STEPS, tiny_bert, tiny_gpt2, varied_data  # noqa: E402

SAMPLES, RESUME_AT, MOMENTUM, CLIP = 29, 2, 0.9, 0.5


class FirstGradient(Callback):
    """The first window's full gradient (gathered from the shards: every rank takes part)."""

    def __init__(self):
        self.grads = None

    def on_before_optimizer_step(self, accumulator):
        if self.grads is None:
            self.grads = {name: p.grad.full_tensor().tolist() for name, p in accumulator.model.named_parameters()}


def sharded_run(accelerator, base, task, micro, *, momentum=0.0, clip=None, callbacks=(), checkpoint=None):
    """(model, optimizer, accumulator, sampler): FSDP2 over the ranks, SGD, windows of 8; `checkpoint`
    (a directory save_checkpoint wrote) resumes through train.py's load_checkpoint."""
    model = fully_shard_model(copy.deepcopy(base))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    plan = plan_batch(8, micro, accelerator.num_processes)
    accumulator = Accumulator(accelerator, model, optimizer, plan, loss=TaskLoss(task), collate=pad_collate(task, 0),
                              max_grad_norm=clip, recovery=False, callbacks=list(callbacks))
    sampler = WindowSampler(SAMPLES, 8, seed=SEED)
    if checkpoint is not None:
        state = ckpt.load_checkpoint(accelerator, model, optimizer, None, checkpoint)
        sampler.load_state_dict(state["sampler"])
        accumulator.load_state_dict(state["accumulator"])
    return model, optimizer, accumulator, sampler


def checkpoint_state(accumulator, sampler) -> dict:
    """What train.py puts in state.json, as far as load_checkpoint checks it, plus the positions."""
    stats = accumulator.stats.state_dict()
    return {**{key: stats[key] for key in ckpt.COUNTERS}, **{key: sampler.state_dict()[key] for key in ckpt.POSITION},
            "stats": stats, "sampler": sampler.state_dict(), "accumulator": accumulator.state_dict(), "run_id": "fsdp"}


def full_weights(model, base) -> dict[str, torch.Tensor]:
    """The full weights on rank 0 (gathered; every rank takes part), {} on the others."""
    state, _ = full_state_dict(model)
    return {name: state[name] for name, _ in base.named_parameters()} if state else {}


def exact(accelerator, task, base, data, micro) -> dict:
    recorder = FirstGradient()
    model, _, accumulator, sampler = sharded_run(accelerator, base, task, micro, callbacks=[recorder])
    norms = [accumulator.step([data[i] for i in sampler.next_window()]).grad_norm for _ in range(STEPS)]
    held = sum(p.to_local().numel() for p in model.parameters()) / sum(p.numel() for p in base.parameters())
    weights = full_weights(model, base)
    updates = {name: (weights[name] - p0).tolist() for name, p0 in base.named_parameters() if weights}
    return {"first_gradient": recorder.grads, "updates": updates, "grad_norms": norms, "held_fraction": held}


def resume(accelerator, out, base, data) -> dict:
    model, optimizer, accumulator, sampler = sharded_run(accelerator, base, "clm", 1, momentum=MOMENTUM, clip=CLIP)
    norms, saved = [], None
    for window in range(STEPS):
        norms.append(accumulator.step([data[i] for i in sampler.next_window()]).grad_norm)
        if window + 1 == RESUME_AT:  # every rank takes part: the shards are gathered
            saved = ckpt.save_checkpoint(accelerator, model, optimizer, None, checkpoint_state(accumulator, sampler),
                                         out, keep=2)
    straight = full_weights(model, base)
    model, _, accumulator, sampler = sharded_run(accelerator, base, "clm", 1, momentum=MOMENTUM, clip=CLIP,
                                                 checkpoint=saved)
    for _ in range(STEPS - RESUME_AT):
        accumulator.step([data[i] for i in sampler.next_window()])
    resumed = full_weights(model, base)
    if not accelerator.is_main_process:
        return {}
    return {"weights": {name: value.tolist() for name, value in straight.items()}, "grad_norms": norms,
            "bit_identical": all(torch.equal(straight[name], resumed[name]) for name in straight),
            "largest_difference": max((straight[name] - resumed[name]).abs().max().item() for name in straight)}


def refused(accelerator) -> str | None:
    """The one line the Accumulator answers OOM recovery with on a sharded model (None: it did not refuse)."""
    model = fully_shard_model(tiny_gpt2())
    try:
        Accumulator(accelerator, model, torch.optim.SGD(model.parameters(), lr=LR), plan_batch(8, 2, 2),
                    loss=TaskLoss("clm"), collate=pad_collate("clm", 0), recovery=True)
    except ConfigError as exc:
        return str(exc)
    return None


def plain_checkpoint_refused(accelerator, out) -> str | None:
    """The one line load_checkpoint answers a sharded model with when the checkpoint came from a plain run
    (its optimizer state is numbered per parameter and cannot be sharded); None: it loaded."""
    model = tiny_gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    accumulator = Accumulator(accelerator, model, optimizer, plan_batch(8, 2, 2), loss=TaskLoss("clm"),
                              collate=pad_collate("clm", 0), recovery=False)
    path = ckpt.save_checkpoint(accelerator, model, optimizer, None,
                                checkpoint_state(accumulator, WindowSampler(SAMPLES, 8, seed=SEED)), out / "plain", keep=1)
    sharded = fully_shard_model(tiny_gpt2())
    try:
        ckpt.load_checkpoint(accelerator, sharded, torch.optim.SGD(sharded.parameters(), lr=LR), None, path)
    except ConfigError as exc:
        return str(exc)
    return None


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    result = {"exact": {}, "world_size": accelerator.num_processes, "recovery_refused": refused(accelerator),
              "plain_checkpoint_refused": plain_checkpoint_refused(accelerator, out)}
    for task, build in (("classification", tiny_bert), ("clm", tiny_gpt2)):
        base, data = build(), varied_data(task, SAMPLES)
        for micro in (2, 1):
            result["exact"][f"{task} {micro}"] = exact(accelerator, task, base, data, micro)
    result["resume"] = resume(accelerator, out, tiny_gpt2(), varied_data("clm", SAMPLES))
    if accelerator.is_main_process:
        (out / "result.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
