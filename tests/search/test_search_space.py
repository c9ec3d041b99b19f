"""Search spaces: every point decodes to a config that parses and plans; recipes, unit-cube
code, layer placement of decoded parameters, and errors for bad space files."""

from __future__ import annotations

import warnings

import optuna
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.distributions import FloatDistribution, IntDistribution

from evomerge.engine.config import parse_config
from evomerge.engine.merge import merge_state_dict
from evomerge.engine.plan import build_plan, open_models
from evomerge.errors import ConfigError
from evomerge.io import shipped
from evomerge.search import available_spaces, load_search_space
from evomerge.engine.config import model_labels
from tests.conftest import read_folder

optuna.logging.set_verbosity(optuna.logging.WARNING)

SHIPPED = ["ps_task_arithmetic", "ps_ties", "ps_dare_ties", "ps_della", "ps_breadcrumbs",
           "slerp", "stacking", "dfs"]
INLINE = {
    "ties_groups_negative": {"kind": "parameter", "method": "ties", "layer_granularity": 3,
                             "search": {"weight": [-1, 1], "density": [0, 1], "lambda": [0.5, 1.5]},
                             "fixed": {"int8_mask": True}},
    "della_linear_extremes": {"kind": "parameter", "method": "della_linear", "control_points": 2,
                              "filters": ["self_attn"], "fixed": {"weight": 0.5},
                              "search": {"density": [0.001, 1], "epsilon": [0, 1]}},
    "della_default_epsilon": {"kind": "parameter", "method": "della", "layer_granularity": 2,
                              "search": {"weight": [0, 1], "density": [0.01, 1]}},
    "breadcrumbs_ties_points": {"kind": "parameter", "method": "breadcrumbs_ties",
                                "control_points": 4, "filters": ["mlp", "o_proj"],
                                "search": {"weight": [0, 2], "density": [0, 1], "gamma": [0, 1]}},
    "linear_default": {"kind": "parameter", "method": "linear"},
    "multislerp_groups": {"kind": "parameter", "method": "multislerp", "layer_granularity": 3,
                          "filters": ["mlp"], "fixed": {"normalize_weights": True}},
    "nuslerp_points": {"kind": "parameter", "method": "nuslerp", "control_points": 3,
                       "search": {"weight": [0.05, 1]}, "fixed": {"nuslerp_flatten": False}},
    "sce_default": {"kind": "parameter", "method": "sce", "control_points": 2},
    "nearswap_default": {"kind": "parameter", "method": "nearswap", "filters": ["self_attn"]},
    "ramplus_tl_groups": {"kind": "parameter", "method": "ramplus_tl", "layer_granularity": 2,
                          "fixed": {"epsilon": 0.001}},
    "slerp_groups": {"kind": "slerp", "layer_granularity": 2, "filters": ["mlp"]},
    "stacking_range": {"kind": "stacking", "num_blocks": 5, "block_length": [1, 3],
                       "max_layers": 6, "include_base": True},
    "stacking_tiles": {"kind": "stacking", "num_blocks": 2, "block_length": 2},
    "dfs_bits": {"kind": "dfs", "repeats": 2, "max_layers": 5},
    "dfs_scaled_base": {"kind": "dfs", "repeats": 1, "scale": [0, 2], "include_base": True},
}
CASES = SHIPPED + list(INLINE)
SOURCES = {"nuslerp_points": 2, "nearswap_default": 1}  # the methods' model counts (else all three)


def make_space(case: str, family):
    base, *fine_tunes = (str(p) for p in family)
    spec = INLINE.get(case, case)
    kind = spec["kind"] if isinstance(spec, dict) else yaml.safe_load(
        (shipped.folder("search_spaces") / f"{case}.yaml").read_text())["kind"]
    models = fine_tunes[:1] if kind == "slerp" else fine_tunes[:SOURCES.get(case, len(fine_tunes))]
    return load_search_space(spec, models=models, base_model=base, num_layers=4)


def value_strategy(dist):
    if isinstance(dist, FloatDistribution):
        return st.one_of(st.sampled_from([dist.low, dist.high]), st.floats(dist.low, dist.high))
    if isinstance(dist, IntDistribution):
        return st.integers(dist.low, dist.high)
    return st.sampled_from(dist.choices)


