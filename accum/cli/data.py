"""Data and metrics of a run config (scripts/train.py, `python -m accum plan --config`): the data set
files or hub name -> tokenised samples, labels, and the evaluation metric. Models and tokenizers are
accum/cli/models.py's.

Shapes and units:
- classification: each example is `input_ids` (truncated to max_seq_len, not padded) and
  an int `labels`; a batch's item count is its number of samples.
- clm: each line/row of text is one example, truncated to max_seq_len (no concatenation
  into blocks: lengths stay varied, which the exactness tests need, and padding then
  matters); rows with fewer than 2 tokens are dropped, as they predict nothing. `labels`
  is a copy of input_ids with -100 at padding; the model shifts it, so a batch's item
  count is the number of positions whose *next* label is not -100.

Every user mistake raises `ConfigError` with one line naming the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from accum.cli.config import RunConfig
from accum.errors import ConfigError, first_line
from accum.loss import pad_collate

BUILTIN_TWEETS = "builtin:tweets"
ACCURACY_METRIC = Path(__file__).resolve().parent / "metrics" / "accuracy"  # evaluate.load: no hub
# Tokenizers without a real limit report this huge sentinel (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = int(1e20)
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass(frozen=True)
class LabelInfo:
    """Classes of a classification run (num_labels 0 and no names for clm)."""

    num_labels: int = 0
    id2label: dict[int, str] = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in self.id2label.items()}


# -- data sets -------------------------------------------------------------------------------


def _load_file(path_str: str, key: str, config: RunConfig):
    """One local file as a Dataset; the builder follows the extension. Raises ConfigError."""
    import datasets

    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key} {path_str!r} does not exist: check the path (relative to {str(Path.cwd())!r})")
    builder = _FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"{key} {path_str!r}: unknown extension {path.suffix!r}; use .csv, .json, .jsonl, .parquet or .txt")
    try:
        ds = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        if "corresponds to no data" in str(exc):  # a header and nothing else
            raise ConfigError(f"{key} {path_str!r} holds no usable rows: give a file with data") from None
        raise ConfigError(f"{key} {path_str!r} could not be read as {builder} ({first_line(exc)}): fix the file") from None
    if builder == "text" and config.text_column != "text":
        ds = ds.rename_column("text", config.text_column)
    return ds


def _load_hub(config: RunConfig):
    """(train, eval or None) from a `datasets` name; needs the hub unless cached."""
    import datasets

    try:
        splits = datasets.load_dataset(config.dataset)
    except Exception as exc:  # offline, unknown name, ... all arrive as different types
        raise ConfigError(f"dataset {config.dataset!r} could not be loaded ({first_line(exc)}): "
                          "check the name and the network, or use train_file for local data") from None
    if "train" not in splits:
        raise ConfigError(f"dataset {config.dataset!r} has no 'train' split (it has {', '.join(splits)})")
    held_out = next((splits[name] for name in ("validation", "test") if name in splits), None)
    return splits["train"], held_out


def _check_columns(ds, key: str, value: str, config: RunConfig) -> None:
    columns = ds.column_names
    wanted = [("text_column", config.text_column)]
    if config.task == "classification":
        wanted.append(("label_column", config.label_column))
    for setting, column in wanted:
        if column not in columns:
            raise ConfigError(f"{key} {value!r} has no column {column!r} (columns: {', '.join(columns)}): set {setting}")
    if len(ds) == 0:
        raise ConfigError(f"{key} {value!r} holds no usable rows: give a file with data")


def _drop_empty_texts(ds, column: str):
    return ds.filter(lambda batch: [isinstance(t, str) and t.strip() != "" for t in batch[column]],
                     batched=True, desc="dropping empty texts")


def load_splits(config: RunConfig):
    """(train_ds, eval_ds): `datasets.Dataset`s with the text (and label) columns.

    Sources: `dataset` (a hub name; its validation or test split is the eval set), or
    `train_file`/`eval_file` (.csv/.json/.jsonl/.parquet/.txt), or `builtin:tweets`
    (made by scripts/make_tweets.py on first use). Without an eval set, `eval_fraction`
    of the training data is held out with `seed` (eval_ds is None when that is 0).
    Rows with an empty text are dropped; then max_train_samples / max_eval_samples keep
    the first N. Raises ConfigError for a missing file, an empty data set or a missing column.
    """
    if config.dataset is not None:
        train_ds, eval_ds = _load_hub(config)
        train_key, train_value, eval_value = "dataset", config.dataset, config.dataset
    elif config.train_file is not None:
        train_file, eval_file = config.train_file, config.eval_file
        is_builtin = train_file.startswith("builtin:"), (eval_file or "").startswith("builtin:")
        if any(is_builtin):
            # builtin:tweets brings its own eval split, used unless eval_file names another.
            builtin_train, builtin_eval = _builtin_paths(config)
            if is_builtin[0]:
                train_file, eval_file = builtin_train, eval_file or builtin_eval
            if is_builtin[1]:
                eval_file = builtin_eval
        train_ds = _with_tweet_names(_load_file(train_file, "train_file", config), is_builtin[0], config)
        eval_ds = _load_file(eval_file, "eval_file", config) if eval_file else None
        if eval_ds is not None:
            eval_ds = _with_tweet_names(eval_ds, eval_file == builtin_eval if any(is_builtin) else False, config)
        train_key, train_value, eval_value = "train_file", config.train_file, eval_file
    else:
        raise ConfigError("no training data: set train_file (a local file or builtin:tweets) or dataset (a hub name)")

    _check_columns(train_ds, train_key, train_value, config)
    train_ds = _drop_empty_texts(train_ds, config.text_column)
    if eval_ds is None and config.eval_fraction > 0:
        if len(train_ds) < 2:
            raise ConfigError(f"{train_key} {train_value!r} has {len(train_ds)} row(s), too few to hold out "
                              "an eval split: add data or set eval_file")
        parts = train_ds.train_test_split(test_size=config.eval_fraction, seed=config.seed, shuffle=True)
        train_ds, eval_ds = parts["train"], parts["test"]
    elif eval_ds is not None:
        _check_columns(eval_ds, "eval_file" if train_key != "dataset" else "dataset", eval_value, config)
        eval_ds = _drop_empty_texts(eval_ds, config.text_column)

    if config.max_train_samples is not None:
        train_ds = train_ds.select(range(min(config.max_train_samples, len(train_ds))))
    if eval_ds is not None and config.max_eval_samples is not None:
        eval_ds = eval_ds.select(range(min(config.max_eval_samples, len(eval_ds))))
    for ds, key, value in ((train_ds, train_key, train_value), (eval_ds, "eval data", eval_value)):
        if ds is not None and len(ds) == 0:
            raise ConfigError(f"{key} {value!r} holds no non-empty texts: give a file with data")
    return train_ds, eval_ds


def _with_tweet_names(ds, is_tweets: bool, config: RunConfig):
    """The generated tweets store label ids; name them, so id2label says negative/neutral/positive."""
    if not is_tweets or config.task != "classification" or config.label_column not in ds.column_names:
        return ds
    from datasets import ClassLabel

    from accum.cli.tweets import LABELS

    return ds.cast_column(config.label_column, ClassLabel(names=list(LABELS)))


def _builtin_paths(config: RunConfig) -> tuple[str, str]:
    from accum.cli.tweets import DEFAULT_N_EVAL, DEFAULT_N_TRAIN, DEFAULT_OUT_DIR, ensure_tweets

    names = {value for value in (config.train_file, config.eval_file) if value and value.startswith("builtin:")}
    if names != {BUILTIN_TWEETS}:
        raise ConfigError(f"unknown built-in data set {sorted(names - {BUILTIN_TWEETS})[0]!r}: the one built-in is {BUILTIN_TWEETS}")
    # A larger request grows the files; the default sizes keep the default run's split fixed.
    n_train = max(DEFAULT_N_TRAIN, config.max_train_samples or 0)
    n_eval = max(DEFAULT_N_EVAL, config.max_eval_samples or 0)
    try:
        train_path, eval_path = ensure_tweets(DEFAULT_OUT_DIR, n_train, n_eval)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"train_file {BUILTIN_TWEETS!r}: {exc}") from None
    return str(train_path), str(eval_path)


# -- tokenisation ------------------------------------------------------------------------------


def max_positions(tokenizer, model_config: Any = None, overrides: dict[str, Any] | None = None) -> int | None:
    """The longest sequence the tokenizer and model accept, in tokens, or None when neither says."""
    limits = []
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < _NO_LIMIT:
        limits.append(int(tokenizer.model_max_length))
    for key in ("max_position_embeddings", "n_positions"):
        for value in (getattr(model_config, key, None), (overrides or {}).get(key)):
            if isinstance(value, int) and not isinstance(value, bool):
                limits.append(value)
    return min(limits) if limits else None


def min_seq_len(task: str, tokenizer) -> int:
    """The fewest tokens a sample can have and still train: the special tokens the tokenizer adds
    ([CLS], [SEP], ...) plus one token of text, and at least two for clm, which predicts each token
    from those before it."""
    specials = tokenizer.num_special_tokens_to_add(pair=False) if hasattr(tokenizer, "num_special_tokens_to_add") else 0
    return max(specials + 1, 2) if task == "clm" else specials + 1


def _label_mapping(train_ds, eval_ds, column: str) -> tuple[LabelInfo, dict[Any, int] | None]:
    """LabelInfo and a value -> id map (None when labels already are ids). Raises ConfigError."""
    from datasets import ClassLabel

    feature = train_ds.features[column]
    train_values = set(train_ds.unique(column))
    eval_values = set(eval_ds.unique(column)) if eval_ds is not None else set()
    if None in train_values | eval_values:
        raise ConfigError(f"label_column {column!r} has empty labels: fill or drop those rows")
    unseen = sorted(eval_values - train_values, key=str)
    if unseen:
        raise ConfigError(f"eval label {unseen[0]!r} never occurs in the training data: fix the labels or the split")
    if isinstance(feature, ClassLabel):
        return LabelInfo(feature.num_classes, dict(enumerate(feature.names))), None
    integers = all(isinstance(value, int) and not isinstance(value, bool) for value in train_values)
    if integers and min(train_values) < 0:
        raise ConfigError(f"label_column {column!r} has negative label {min(train_values)}: use ids from 0")
    if integers and max(train_values) < len(train_ds):
        # class ids: the head has one output per id up to the largest (an id missing from a small sample
        # keeps its place). Ids beyond the number of training rows cannot be a set of classes the data
        # covers (one label of 1e9 would mean a head and id2label of 1e9 entries): they are names instead,
        # so the label space is never larger than the labels present.
        count = max(train_values) + 1
        return LabelInfo(count, {index: str(index) for index in range(count)}), None
    names = sorted(train_values, key=(lambda value: value) if integers else str)
    return LabelInfo(len(names), {index: str(name) for index, name in enumerate(names)}), {
        name: index for index, name in enumerate(names)}


def tokenize_splits(config: RunConfig, tokenizer, train_ds, eval_ds, model_config: Any = None):
    """(train, eval, label_info): data sets of `input_ids` (+ int `labels` for classification).

    Truncates to max_seq_len, no padding (the collate pads per batch). String labels become
    ids in sorted order. Results are cached by `datasets` (its fingerprint covers the
    tokenizer and settings). `model_config`, when given, adds the model's position limit.
    Raises ConfigError for max_seq_len above the model's limit or eval labels unseen in training.
    """
    limit = max_positions(tokenizer, model_config, config.model_config_overrides)
    if limit is not None and config.max_seq_len > limit:
        raise ConfigError(f"max_seq_len {config.max_seq_len} exceeds the model's limit of {limit} tokens: "
                          f"set max_seq_len <= {limit}")
    needed = min_seq_len(config.task, tokenizer)
    if config.max_seq_len < needed:
        raise ConfigError(f"max_seq_len {config.max_seq_len} is below the {needed} tokens a {config.task} sample needs "
                          f"(the tokenizer adds {tokenizer.num_special_tokens_to_add(pair=False)} special tokens): "
                          f"set max_seq_len >= {needed}")
    text_column, label_column, max_len = config.text_column, config.label_column, config.max_seq_len
    label_info, to_id = LabelInfo(), None
    if config.task == "classification":
        label_info, to_id = _label_mapping(train_ds, eval_ds, label_column)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_len)
        out = {"input_ids": encoded["input_ids"]}
        if label_column in batch and config.task == "classification":
            out["labels"] = [to_id[v] for v in batch[label_column]] if to_id else [int(v) for v in batch[label_column]]
        return out

    def tokenize(ds, split: str):
        if ds is None:
            return None
        if config.packing and config.task == "clm":
            return pack(ds.map(lambda batch: {"input_ids": tokenizer(batch[text_column])["input_ids"]}, batched=True,
                               remove_columns=ds.column_names, load_from_cache_file=True, desc=f"tokenizing {split}"),
                        max_len, tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id,
                        split)
        ds = ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=True,
                    desc=f"tokenizing {split}")
        if config.task == "clm":
            # A row of one token has no next token to predict: it would add nothing but padding.
            ds = ds.filter(lambda batch: [len(ids) >= 2 for ids in batch["input_ids"]], batched=True,
                           load_from_cache_file=True, desc=f"dropping one-token rows of {split}")
            if len(ds) == 0:
                raise ConfigError(f"no {split} text has 2 or more tokens: clm needs longer lines")
        return ds

    return tokenize(train_ds, "train"), tokenize(eval_ds, "eval"), label_info


def pack(ds, block: int, separator: int | None, split: str = "train"):
    """Causal-LM packing (as transformers' run_clm example groups texts): the documents' tokens joined,
    `separator` (the tokenizer's EOS) between documents, cut into blocks of `block` tokens; the last
    block keeps what is left (at least 2 tokens). Attention then crosses document boundaries inside a
    block: what packing trades for having no padding. Raises ConfigError when nothing is left."""
    if separator is None:
        raise ConfigError("packing needs a tokenizer with an EOS (or SEP) token to put between documents")
    from datasets import Dataset

    stream: list[int] = []
    for ids in ds["input_ids"]:
        if ids:
            stream.extend([*ids, separator])
    blocks = [stream[start:start + block] for start in range(0, len(stream), block)]
    blocks = [ids for ids in blocks if len(ids) >= 2]
    if not blocks:
        raise ConfigError(f"packing left no {split} block of 2 or more tokens: the data is empty")
    return Dataset.from_dict({"input_ids": blocks})


# -- batches --------------------------------------------------------------------------------------


def make_collate(task: str, pad_token_id: int) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
    """The library's padding collate (accum.loss.pad_collate), kept under the name the scripts use."""
    return pad_collate(task, pad_token_id)


# -- metrics --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _accuracy_metric():
    import evaluate

    return evaluate.load(str(ACCURACY_METRIC))


def compute_eval_metrics(task: str, predictions, references, loss: float) -> dict[str, float]:
    """Eval metrics: {'loss', 'accuracy'} for classification (local `evaluate` module, no hub),
    {'loss', 'perplexity'} for clm, where loss is the mean per-token loss (perplexity = e^loss)."""
    metrics = {"loss": float(loss)}
    if task == "classification":
        result = _accuracy_metric().compute(predictions=[int(p) for p in predictions],
                                            references=[int(r) for r in references])
        metrics["accuracy"] = float(result["accuracy"])
    else:
        metrics["perplexity"] = math.exp(loss) if loss < 700 else float("inf")
    return metrics
