"""Make the embedded default data set (labelled tweets); the code is accum/cli/tweets.py.

    python scripts/make_tweets.py [--out-dir data/generated/tweets] [--n-train 2048] [--n-eval 1000]
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `accum` importable from the repo
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accum.cli.tweets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
