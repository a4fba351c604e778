"""Sparse gradients for embedding tables, with `.grad` kept dense.

An `nn.Embedding`'s backward writes a dense gradient the size of the whole table (30,522 x 384 for
MiniLM: 11.7M of its 22.7M parameters), although one micro-batch touches a few hundred rows. Each
micro-batch then pays a zero-fill of the table, the scatter of its rows, and an add of the table into
`.grad`: on a 2-core CPU a window of four micro-batches of MiniLM took 693 ms that way and 596 ms
with sparse row gradients (docs/architecture.md). The sum is the same: the rows are added in the same
order, and the gradients agreed exactly in that measurement.

`SparseEmbeddingGrads(model)` turns on `nn.Embedding.sparse` for each table that is trained alone
(not tied to another module's weight, as GPT-2's output layer is: that weight gets a dense gradient
from the head anyway) and registers a post-accumulate hook on its weight that turns a sparse `.grad`
into a dense one. The first micro-batch of a window therefore leaves a dense `.grad` (one write of the
table per window instead of three passes per micro-batch), later micro-batches add their rows into it
in place, and everything after backward (clipping, the optimizer, the loss scaler, the noise meter's
window norm) sees the dense gradient it expects. Any loop can use it::

    sparse = SparseEmbeddingGrads(model)    # before the first backward; sparse.names lists the tables
    ...                                     # train as usual
    sparse.remove()                         # dense gradients again

One process only: DDP, FSDP and DeepSpeed reduce dense gradient buckets (`use_sparse_embedding_grads`
says where it applies). A gradient hook on the weight sees the sparse micro-batch gradient
(uncoalesced: a row may appear once per token); `accum.noise` coalesces it before its norm.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SparseEmbeddingGrads", "sparse_embedding_tables", "use_sparse_embedding_grads"]


def sparse_embedding_tables(model: torch.nn.Module) -> list[tuple[str, torch.nn.Embedding]]:
    """(name, module) of each `nn.Embedding` whose weight is trained and belongs to it alone: a
    weight that another module also holds (tied input and output embeddings) is left dense."""
    holders: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Embedding) and module.weight.requires_grad
            and holders.get(id(module.weight)) == 1]


SPARSE_DEVICES = ("cpu", "cuda")  # where torch's sparse embedding backward and to_dense are exercised here


def use_sparse_embedding_grads(setting: bool | str, num_processes: int, engine: str | None,
                               compiled: bool, device_type: str = "cpu") -> tuple[bool, str | None]:
    """(on, why not) for the `sparse_embedding_grads` setting: true or false as given, except that
    several processes or a sharding engine refuse it (they reduce dense buckets); "auto": on for one
    process without an engine, without torch.compile (whose graphs are traced for the dense kernel),
    on a CPU or CUDA device (sparse kernels elsewhere, e.g. MPS, are incomplete)."""
    if setting not in ("auto", True, False):
        raise ValueError(f"sparse_embedding_grads={setting!r}: must be auto, true or false")
    if setting is False:
        return False, None
    blocked = (f"{num_processes} processes reduce dense gradient buckets" if num_processes > 1
               else f"{engine} shards dense gradients" if engine else None)
    if blocked is not None:
        return False, blocked
    if setting == "auto" and compiled:
        return False, "torch.compile traces the dense embedding kernel"
    if setting == "auto" and device_type not in SPARSE_DEVICES:
        return False, f"sparse gradients are not used on {device_type} by default"
    return True, None


class SparseEmbeddingGrads:
    """Sparse row gradients for the model's embedding tables (`sparse_embedding_tables`), `.grad`
    made dense after each accumulation. `names` lists the tables; `remove()` undoes both."""

    def __init__(self, model: torch.nn.Module):
        self.tables = sparse_embedding_tables(model)
        self.names = [name for name, _ in self.tables]
        self._was_sparse = [module.sparse for _, module in self.tables]
        self._handles = []
        for _, module in self.tables:
            module.sparse = True
            self._handles.append(module.weight.register_post_accumulate_grad_hook(densify_grad))

    @property
    def parameters(self) -> int:
        """Values in the tables made sparse."""
        return sum(module.weight.numel() for _, module in self.tables)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for (_, module), was in zip(self.tables, self._was_sparse, strict=True):
            module.sparse = was
        self._handles = []


def densify_grad(param: torch.Tensor) -> None:
    """Post-accumulate hook: a sparse `.grad` (the window's first micro-batch) becomes dense, so later
    micro-batches add their rows in place and every reader after backward sees a dense gradient."""
    grad: Any = param.grad
    if grad is not None and grad.is_sparse:
        param.grad = grad.to_dense()
