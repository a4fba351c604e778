"""Measure how much one real training step grows resident memory; run as a fresh process.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/helpers/estimate_child.py '<json spec>'

The spec names a GPT-2 config (keyword arguments), micro_batch_size, seq_len and optimizer.
A warm-up step first creates the optimizer state and lets the allocator settle; then the
resident high-water mark is reset (/proc/self/clear_refs) and one more step is taken.
Prints one JSON line: resident bytes before the step, the peak during it, and the growth.
Without the mmap threshold, glibc keeps freed blocks and the growth reads too small.
"""

import json
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def status_bytes(key: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(**spec["config"]))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if spec["optimizer"] == "adamw" else (
        torch.optim.SGD(model.parameters(), lr=1e-4))
    input_ids = torch.randint(0, spec["config"]["vocab_size"], (spec["micro_batch_size"], spec["seq_len"]))

    def training_step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    training_step()  # warm-up: optimizer state, allocator and autograd caches
    before = status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    training_step()
    peak = status_bytes("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "growth": peak - before}))


if __name__ == "__main__":
    main()