def params_strategy(space):
    return st.fixed_dictionaries({name: value_strategy(d)
                                  for name, d in space.distributions().items()})


def assert_valid(space, config):
    """Round-trips through YAML, plans on the real models, and (when claimed) parses in mergekit."""
    reparsed = parse_config(config.to_yaml())
    assert reparsed.model_dump() == config.model_dump()
    build_plan(reparsed, open_models(reparsed))
    if space.mergekit_compatible:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mergekit's own import-time deprecation warnings
            from mergekit.config import MergeConfiguration
            MergeConfiguration.model_validate(yaml.safe_load(config.to_yaml()))


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_point_decodes_to_a_valid_config(case, data, llama):
    space = make_space(case, llama)
    params = data.draw(params_strategy(space))
    config = space.decode(params)
    assert_valid(space, config)
    assert space.decode(dict(params)) == config  # deterministic
    text = yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False)
    assert config.to_yaml() == text  # libyaml or not: the same plan text, so the same plan hash
    back = space.from_unit(space.to_unit(params))
    assert back.keys() == params.keys()
    for name, value in params.items():
        assert back[name] == pytest.approx(value, abs=1e-12)
    vector = data.draw(st.lists(st.floats(-0.5, 1.5), min_size=len(params), max_size=len(params)))
    space.decode(space.from_unit(vector))  # CMA samples outside the box are clipped into it


@pytest.mark.parametrize("case", CASES)
def test_known_recipes_lie_inside_and_decode(case, llama):
    space = make_space(case, llama)
    recipes = space.known_recipes()
    assert recipes or case in ("stacking", "stacking_range")  # 8 or 5 blocks cannot tile 4 layers
    assert len({yaml.safe_dump(r) for r in recipes}) == len(recipes)
    study = optuna.create_study()
    for recipe in recipes:
        assert list(recipe) == list(space.distributions())
        study.enqueue_trial(recipe)
        trial = study.ask(space.distributions())
        assert trial.params == recipe
        assert_valid(space, space.decode(trial.params))


def test_names_are_stable_and_readable(llama):
    space = make_space("ps_ties", llama)
    names = list(space.distributions())
    assert names[:3] == ["ft1.weight.g0.self_attn", "ft1.weight.g0.mlp", "ft1.weight.g0.rest"]
    assert names == list(make_space("ps_ties", llama).distributions())
    assert list(make_space("stacking_range", llama).distributions())[:3] == [
        "b0.model", "b0.start", "b0.length"]
    assert list(make_space("dfs_scaled_base", llama).distributions())[:2] == [
        "r0.base.0.on", "r0.base.0.scale"]
    assert model_labels(["a/x", "b/x"]) == ["m0", "m1"]
    assert model_labels(["runs/my model/"]) == ["my_model"]


def test_decode_rejects_missing_or_out_of_range_params(llama):
    space = make_space("ps_task_arithmetic", llama)
    params = space.known_recipes()[0]
    with pytest.raises(ValueError, match="missing parameter 'ft1.weight.c0'"):
        space.decode({k: v for k, v in params.items() if k != "ft1.weight.c0"})
    with pytest.raises(ValueError, match="'ft2.weight.c1'"):
        space.decode({**params, "ft2.weight.c1": 9.0})


# ------------------------------------------------------------------ recipes, by content


def test_uniform_task_arithmetic_matches_hand_written_config(llama):
    base, *fts = (str(p) for p in llama)
    space = make_space("ps_task_arithmetic", llama)
    uniform = space.known_recipes()[0]
    assert set(uniform.values()) == {1 / 3}
    hand = parse_config(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": "float32",
        "models": [{"model": ft, "parameters": {"weight": 1 / 3}} for ft in fts]}))
    merged, expected = merge_state_dict(space.decode(uniform)), merge_state_dict(hand)
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name])


