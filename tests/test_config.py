"""Recipe schema: shipped recipes validate; every bad recipe fails with file, line, dotted key and a hint."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from lmloop.config import (
    AlertsConfig,
    DataConfig,
    DemoConfig,
    DriftConfig,
    LoopConfig,
    LoopGatesConfig,
    LoopTriggersConfig,
    ModelConfig,
    PretrainConfig,
    Recipe,
    SftConfig,
    TrackingConfig,
    TrainConfig,
    describe_schema,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from lmloop.errors import ConfigError, LmloopError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.fixture
def recipe_file(tmp_path):
    def _write(text: str, name: str = "recipe.yaml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p

    return _write


def test_there_are_shipped_recipes():
    names = {p.name for p in SHIPPED}
    assert {"quick.yaml", "sentiment.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipe_validates(path):
    import yaml

    recipe = load_recipe(path)
    raw = yaml.safe_load(path.read_text())
    assert isinstance(recipe, Recipe)
    assert recipe.name == raw["name"]
    # every value written in the file ends up in the typed recipe (floats may be written as ints)
    as_dict = recipe_to_dict(recipe)

    def check(typed, written, key: str) -> None:  # nested sections (loop.gates.bias) are checked key by key
        if isinstance(written, dict):
            for k, v in written.items():
                check(typed[k], v, f"{key}.{k}")
        else:
            assert typed == written, f"{path.name}: {key}"

    for section, values in raw.items():
        check(as_dict[section], values, section)


def test_sentiment_recipe_values():
    r = load_recipe(REPO / "recipes" / "sentiment.yaml")
    assert r.data.path == "vader-sentiment"
    assert r.model.base == "minilm-l6" and r.model.max_length == 128
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)
    assert r.train.lr == pytest.approx(5e-5)
    assert r.train.patience == 3 and r.train.metric == "accuracy" and r.train.precision == "auto"
    assert r.tracking.experiment == "sentiment" and r.tracking.uri is None


def test_unknown_key_names_file_line_dotted_key_and_hint(recipe_file):
    p = recipe_file("name: x\ntrain:\n  epochs: 2\n  batch_sise: 4\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "line 4" in msg
    assert "'train.batch_sise'" in msg
    assert "did you mean 'batch_size'?" in msg
    assert "expected one of: epochs, batch_size, lr" in msg


def test_unknown_top_level_key(recipe_file):
    p = recipe_file("name: x\ntrian:\n  epochs: 2\n")
    with pytest.raises(
        ConfigError, match=r"line 2, column 1: unknown key 'trian' \(did you mean 'train'\?\)"
    ):
        load_recipe(p)


def test_unknown_key_without_close_match_has_no_hint(recipe_file):
    p = recipe_file("model:\n  zzzzzz: 1\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    assert "unknown key 'model.zzzzzz'" in str(ei.value)
    assert "did you mean" not in str(ei.value)


def test_config_error_is_an_lmloop_error_with_exit_code_2():
    assert issubclass(ConfigError, LmloopError)
    assert ConfigError("x").exit_code == 2


def test_wrong_type_names_key_expected_type_and_line(recipe_file):
    p = recipe_file("name: x\ntrain:\n  batch_size: 8\n  epochs: three\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}, line 4, column 11: ")
    assert "'train.epochs' must be float, got str 'three'" in msg


@pytest.mark.parametrize(
    ("yaml_line", "expected"),
    [
        ("  batch_size: 2.5", "'train.batch_size' must be int, got float 2.5"),
        ("  fast_path: 'yes'", "'train.fast_path' must be bool, got str 'yes'"),
        ("  precision: fp16", "'train.precision' must be one of 'auto', 'fp32', 'bf16', got 'fp16'"),
        ("  max_steps: many", "'train.max_steps' must be int or null, got 'many'"),
        ("  batch_size: true", "'train.batch_size' must be int, got bool True"),
    ],
)
def test_wrong_types(recipe_file, yaml_line, expected):
    p = recipe_file(f"train:\n{yaml_line}\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    assert "line 2" in str(ei.value)
    assert expected in str(ei.value)


def test_section_that_is_not_a_mapping(recipe_file):
    p = recipe_file("train: 3\n")
    with pytest.raises(ConfigError, match=r"line 1, column 8: 'train' must be a mapping, got 3"):
        load_recipe(p)


def test_recipe_that_is_a_list(recipe_file):
    p = recipe_file("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"'recipe' must be a mapping"):
        load_recipe(p)


def test_out_of_range_lr(recipe_file):
    p = recipe_file("name: x\ntrain:\n  epochs: 1\n  batch_size: 4\n  lr: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert "lr must be in (0, 1)" in msg


def test_out_of_range_error_points_at_the_offending_key(recipe_file):
    p = recipe_file("name: x\ntrain:\n  epochs: 1\n  batch_size: 4\n  lr: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    assert "line 5" in str(ei.value)
    assert "train.lr" in str(ei.value)


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("train", "epochs: 0", "epochs must be a finite number > 0"),
        ("train", "batch_size: 0", "batch_size must be >= 1"),
        ("train", "warmup_ratio: 1.0", "warmup_ratio must be in [0, 1)"),
        ("train", "evals_per_epoch: -1", "evals_per_epoch must be >= 0"),
        ("train", "lr: .nan", "lr must be in (0, 1)"),
        ("data", "val_frac: 0.5", "val_frac must be in [0, 0.5)"),
        ("data", "limit: 1", "limit must be >= 2"),
        ("data", "path: null", "path is null and no train file is given: give data.path or data.train"),
        ("model", "max_length: 4", "max_length must be in [8, 8192]"),
    ],
)
def test_out_of_range_values(recipe_file, section, line, expected):
    p = recipe_file(f"{section}:\n  {line}\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    key = line.split(":")[0]
    assert "line 2, column" in str(ei.value)  # points at the offending value, not the section
    assert f"'{section}.{key}': {expected}" in str(ei.value)


def test_infinite_epochs_rejected(recipe_file):
    with pytest.raises(ConfigError, match="epochs"):
        load_recipe(recipe_file("train:\n  epochs: .inf\n"))


def test_exponent_string_accepted_as_float(recipe_file):
    # YAML 1.1 (PyYAML) reads 5e-5 (no dot) as a *string*: the schema must still take it as a float
    import yaml

    assert yaml.safe_load("lr: 5e-5")["lr"] == "5e-5"
    r = load_recipe(recipe_file("train:\n  lr: 5e-5\n  weight_decay: 1e-2\n"))
    assert r.train.lr == 5e-5 and isinstance(r.train.lr, float)
    assert r.train.weight_decay == 0.01


def test_int_accepted_where_float_expected(recipe_file):
    r = load_recipe(recipe_file("train:\n  epochs: 2\n"))
    assert r.train.epochs == 2.0 and isinstance(r.train.epochs, float)


def test_invalid_yaml_names_line(recipe_file):
    p = recipe_file("name: x\ntrain:\n  lr: 0.1\n   bad: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}, line 4, column 7: not valid YAML")
    assert "mapping values are not allowed here" in msg


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match=r"recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_recipe_gives_defaults(recipe_file):
    r = load_recipe(recipe_file(""))
    assert r == Recipe()
    assert r.train.batch_size == 32 and r.data.path == "vader-sentiment" and r.tracking.enabled is True


def test_recipe_from_dict():
    r = recipe_from_dict(
        {
            "name": "n",
            "out": "o",
            "data": {"path": "x.csv", "limit": 10},
            "train": {"epochs": 1, "lr": "3e-4"},
        }
    )
    assert r.name == "n" and r.out == "o"
    assert r.data.path == "x.csv" and r.data.limit == 10
    assert r.train.epochs == 1.0 and r.train.lr == pytest.approx(3e-4)
    assert r.model == ModelConfig() and r.tracking == TrackingConfig()
    assert isinstance(r.data, DataConfig) and isinstance(r.train, TrainConfig)


def test_recipe_from_dict_errors_name_the_source_without_a_line():
    with pytest.raises(ConfigError) as ei:
        recipe_from_dict({"train": {"epochs": 0}}, source="command line")
    assert str(ei.value) == "command line: 'train.epochs': epochs must be a finite number > 0"
    with pytest.raises(ConfigError, match=r"^<recipe>: unknown key 'trian' \(did you mean 'train'\?\)"):
        recipe_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match=r"'model.max_length' must be int, got str 'long'"):
        recipe_from_dict({"model": {"max_length": "long"}})


def test_recipe_roundtrips_through_dict():
    r = recipe_from_dict(
        {"name": "a", "train": {"epochs": 0.5, "max_steps": 7}, "data": {"domain_column": "d"}}
    )
    assert recipe_from_dict(recipe_to_dict(r)) == r


def test_describe_schema_lists_every_key_with_help():
    rows = describe_schema()
    keys = [k for k, _, _, _ in rows]
    expected = []
    for f in dataclasses.fields(Recipe):
        sub = {
            "data": DataConfig,
            "model": ModelConfig,
            "train": TrainConfig,
            "pretrain": PretrainConfig,
            "tracking": TrackingConfig,
            "loop": LoopConfig,
            "drift": DriftConfig,
            "demo": DemoConfig,
            "alerts": AlertsConfig,
            "sft": SftConfig,
        }.get(f.name)
        if sub is None:
            expected.append(f.name)
            continue
        for g in dataclasses.fields(sub):
            nested = {"triggers": LoopTriggersConfig, "gates": LoopGatesConfig}.get(g.name)
            if sub is LoopConfig and nested is not None:  # loop.triggers.* and loop.gates.*
                for h in dataclasses.fields(nested):
                    leaf = typing.get_type_hints(nested)[h.name]
                    if dataclasses.is_dataclass(leaf):  # loop.gates.bias.*, loop.gates.calibration.*, ...
                        expected += [f"loop.{g.name}.{h.name}.{i.name}" for i in dataclasses.fields(leaf)]
                    else:
                        expected.append(f"loop.{g.name}.{h.name}")
            else:
                expected.append(f"{f.name}.{g.name}")
    assert keys == expected
    assert len(keys) == len(set(keys))
    for key, tp, _default, doc in rows:
        assert tp, key
        assert doc.strip(), f"{key} has no help text"
    by_key = {k: (tp, default) for k, tp, default, _ in rows}
    assert by_key["train.lr"] == ("float", "5e-05")
    assert by_key["train.precision"][0] == "one of 'auto', 'fp32', 'bf16'"
    assert by_key["train.max_steps"] == ("int or null", "None")
    assert by_key["name"] == ("str", "'run'")


def test_load_recipe_overrides(recipe_file):
    p = recipe_file("name: x\nout: runs/x\ntrain:\n  epochs: 3\n  lr: 1.0e-4\n")
    r = load_recipe(p, {"train.epochs": 1, "data.limit": 50, "out": "elsewhere", "model.max_length": 32})
    assert r.train.epochs == 1.0
    assert r.train.lr == pytest.approx(1e-4)  # untouched keys keep the file's value
    assert r.data.limit == 50 and r.out == "elsewhere" and r.model.max_length == 32
    assert r.name == "x"


def test_override_with_unknown_key_is_rejected(recipe_file):
    p = recipe_file("name: x\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"):
        load_recipe(p, {"train.epoch": 1})


def test_override_of_an_empty_file(recipe_file):
    r = load_recipe(recipe_file(""), {"train.epochs": 1})
    assert r.train.epochs == 1.0


def test_override_into_an_empty_section(recipe_file):
    r = load_recipe(recipe_file("name: x\ntrain:\n"), {"train.epochs": 1})
    assert r.train.epochs == 1.0


def test_bad_override_is_not_blamed_on_the_file(recipe_file):
    p = recipe_file("name: x\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_recipe(p, {"train.epochs": "three"})
    assert "'train.epochs' must be float" in str(ei.value)
    assert "line 3" not in str(ei.value)
