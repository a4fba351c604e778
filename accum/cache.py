"""The plan cache: one JSON file of plans, keyed by what decides how much memory a step takes.

A hit costs zero probes. Writes are atomic (a temporary file, then os.replace), so a killed
process never leaves half a file; a corrupt file is reported in one line and ignored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from accum.files import read_bounded, remove_stale_temporaries, write_text_atomic

logger = logging.getLogger(__name__)
# A plan entry is about 2 KiB with its probes: tens of thousands of plans fit. A larger file is not a
# cache this code wrote (or a FIFO, or /dev/zero), and is not read whole into memory.
MAX_CACHE_BYTES = 64 << 20


def default_cache_path() -> Path:
    """$ACCUM_CACHE_DIR/plans.json, else ~/.cache/accum/plans.json."""
    root = os.environ.get("ACCUM_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "accum"
    return base / "plans.json"


class PlanCache:
    """Plans stored as {key: plan dict} in one JSON file at `path` (default: `default_cache_path()`)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_cache_path()

    @staticmethod
    def key_for(fields: dict[str, Any]) -> str:
        """The one cache key of accum: every input a probed plan depends on (`fields`, as
        `accum.probe.plan_cache_fields` collects them), hashed whole, behind a readable prefix
        (model, device, processes). Two runs share a plan only when every field is equal."""
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
        prefix = [str(fields.get(name, "-")) for name in ("model", "device", "processes")]
        return "|".join([*prefix, digest])

    def _load(self) -> dict[str, Any]:
        try:
            text = read_bounded(self.path, MAX_CACHE_BYTES).decode()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("plan cache %s unreadable (%s): ignored, it will be rewritten", self.path, exc)
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            logger.warning("plan cache %s is corrupt (%s): ignored, it will be rewritten", self.path, exc)
            return {}
        if not isinstance(data, dict):
            logger.warning("plan cache %s holds %s, not a mapping: ignored", self.path, type(data).__name__)
            return {}
        return data

    def get(self, key: str) -> dict[str, Any] | None:
        """The plan dict stored under `key`, or None (missing, unreadable or corrupt file)."""
        value = self._load().get(key)
        return value if isinstance(value, dict) else None

    def put(self, key: str, plan_dict: dict[str, Any]) -> None:
        """Store `plan_dict` under `key`, atomically, keeping the file's mode; temporaries of killed
        writers are cleaned up. An unwritable cache is logged, never raised."""
        data = self._load()
        data[key] = plan_dict
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.path.parent, self.path.name)
            write_text_atomic(self.path, json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:
            logger.warning("plan cache %s not written (%s): the plan is used but not cached", self.path, exc)