def test_ties_recipes_uniform_default_sum_each_source_alone_and_left_out(llama):
    base, *fts = (str(p) for p in llama)
    recipes = make_space("ps_ties", llama).known_recipes()
    densities = [{v for k, v in r.items() if ".density." in k} for r in recipes]
    weights = [[r[f"ft{i}.weight.g0.mlp"] for i in (1, 2, 3)] for r in recipes]
    assert densities == [{1.0}, {0.5}] + [{1.0}] * 7
    assert weights == [[1 / 3] * 3, [1 / 3] * 3, [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                       [0, 1, 1], [1, 0, 1], [1, 1, 0]]
    space = make_space("ps_task_arithmetic", llama)
    for recipe, ft in zip(space.known_recipes()[2:], fts):  # weight 1 for one model, 0 others
        merged, source = merge_state_dict(space.decode(recipe)), read_folder(ft)
        for name in source:
            torch.testing.assert_close(merged[name], source[name])


def test_slerp_recipes_are_midpoint_and_endpoints(llama):
    base, ft1 = (str(p) for p in llama[:2])
    space = make_space("slerp", llama)
    recipes = space.known_recipes()
    assert [set(r.values()) for r in recipes] == [{0.5}, {0.0}, {1.0}]
    for recipe, model in zip(recipes[1:], (base, ft1)):
        merged, source = merge_state_dict(space.decode(recipe)), read_folder(model)
        for name in source:
            torch.testing.assert_close(merged[name], source[name])


# ------------------------------------------------------------------ parameter placement


def test_layer_groups_place_parameters_at_their_layers(llama):
    base, *fts = (str(p) for p in llama)
    space = load_search_space(
        {"kind": "parameter", "method": "ties", "layer_granularity": 3,
         "filters": ["self_attn", "mlp"], "search": {"weight": [0, 1], "density": [0, 1]}},
        models=fts, base_model=base, num_layers=4)
    params = {name: (i + 1) / 100 for i, name in enumerate(space.distributions())}
    config = space.decode(params)
    assert [s.sources[0].layer_range for s in config.slices] == [(0, 3), (3, 4)]
    plan = build_plan(config, open_models(config))
    seen = set()
    for op in plan.ops:
        group = 0 if op.layer is None and "embed" in op.name else (
            len(config.slices) - 1 if op.layer is None else op.layer // 3)
        fset = next((f for f in ("self_attn", "mlp") if f in op.name), "rest")
        assert op.inputs[op.base_index][0] == base
        for i, label in enumerate(("ft1", "ft2", "ft3")):
            for param in ("weight", "density"):
                assert op.per_input[i][param] == params[f"{label}.{param}.g{group}.{fset}"]
        seen.add((group, fset))
    assert seen == {(g, f) for g in (0, 1) for f in ("self_attn", "mlp", "rest")}


def test_layer_groups_equal_hand_written_mergekit_yaml(llama):
    base, ft1, ft2, _ = (str(p) for p in llama)
    space = load_search_space(
        {"kind": "parameter", "method": "task_arithmetic", "layer_granularity": 2,
         "search": {"weight": [-1, 1]}, "fixed": {"lambda": 0.9}, "dtype": "float32"},
        models=[ft1, ft2], base_model=base, num_layers=4)
    params = {"ft1.weight.g0": 0.25, "ft2.weight.g0": -0.5, "ft1.weight.g1": 1.0,
              "ft2.weight.g1": 0.0}
    hand = f"""
merge_method: task_arithmetic
base_model: {base}
slices:
  - sources:
      - {{model: {ft1}, layer_range: [0, 2], parameters: {{weight: 0.25}}}}
      - {{model: {ft2}, layer_range: [0, 2], parameters: {{weight: -0.5}}}}
      - {{model: {base}, layer_range: [0, 2]}}
  - sources:
      - {{model: {ft1}, layer_range: [2, 4], parameters: {{weight: 1.0}}}}
      - {{model: {ft2}, layer_range: [2, 4], parameters: {{weight: 0.0}}}}
      - {{model: {base}, layer_range: [2, 4]}}
parameters: {{lambda: 0.9}}
dtype: float32
"""
    merged, expected = merge_state_dict(space.decode(params)), merge_state_dict(parse_config(hand))
    assert merged.keys() == expected.keys()
    for name in expected:
        assert torch.equal(merged[name], expected[name]), name


def test_control_points_interpolate_over_depth(llama):
    base, *fts = (str(p) for p in llama)
    space = load_search_space({"kind": "parameter", "method": "task_arithmetic",
                               "control_points": 3, "search": {"weight": [0, 1]}},
                              models=fts, base_model=base, num_layers=4)
    params = {name: (i + 1) / 10 for i, name in enumerate(space.distributions())}
    plan = build_plan(space.decode(params), open_models(space.decode(params)))
    for op in (op for op in plan.ops if op.layer is not None):
        x = op.layer / 3 * 2  # depth t = layer / (L - 1), scaled to the 3 control points
        lo = int(x)
        hi = min(lo + 1, 2)
        for i, label in enumerate(("ft1", "ft2", "ft3")):
            expected = ((1 - (x - lo)) * params[f"{label}.weight.c{lo}"]
                        + (x - lo) * params[f"{label}.weight.c{hi}"])
            assert op.per_input[i]["weight"] == pytest.approx(expected)


def test_della_epsilon_is_clipped_per_model_and_position(llama):
    space = make_space("della_linear_extremes", llama)
    params = {name: (1.0 if ".epsilon." in name else 0.001 if name.endswith("c0.rest") else 0.6)
              for name in space.distributions()}
    config = space.decode(params)
    epsilon = config.models[0].parameters["epsilon"]
    assert epsilon[0].value == [pytest.approx(0.399), pytest.approx(0.399)]
    assert epsilon[1].value == [0.0, pytest.approx(0.399)]
    assert "epsilon" not in (config.parameters or {})
    assert_valid(space, config)


# ------------------------------------------------------------------ stacking and DFS


def test_stacking_clips_starts_and_truncates_depth(llama):
    base, *fts = (str(p) for p in llama)
    space = make_space("stacking_range", llama)  # sources: base, ft1, ft2, ft3
    params = {}
    for i, (model, start, length) in enumerate(
            [("ft2", 3, 3), ("base", 0, 1), ("ft1", 1, 3), ("ft3", 0, 1), ("ft1", 0, 2)]):
        params |= {f"b{i}.model": model, f"b{i}.start": start, f"b{i}.length": length}
    config = space.decode(params)
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in config.slices] == [
        (fts[1], (1, 4)), (base, (0, 1)), (fts[0], (1, 3))]  # start clipped; cut at 6 layers
    assert space.mergekit_compatible


def test_stacking_source_alone_recipe_reproduces_the_source(llama):
    space = make_space("stacking_tiles", llama)
    recipes = space.known_recipes()
    assert [r["b0.model"] for r in recipes] == ["ft1", "ft2", "ft3"]
    merged, source = merge_state_dict(space.decode(recipes[1])), read_folder(llama[2])
    assert merged.keys() == source.keys()
    assert all(torch.equal(merged[name], source[name]) for name in source)


def test_dfs_decodes_included_slots_with_scales(llama):
    base, ft1, ft2, ft3 = (str(p) for p in llama)
    space = make_space("dfs", llama)
    assert len(space.distributions()) == 2 * 3 * 4 * 3  # (bit, scale) × models × layers × repeats
    assert not space.mergekit_compatible
    params = {name: (0 if name.endswith(".on") else 1.0) for name in space.distributions()}
    params |= {"r0.ft2.3.on": 1, "r0.ft2.3.scale": 0.75, "r2.ft1.0.on": 1}
    config = space.decode(params)
    assert config.merge_method == "passthrough"
    assert [s.sources[0].model_dump(exclude_none=True) for s in config.slices] == [
        {"model": ft2, "layer_range": (3, 4), "input_scale": 0.75},
        {"model": ft1, "layer_range": (0, 1)}]
    assert_valid(space, config)
    assert build_plan(config, open_models(config)).input_scales == [0.75, 1.0]


def test_dfs_guards_and_compatibility(llama):
    base, ft1, *_ = (str(p) for p in llama)
    space = make_space("dfs_bits", llama)  # no scales, max_layers 5
    assert space.mergekit_compatible
    none = space.decode({name: 0 for name in space.distributions()})
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in none.slices] == [(ft1, (0, 1))]
    every = space.decode({name: 1 for name in space.distributions()})
    assert len(every.slices) == 5
    merged = merge_state_dict(space.decode(space.known_recipes()[0]))
    source = read_folder(llama[1])
    assert all(torch.equal(merged[name], source[name]) for name in source)


