"""The config loader under random input: any YAML value of any type for any key gives a RunConfig or
a one-line ConfigError, never another exception (which would reach the user as a traceback)."""

from __future__ import annotations

import string

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accum.cli.config import ConfigError, RunConfig, load_yaml, make_config, parse_config

KEYS = sorted(RunConfig.model_fields)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["auto", "8GiB", "0.5", "-1", "1e400", "nan", "latest", ""]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                               max_size=3), max_leaves=6)
keys = st.sampled_from(KEYS) | st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=12)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one_line(exc: ConfigError) -> None:
    assert "\n" not in str(exc) and str(exc)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_make_config_raises_only_config_error(raw):
    try:
        make_config(dict(raw, model_config_overrides={"model_type": "gpt2"}) if "model" not in raw else raw)
    except ConfigError as exc:
        one_line(exc)


@FUZZ
@given(st.dictionaries(keys, values, max_size=6))
def test_yaml_file_round_trip_raises_only_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        make_config(load_yaml(path))
    except ConfigError as exc:
        one_line(exc)


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_file_contents_raise_only_config_error(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    try:
        make_config(load_yaml(path))
    except ConfigError as exc:
        one_line(exc)


@FUZZ
@given(st.sampled_from(KEYS), st.text(alphabet=string.printable, max_size=30))
@example(key="accumulation_schedule", text="\x0c")  # found in CI: yaml's ReaderError has no .problem
@example(key="gradient_checkpointing", text="-h")  # an optional-value flag then -h: argparse's help, exit 0
def test_any_flag_value_raises_only_config_error(key, text):
    try:
        parse_config(["--model", "x", "--" + key.replace("_", "-"), text])
    except ConfigError as exc:
        one_line(exc)
    except SystemExit as exc:  # argparse itself: usage and one error line, exit 2 (e.g. a value starting with -)
        # or, when the "value" is itself an option such as -h after a flag whose value is optional, help: exit 0
        assert exc.code == 2 or (exc.code == 0 and text.startswith("-")), (key, text, exc.code)


ACCELERATE_KEYS = ["compute_environment", "distributed_type", "mixed_precision", "use_cpu", "num_processes",
                   "num_machines", "machine_rank", "main_process_port", "gpu_ids", "fsdp_config", "deepspeed_config",
                   "downcast_bf16", "enable_cpu_affinity", "same_network", "rdzv_backend", "tpu_env"]
accelerate_values = values | st.sampled_from(["NO", "MULTI_GPU", "MULTI_CPU", "FSDP", "LOCAL_MACHINE",
                                              "AMAZON_SAGEMAKER", "fp16", "bf16", "no", "all"])


@FUZZ
@given(st.dictionaries(st.sampled_from(ACCELERATE_KEYS) | keys, accelerate_values, max_size=6))
@example(raw={"compute_environment": "AMAZON_SAGEMAKER", "distributed_type": "NO"})  # needs its own keys
def test_accelerate_config_check_raises_only_config_error(tmp_path_factory, raw):
    from accum.cli.launch import check_accelerate_config

    path = tmp_path_factory.mktemp("fuzz") / "accelerate.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    try:
        check_accelerate_config(path)
    except ConfigError as exc:
        one_line(exc)


@FUZZ
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=12),
       st.lists(st.sampled_from(["lr", "seed", "model", "max_steps"]), max_size=5))
def test_aliases_and_repeated_keys_raise_only_config_error_and_fast(tmp_path_factory, depth, width, keys):
    """A chain of anchors, each naming the one before `width` times, expands to width**depth values:
    refused as soon as that passes the limit, without building it; a key given twice is refused."""
    import time

    from accum.cli.config import MAX_YAML_NODES

    lines = ["a0: &a0 [1]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth + 1)]
    lines += [f"{key}: 1" for key in keys]
    path = tmp_path_factory.mktemp("fuzz") / "run.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    try:
        data = load_yaml(path)
    except ConfigError as exc:
        one_line(exc)
        assert len(set(keys)) < len(keys) or width ** depth > MAX_YAML_NODES // 4, (depth, width, keys, str(exc))
    else:
        assert len(set(keys)) == len(keys) and set(keys) <= set(data)
    assert time.perf_counter() - started < 5
