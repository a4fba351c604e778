"""accum.embeddings: sparse row gradients for embedding tables, `.grad` kept dense. The gradients, the
AdamW update and the noise meter's norms match dense embeddings; tied and frozen tables stay dense; the
setting's rules; and a real run through train.py with the flag on and off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from accum.cli.config import make_config
from accum.cli.planning import apply_sparse_embedding_grads
from accum.embeddings import SparseEmbeddingGrads, sparse_embedding_tables, use_sparse_embedding_grads
from accum.errors import ConfigError
from accum.noise import MicroGradientNorms
from tests.helpers.fault_common import final_weights
from tests.test_equivalence import tiny_gpt2
from tests.test_flags import run


def tiny_bert(vocab: int = 500) -> torch.nn.Module:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForSequenceClassification(config)


def micro_batches(seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Three micro-batches of different shapes, with padding (token 0 = padding_idx) and repeated tokens."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length in ((4, 12), (3, 7), (5, 9)):
        ids = torch.randint(1, 40, (rows, length), generator=gen)  # few distinct tokens: many repeats
        ids[0, length // 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": (ids != 0).long(),
                        "labels": torch.randint(0, 3, (rows,), generator=gen)})
    return batches


def window_gradients(model, batches, after_backward=None) -> list[torch.Tensor]:
    for batch in batches:
        model(**batch).loss.backward()
        if after_backward is not None:
            after_backward(batch)
    return [p.grad.clone() for p in model.parameters()]


def test_sparse_tables_give_the_dense_gradient_and_update_and_leave_grad_dense():
    dense, sparse_model = tiny_bert(), tiny_bert()
    sparse = SparseEmbeddingGrads(sparse_model)
    # BERT's three tables; the classifier and encoder are not embeddings
    assert sparse.names == ["bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
                            "bert.embeddings.token_type_embeddings"]
    assert sparse.parameters == (500 + 64 + 2) * 32
    layouts = []
    expected = window_gradients(dense, micro_batches())
    got = window_gradients(sparse_model, micro_batches(),
                           after_backward=lambda _: layouts.append(sparse_model.bert.embeddings.word_embeddings.weight.grad.layout))
    assert layouts == [torch.strided] * 3  # dense after every micro-batch, the first included
    for g_dense, g_sparse in zip(expected, got, strict=True):
        torch.testing.assert_close(g_sparse, g_dense, rtol=0, atol=1e-6)
    # the fused AdamW step, which refuses sparse gradients, runs and moves the weights alike
    for model in (dense, sparse_model):
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()
    for p_dense, p_sparse in zip(dense.parameters(), sparse_model.parameters(), strict=True):
        torch.testing.assert_close(p_sparse, p_dense, rtol=0, atol=1e-6)
    sparse.remove()
    assert not any(m.sparse for _, m in sparse.tables)
    for p in sparse_model.parameters():
        p.grad = None
    sparse_model(**micro_batches()[0]).loss.backward()
    assert not sparse_model.bert.embeddings.word_embeddings.weight.grad.is_sparse


def test_the_noise_meter_norms_a_sparse_gradient_as_the_dense_one():
    """The meter's hook gets the uncoalesced rows (a row once per token): summed before the norm, the
    window's small-batch and big-batch norms are the dense ones."""
    results = []
    for make_sparse in (False, True):
        model = tiny_bert()
        if make_sparse:
            SparseEmbeddingGrads(model)
        meter = MicroGradientNorms(model.parameters())
        batches = micro_batches()
        meter.start_window(grad_scale=1.0)
        window_gradients(model, batches, after_backward=lambda b, meter=meter: meter.after_backward(items=len(b["labels"])))
        results.append(meter.window_result())
    dense, sparse = results
    assert sparse is not None and dense is not None
    for a, b in zip(sparse, dense, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b)


def test_tied_and_frozen_tables_stay_dense():
    gpt2 = tiny_gpt2()  # wte is also lm_head's weight: it gets a dense gradient from the head anyway
    assert [name for name, _ in sparse_embedding_tables(gpt2)] == ["transformer.wpe"]
    bert = tiny_bert()
    bert.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    assert "bert.embeddings.word_embeddings" not in [name for name, _ in sparse_embedding_tables(bert)]


def test_the_setting_applies_to_one_process_without_an_engine():
    assert use_sparse_embedding_grads("auto", 1, None, compiled=False) == (True, None)
    assert use_sparse_embedding_grads(True, 1, None, compiled=True) == (True, None)
    assert use_sparse_embedding_grads("auto", 1, None, compiled=True)[0] is False
    assert use_sparse_embedding_grads(False, 1, None, compiled=False) == (False, None)
    assert use_sparse_embedding_grads("auto", 1, None, compiled=False, device_type="cuda") == (True, None)
    assert use_sparse_embedding_grads("auto", 1, None, compiled=False, device_type="mps")[0] is False
    assert use_sparse_embedding_grads(True, 1, None, compiled=False, device_type="mps") == (True, None)
    for processes, engine in ((2, None), (1, "DeepSpeed"), (1, "FSDP")):
        on, why = use_sparse_embedding_grads(True, processes, engine, compiled=False)
        assert on is False and why
    with pytest.raises(ValueError, match="auto, true or false"):
        use_sparse_embedding_grads("yes", 1, None, compiled=False)


def test_train_with_sparse_embedding_grads_matches_dense(tmp_path, capsys):
    """Through train.py (tiny BERT classifying tweets, AdamW fused, 3 optimizer steps of 2 micro-batches):
    the same weights with the flag on and off, and the banner names the tables."""
    common = ["--config", "configs/classification_tiny.yaml", "--max-steps", "3", "--max-train-samples", "48",
              "--max-eval-samples", "8", "--eval-batch-size", "8", "--batch-size", "8", "--micro-batch-size", "4",
              "--lr", "1e-2", "--dropout", "0.0"]
    outputs = {}
    for setting in ("auto", "false"):
        outputs[setting] = run(common + ["--sparse-embedding-grads", setting, "--output-dir", str(tmp_path / setting)],
                               capsys)
    assert "Sparse embedding gradients: bert.embeddings.word_embeddings" in outputs["auto"]
    assert "Sparse embedding gradients" not in outputs["false"]
    on, off = final_weights(tmp_path / "auto"), final_weights(tmp_path / "false")
    assert on.keys() == off.keys()
    for key in on:  # AdamW at lr 1e-2: rounding may turn a near-zero step (see test_flags), never more
        torch.testing.assert_close(on[key], off[key], rtol=0, atol=1e-4)


def test_the_run_setting_refuses_true_where_it_cannot_work_and_auto_stays_dense_there():
    two_ranks, alone = SimpleNamespace(num_processes=2), SimpleNamespace(num_processes=1)
    model = tiny_bert()
    assert apply_sparse_embedding_grads(make_config({"model": "unused"}), model, two_ranks) is None
    assert not any(m.sparse for m in model.modules() if isinstance(m, torch.nn.Embedding))
    with pytest.raises(ConfigError, match="--sparse-embedding-grads true cannot work here: 2 processes"):
        apply_sparse_embedding_grads(make_config({"model": "unused", "sparse_embedding_grads": True}), model, two_ranks)
    line = apply_sparse_embedding_grads(make_config({"model": "unused"}), model, alone)
    assert line.startswith("Sparse embedding gradients: bert.embeddings.word_embeddings")
    assert model.bert.embeddings.word_embeddings.sparse