# ------------------------------------------------------------------ loading and errors


def test_shipped_spaces_are_listed_and_load_by_name_or_path(llama, tmp_path):
    assert available_spaces() == sorted(SHIPPED)
    base, *fts = (str(p) for p in llama)
    by_name = load_search_space("ps_ties", models=fts, base_model=base)  # depth from config.json
    (tmp_path / "mine.yaml").write_text((shipped.folder("search_spaces") / "ps_ties.yaml").read_text())
    by_path = load_search_space("mine.yaml", models=fts, base_model=base, base_dir=tmp_path)
    assert by_name.distributions() == by_path.distributions()
    assert (by_name.name, by_path.name) == ("ps_ties", "mine")


BAD = [
    ("kind: nope\n", 1, "kind", "expected one of: parameter, slerp, stacking, dfs"),
    ("kind: parameter\nmethod: ties\nweights: [0, 1]\n", 3, "weights", "unknown field"),
    ("kind: parameter\nmethod: model_stock\n", 2, "method", "expected one of"),
    ("kind: parameter\nmethod: ties\nsearch:\n  weight: [1, 0]\n", 4, "search.weight",
     "low < high"),
    ("kind: parameter\nmethod: ties\nsearch:\n  density: [0.1, 1.5]\n", 4, "search.density",
     "low < high within [0.0, 1.0], got [0.1, 1.5]"),
    ("kind: parameter\nmethod: ties\nsearch:\n  foo: [0, 1]\n", 4, "search.foo",
     "not a numeric parameter"),
    ("kind: parameter\nmethod: ties\nsearch:\n  weight: [0, x]\n", 4, "search.weight[1]",
     "valid number"),
    ("kind: parameter\nmethod: ties\nlayer_granularity: 2\ncontrol_points: 3\n", 4,
     "control_points", "not both"),
    ("kind: parameter\nmethod: ties\nfixed: {foo: 1}\n", 3, "fixed.foo", "expected a parameter"),
    ("kind: parameter\nmethod: ties\nsearch:\n  density: [0.1, 1]\n", 4, "search",
     "ties needs 'weight': search it (search: {weight: [low, high]}) or fix it (fixed: {weight: value})"),
    ("kind: parameter\nmethod: ties\nfixed: {normalize: maybe}\n", 3, "fixed.normalize",
     "true/false"),
    ("kind: parameter\nmethod: della\nsearch: {weight: [0, 1], density: [0, 1]}\n", 3, "search.density",
     "density > 0"),
    ("kind: slerp\n", 1, None, "slerp takes exactly 2 models"),
    ("kind: parameter\nmethod: nuslerp\n", 1, None, "nuslerp takes exactly 2 models besides the base, got 3"),
    ("kind: parameter\nmethod: sce\nsearch:\n  select_topk: [0.5, 1.5]\n", 4, "search.select_topk",
     "within [0.0, 1.0]"),
    ("kind: stacking\nnum_blocks: 0\n", 2, "num_blocks", "greater than 0"),
    ("kind: stacking\nnum_blocks: 2\nblock_length: [3, 2]\n", 3, "block_length", "min <= max"),
    ("kind: dfs\nscale: [2, 1]\n", 2, "scale", "low < high"),
    ("kind: dfs\nrepeats: [1\n", 3, None, "malformed YAML"),
]


@pytest.mark.parametrize("text, line, field, message", BAD)
def test_bad_space_files_name_file_line_and_field(text, line, field, message, llama, tmp_path):
    base, *fts = (str(p) for p in llama)
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_search_space(str(path), models=fts, base_model=base, num_layers=4)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"{path}:{line}: " + (f"{field}: " if field else "")), text
    assert message in text


def test_unknown_space_name(llama):
    with pytest.raises(ConfigError, match="unknown search space 'nope'; expected a YAML file or "
                                          "one of: dfs, ps_breadcrumbs"):
        load_search_space("nope", models=[str(llama[1])], num_layers=4)
