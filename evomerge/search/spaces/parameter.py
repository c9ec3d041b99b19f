"""Parameter-space (PS) search: per-model merge weights over depth, and SLERP's ``t``.

One implementation serves every method with per-model ``weight`` (``linear``, the
task-arithmetic family: ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``,
``breadcrumbs(_ties)``, ``della(_linear)``, and ``nuslerp``, ``multislerp``), ``slerp``
(``kind: slerp``) and ``nearswap`` (``t``), and the methods with other continuous
parameters: ``sce`` (``select_topk``), ``ramplus_tl`` (``r``, ``alpha``); without
``search``, each searches its own (:data:`DEFAULT_SEARCH`). Each searched
float parameter gets one value per *position* × *filter set* × *owner*:

* positions: ``layer_granularity: k`` cuts the depth into output slices of ``k`` layers
  (the last one shorter when ``k`` does not divide it; ``k`` above the depth means one
  slice), each with its own values, as mergekit-evolve's genome; otherwise
  ``control_points: c`` values per parameter become a mergekit gradient list over depth
  (``c = 1``, the default: one scalar);
* filter sets: ``filters: [self_attn, mlp]`` gives each filter its own value plus one for
  every other tensor (``rest``), emitted as ``{filter, value}`` lists;
* owners: each non-base model for per-model parameters (``weight``, ``density``,
  ``epsilon``, ``gamma``), none for shared ones (``lambda``, ``t``).

Parameter names join the owner's label, the parameter, the position and the filter set
with dots: ``ft1.weight``, ``ft1.density.g2``, ``ft1.weight.c0.self_attn``, ``t.c3.rest``.
Bounds come from ``search`` (negative weights when the bounds allow them, as
mergekit-evolve's ``allow_negative_weights``); ``fixed`` scalars (``normalize``,
``int8_mask``, ``lambda``, ...) go to the top-level ``parameters`` unchanged.

DELLA keeps ``density ± epsilon`` inside (0, 1): ``epsilon`` (searched, fixed or the
default) is emitted per model and position, clipped to ``min(density, 1 - density) -
0.001`` (at least 0); linear interpolation then keeps every layer valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from optuna.distributions import FloatDistribution
from pydantic import NonNegativeInt, PositiveInt

from evomerge.engine.config import MergeConfig, Scalar, coerce
from evomerge.methods.registry import METHODS, REQUIRED, Param
from evomerge.methods.sparsify import Sparsify
from evomerge.search.spaces.space import Fail, SearchSpace, SpaceContext, SpaceSpec, unique
from evomerge.engine.config import model_labels

# what a method's space searches when the spec gives no ``search`` (beyond weight/t/density)
DEFAULT_SEARCH: dict[str, dict[str, tuple[float, float]]] = {
    "nearswap": {"t": (0.0, 0.01)},  # an absolute-difference threshold: fine-tunes differ by ~1e-3
    "sce": {"select_topk": (0.1, 1.0)},
    "ramplus_tl": {"r": (0.0, 1.0), "alpha": (0.0, 1.0)},
}
METHOD_NAMES = [name for name, m in METHODS.items() if m.param("weight") or m.param("t") or name in DEFAULT_SEARCH]
DELLA_MARGIN = 1e-3


class ParameterSpec(SpaceSpec):
    kind: Literal["parameter", "slerp"]
    method: str | None = None
    layer_granularity: NonNegativeInt = 0
    control_points: PositiveInt | None = None
    filters: list[str] = []
    search: dict[str, tuple[float, float]] | None = None
    fixed: dict[str, Scalar] = {}


def della_epsilon(epsilon: float, density: float) -> float:
    """``epsilon`` clipped so that ``density ± epsilon`` stays inside (0, 1)."""
    return min(epsilon, max(0.0, min(density, 1.0 - density) - DELLA_MARGIN))


class ParameterSpace(SearchSpace):
    """Searched merge parameters per model, layer group or control point, and filter."""

    Spec = ParameterSpec

    @property
    def methods(self) -> tuple[str, ...]:
        return (self.method.name,)

    def __init__(self, spec: ParameterSpec, context: SpaceContext, fail: Fail):
        super().__init__(spec, context, fail)
        method_name = spec.method or ("slerp" if spec.kind == "slerp" else None)
        if method_name not in METHOD_NAMES or (spec.kind == "slerp" and method_name != "slerp"):
            expected = "slerp (or omit it)" if spec.kind == "slerp" else ", ".join(METHOD_NAMES)
            fail(("method",), f"got {method_name!r}; expected one of: {expected}")
        self.method = METHODS[method_name]
        self.base = context.base_model if self.method.takes_base else None
        self.sources = [m for m in dict.fromkeys(context.models) if m != self.base]
        if not self.sources:
            fail(("models",), f"{self.method.name} needs at least one model besides the base")
        self.labels = model_labels(self.sources)
        self.filters = list(spec.filters)
        if len(set(self.filters)) != len(self.filters) or "" in self.filters:
            fail(("filters",), "expected distinct, non-empty tensor-name substrings")
        self._layout(spec, context.num_layers, fail)
        self.bounds = self._bounds(spec, fail)
        self.fixed = self._fixed(spec, fail)
        for param in self.method.params:  # else every trial would fail in the merge engine
            if param.default is REQUIRED and param.name not in self.bounds and param.name not in self.fixed:
                fail(("search",), f"{self.method.name} needs {param.name!r}: search it "
                     f"(search: {{{param.name}: [low, high]}}) or fix it (fixed: {{{param.name}: value}})")
        self.della = self.method.sparsify is Sparsify.della
        if self.della and self._low("density") <= 0:
            fail(("search", "density") if "density" in self.bounds else ("fixed", "density"),
                 f"{self.method.name} needs density > 0")
        for param in self.bounds:
            for owner in self._owners(param):
                for pos in range(len(self.positions)):
                    for fset in range(len(self.filter_sets)):
                        self._distributions[self._name(param, owner, pos, fset)] = \
                            FloatDistribution(*self.bounds[param])

    # ----------------------------------------------------------------- construction

    def _layout(self, spec: ParameterSpec, depth: int, fail: Fail) -> None:
        if spec.layer_granularity:
            if spec.control_points is not None:
                fail(("control_points",), "set layer_granularity or control_points, not both")
            k = min(spec.layer_granularity, depth)
            self.groups: list[tuple[int, int]] | None = [
                (start, min(start + k, depth)) for start in range(0, depth, k)]
            self.positions = [f"g{i}" for i in range(len(self.groups))]
        else:
            self.groups = None
            points = spec.control_points or 1
            self.positions = [f"c{i}" for i in range(points)] if points > 1 else [""]
        self.filter_sets = [*self.filters, "rest"] if self.filters else [""]

    def _bounds(self, spec: ParameterSpec, fail: Fail) -> dict[str, tuple[float, float]]:
        search = spec.search
        if search is None and self.method.name in DEFAULT_SEARCH:
            search = dict(DEFAULT_SEARCH[self.method.name])
        elif search is None:
            search = {"t": (0.0, 1.0)} if self.method.param("t") else {"weight": (0.0, 1.0)}
            if self.method.param("density"):
                search["density"] = (0.1, 1.0)
        for name, (low, high) in search.items():
            param = self.method.param(name)
            if param is None or param.kind is not float:
                floats = ", ".join(p.name for p in self.method.params if p.kind is float)
                fail(("search", name), f"not a numeric parameter of {self.method.name} "
                     f"(expected one of: {floats})")
            if not (low < high and (param.low is None or param.low <= low)
                    and (param.high is None or high <= param.high)):
                limits = "" if param.low is None else f" within [{param.low}, {param.high}]"
                fail(("search", name), f"expected [low, high] with low < high{limits}, "
                     f"got [{low}, {high}]")
        return dict(search)

    def _fixed(self, spec: ParameterSpec, fail: Fail) -> dict[str, Any]:
        fixed = {}
        for name, value in spec.fixed.items():
            param = self.method.param(name)
            if param is None or name in self.bounds:
                known = ", ".join(p.name for p in self.method.params if p.name not in self.bounds)
                fail(("fixed", name), f"expected a parameter of {self.method.name} that is not "
                     f"searched (one of: {known})")
            try:
                fixed[name] = coerce(value, param)
            except ValueError as error:
                fail(("fixed", name), str(error))
            if param.kind is float and not ((param.low is None or fixed[name] >= param.low)
                                            and (param.high is None or fixed[name] <= param.high)):
                fail(("fixed", name), f"{value} is out of range; expected a value in "
                     f"[{param.low}, {param.high}]")
        return fixed

    # ----------------------------------------------------------------- names and values

    def _param(self, name: str) -> Param:
        return self.method.param(name)

    def _owners(self, param: str) -> list[int | None]:
        return [None] if self._param(param).scope == "shared" else list(range(len(self.sources)))

    def _name(self, param: str, owner: int | None, pos: int, fset: int) -> str:
        parts = (None if owner is None else self.labels[owner], param,
                 self.positions[pos], self.filter_sets[fset])
        return ".".join(part for part in parts if part)

    def _default(self, param: str) -> float:
        """The fixed value, else the method default, else the middle of the bounds."""
        if param in self.fixed:
            return self.fixed[param]
        default = self._param(param).default
        if default is REQUIRED or default is None:
            low, high = self.bounds[param]
            return (low + high) / 2
        return default

    def _low(self, param: str) -> float:
        return self.bounds[param][0] if param in self.bounds else self._default(param)

    def _value(self, values: Mapping[str, float], param: str, owner: int | None,
               pos: int, fset: int) -> float:
        def raw(name: str) -> float:
            if name in self.bounds:
                return values[self._name(name, owner, pos, fset)]
            return self._default(name)
        if param == "epsilon" and self.della:
            return della_epsilon(raw("epsilon"), raw("density"))
        return raw(param)

    def _setting(self, values: Mapping[str, float], param: str, owner: int | None,
                 positions: Sequence[int]) -> Any:
        """One parameter's setting over ``positions``: a gradient list (a scalar for one
        position), as a ``{filter, value}`` list when there are filters."""
        def over(fset: int) -> Any:
            points = [self._value(values, param, owner, pos, fset) for pos in positions]
            return points if len(points) > 1 else points[0]
        if not self.filters:
            return over(0)
        return ([{"filter": f, "value": over(i)} for i, f in enumerate(self.filters)]
                + [{"value": over(len(self.filters))}])

    # ----------------------------------------------------------------- decode

    def decode(self, params: Mapping[str, Any]) -> MergeConfig:
        values = self._checked(params)
        emitted = list(self.bounds) + (["epsilon"] if self.della and "epsilon" not in self.bounds
                                       else [])
        per_model = [p for p in emitted if self._param(p).scope != "shared"]
        shared = [p for p in emitted if self._param(p).scope == "shared"]
        top = {k: v for k, v in self.fixed.items() if not (self.della and k == "epsilon")}

        def block(owner: int | None, names: list[str], positions: Sequence[int]) -> dict:
            return {p: self._setting(values, p, owner, positions) for p in names}

        data: dict[str, Any] = {"merge_method": self.method.name}
        if self.base:
            data["base_model"] = self.base
        if self.groups is None:
            everywhere = range(len(self.positions))
            data["models"] = [_entry({"model": model}, block(i, per_model, everywhere))
                              for i, model in enumerate(self.sources)]
            top.update(block(None, shared, everywhere))
        else:
            data["slices"] = []
            for g, (start, end) in enumerate(self.groups):
                sources = [_entry({"model": model, "layer_range": [start, end]},
                                  block(i, per_model, [g])) for i, model in enumerate(self.sources)]
                if self.base:
                    sources.append({"model": self.base, "layer_range": [start, end]})
                data["slices"].append(_entry({"sources": sources}, block(None, shared, [g])))
        return self._config(_entry(data, top))

    # ----------------------------------------------------------------- recipes

    def known_recipes(self) -> list[dict[str, Any]]:
        """Uniform weights with density 1 (model soup) or ``t = 0.5``; the same weights at
        density 0.5 (default TIES-style trim); every weight 1 (task arithmetic, λ = 1); each
        source alone (weight 1, the others 0) and, from three sources on, each one left out;
        ``t = 0`` / ``t = 1``. Values are clipped to the bounds; recipes about an unsearched
        parameter are skipped, duplicates dropped."""
        n = len(self.sources)
        uniform = [1.0 / n] * n
        candidates: list[tuple[str | None, dict[str, Any]]] = [
            (None, {"weight": uniform, "density": 1.0, "t": 0.5}),
            ("density", {"weight": uniform, "density": 0.5}),
            ("weight", {"weight": [1.0] * n, "density": 1.0}),
            *(("weight", {"weight": [float(i == j) for j in range(n)], "density": 1.0})
              for i in range(n) if n > 1),
            *(("weight", {"weight": [float(i != j) for j in range(n)], "density": 1.0})
              for i in range(n) if n > 2),
            ("t", {"t": 0.0}), ("t", {"t": 1.0}),
        ]
        return unique([self._recipe(values) for key, values in candidates
                       if key is None or key in self.bounds])

    def _recipe(self, recipe: Mapping[str, Any]) -> dict[str, float]:
        params = {}
        for param, (low, high) in self.bounds.items():
            for owner in self._owners(param):
                value = recipe.get(param, self._default(param))
                if isinstance(value, list):
                    value = value[owner]
                for pos in range(len(self.positions)):
                    for fset in range(len(self.filter_sets)):
                        params[self._name(param, owner, pos, fset)] = min(high, max(low, value))
        return params


def _entry(entry: dict[str, Any], parameters: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with a ``parameters`` block when there is one."""
    return {**entry, "parameters": parameters} if parameters else entry
