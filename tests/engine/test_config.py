"""Config semantics: gradients, filters, precedence (mergekit's rules) and error locations."""

from __future__ import annotations

import pytest

from evomerge.engine.config import ConditionalParameter, evaluate_setting, parse_config, resolve
from evomerge.errors import ConfigError
from evomerge.methods import get_method

WEIGHT = get_method("ties").param("weight")
NORMALIZE = get_method("ties").param("normalize")


@pytest.mark.parametrize("t,expected", [(0.0, 0.0), (0.125, 0.25), (0.25, 0.5),
                                        (1 / 3, 0.5 + (0.3 - 0.5) / 3), (1.0, 1.0)])
def test_gradient_is_piecewise_linear_over_depth(t, expected):
    assert evaluate_setting([0, 0.5, 0.3, 0.7, 1], "x", t, WEIGHT) == pytest.approx(expected)


def test_boolean_gradient_picks_a_step():
    assert evaluate_setting([True, False], "x", 0.4, NORMALIZE) is True
    assert evaluate_setting([True, False], "x", 1.0, NORMALIZE) is False


def test_filters_first_substring_match_wins():
    setting = [ConditionalParameter(filter="self_attn", value=0.1),
               ConditionalParameter(filter="attn", value=0.2),
               ConditionalParameter(value=0.3)]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0, WEIGHT) == 0.1
    assert evaluate_setting(setting, "h.0.attn.c_attn.weight", 0, WEIGHT) == 0.2
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0, WEIGHT) == 0.3


def test_precedence_most_specific_scope_with_a_match_wins():
    source = {"weight": [ConditionalParameter(filter="mlp", value=0.9)]}
    slice_ = {"weight": 0.5}
    top = {"weight": 0.1}
    assert resolve(WEIGHT, [source, slice_, top], "layers.0.mlp.up_proj", 0) == 0.9
    # the source's filter does not match → falls through to the slice
    assert resolve(WEIGHT, [source, slice_, top], "layers.0.self_attn.q_proj", 0) == 0.5
    assert resolve(WEIGHT, [None, None, top], "x", 0) == 0.1
    assert resolve(get_method("ties").param("density"), [None, None], "x", 0) == 1.0  # default
    with pytest.raises(ConfigError, match="missing required parameter 'weight'"):
        resolve(WEIGHT, [None, {}], "x", 0)


@pytest.mark.parametrize("text,field,line", [
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      density: 1.5\n",
     "models[0].parameters.density", 6),
    ("merge_method: slerp\nbase_model: a\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 2]\n"
     "      - model: b\n        layer_range: [0, 2]\nparameters:\n  t: [0, -0.1]\n", "parameters.t", 10),
    ("merge_method: tie\nmodels:\n  - model: a\n", "merge_method", 1),
    ("merge_method: ties\nbase_modle: a\nmodels:\n  - model: a\n", "base_modle", 2),
    ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n      t: 0.5\n",
     "models[0].parameters.t", 6),
])
def test_errors_name_the_field_and_yaml_line(text, field, line):
    with pytest.raises(ConfigError) as error:
        parse_config(text, "cfg.yaml")
    message = str(error.value)
    assert message.startswith(f"cfg.yaml:{line}: {field}: "), message
    assert "\n" not in message


def test_round_trip_yaml_is_equivalent():
    text = ("merge_method: ties\nbase_model: a\nmodels:\n  - model: b\n    parameters:\n"
            "      weight: [{filter: mlp, value: [0.1, 0.9]}, {value: 1}]\n      density: 0.5\n")
    config = parse_config(text)
    assert parse_config(config.to_yaml()) == config
