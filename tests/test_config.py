"""The run config has one source of truth (KNOBS), and bad values fail in one line naming the key."""

from __future__ import annotations

import tomllib

import pytest
from conftest import REPO

from shared.config import KNOBS, ConfigError, RunConfig, defaults, load_toml, validate


def _typed(values: dict) -> dict:
    return {k: (type(v).__name__, v) for k, v in values.items()}


def test_pyproject_defaults_equal_the_knob_table():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flower_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    # same keys, same values, same types (1e-05 must stay a float, 0 an int)
    assert _typed(flower_defaults) == _typed(defaults())
    assert list(flower_defaults) == [k.name for k in KNOBS]  # same order: easy to diff


def test_defaults_pass_their_own_checks():
    assert validate({}) == defaults()
    assert validate(defaults()) == defaults()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    values = load_toml(path)
    RunConfig.from_flat(values, str(path))
    assert set(values) == set(defaults())


@pytest.mark.parametrize(
    "override, key, says",
    [
        ({"num-round": 3}, "num-round", "unknown config key"),
        ({"target-epsilon": 0}, "target-epsilon", "must be > 0"),
        ({"target-epsilon": 0.0}, "target-epsilon", "must be > 0"),
        ({"target-epsilon": -1.0}, "target-epsilon", "must be > 0"),
        ({"target-epsilon": float("inf")}, "target-epsilon", "must be > 0"),
        ({"target-epsilon": "10"}, "target-epsilon", "expected float"),
        ({"num-rounds": "3"}, "num-rounds", "expected int"),
        ({"num-rounds": 2.5}, "num-rounds", "expected int"),
        ({"num-rounds": True}, "num-rounds", "expected int"),
        ({"augment-flip": 1}, "augment-flip", "expected bool"),
        ({"target-delta": 1.0}, "target-delta", "must be in (0, 1)"),
        ({"image-size": 48}, "image-size", "must be 28, 32 or 64"),
        ({"partition": "random"}, "partition", "must be iid or dirichlet"),
        ({"class-names": "a,a"}, "class-names", "distinct names"),
        ({"min-hospitals": 4, "num-hospitals": 3}, "min-hospitals", "exceeds num-hospitals"),
    ],
)
def test_bad_value_is_one_line_naming_the_source_and_key(override, key, says):
    with pytest.raises(ConfigError) as error:
        validate(override, "configs/x.toml")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("configs/x.toml: ")
    assert key in message and says in message


def test_unknown_key_suggests_the_close_ones():
    with pytest.raises(ConfigError, match=r"'target-epsilom' \(did you mean target-epsilon, target-delta\?\)"):
        validate({"target-epsilom": 1.0})


def test_int_is_accepted_for_a_float_knob_and_stored_as_float():
    values = validate({"target-epsilon": 3, "num-rounds": 4.0})
    assert values["target-epsilon"] == 3.0 and type(values["target-epsilon"]) is float
    assert values["num-rounds"] == 4 and type(values["num-rounds"]) is int


def test_config_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"^{missing}: config file not found$"):
        load_toml(missing)
    nested = tmp_path / "nested.toml"
    nested.write_text("[privacy]\ntarget-epsilon = 1.0\n")
    with pytest.raises(ConfigError, match=r"nested\.toml: tables are not allowed \(\[privacy\]\)"):
        load_toml(nested)
    broken = tmp_path / "broken.toml"
    broken.write_text("num-rounds = = 3\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_toml(broken)


def test_run_config_round_trips_through_the_flat_form():
    flat = validate({"class-names": "normal,pneumonia,covid", "target-epsilon": 2.5,
                     "augment-flip": True, "num-rounds": 7, "output-dir": "/x/y"})
    cfg = RunConfig.from_flat(flat)
    assert cfg.class_names == ("normal", "pneumonia", "covid") and cfg.num_classes == 3
    assert cfg.target_epsilon == 2.5 and cfg.augment_flip is True and cfg.num_rounds == 7
    assert _typed(cfg.to_flat()) == _typed(flat)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


def test_run_config_refuses_keys_it_does_not_know():
    with pytest.raises(ConfigError, match="run config: unknown config key 'num-supernodes'"):
        RunConfig.from_flat({**defaults(), "num-supernodes": 3})
