"""Merge methods by name: their parameters (scope, type, default, range), input contract
and the kernel that computes one output tensor from its inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from evomerge.methods._cpu import run_in_blocks
from evomerge.methods.fusion import arcee_fusion_merge, nearswap_merge
from evomerge.methods.linear import linear_merge
from evomerge.methods.model_stock import model_stock_merge
from evomerge.methods.ram import ram_merge
from evomerge.methods.sce import sce_merge
from evomerge.methods.slerp import slerp_merge
from evomerge.methods.spherical import karcher_merge, multislerp_merge, nuslerp_merge
from evomerge.methods.sparsify import Caches, Sparsify, Trim, rescale_factor, task_vector_cuts
from evomerge.methods.task_arithmetic import task_arithmetic_merge, task_vectors

REQUIRED = object()
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class Param:
    """One method parameter. ``scope``: shared by all inputs, per input, or per non-base input."""

    name: str
    kind: type  # float, int or bool
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    optional: bool = False  # None is a valid value (e.g. passthrough ``scale``)


@dataclass(frozen=True)
class MergeInputs:
    """What a kernel sees for one output tensor; per-input lists are in input order.
    ``caches``: what it may reuse (trim caches, workspace); ``out``: where it may write its
    result (a tensor of the output's shape and dtype)."""

    tensors: Sequence[torch.Tensor]
    base_index: int | None
    shared: Mapping[str, Any]
    per_input: Sequence[Mapping[str, Any]]
    keys: Sequence[int]  # random-stream keys, one per input
    caches: Caches = dataclasses.field(default_factory=Caches)
    out: torch.Tensor | None = None

    @property
    def base(self) -> torch.Tensor:
        return self.tensors[self.base_index]

    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method. The base model: ``needs_base``: required, it is the base input;
    ``optional_base``: the base input when the config names one; ``base_as_input``: an
    ordinary input when the config names one (mergekit's methods that ignore the base);
    else it is not an input unless listed. ``min_inputs``/``max_inputs`` count the inputs
    with the base, ``min_non_base``/``max_non_base`` those besides it."""

    name: str
    kernel: Callable[[MergeInputs], torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None
    optional_base: bool = False
    base_as_input: bool = False
    min_non_base: int = 0
    max_non_base: int | None = None
    reference: str = ""
    sparsify: Sparsify | None = None  # task-arithmetic family: how task vectors are trimmed
    # whether the kernel computes each output element from the same element of its inputs
    # (and caches) alone, so that it may run block by block (see ``_cpu.run_in_blocks``)
    elementwise: Callable[[MergeInputs], bool] | None = None
    # what a blocked run needs computed on the whole tensors first (e.g. L1 rescale factors)
    prepare: Callable[[MergeInputs], MergeInputs] | None = None
    # whether row-blocked execution (``methods/blocked.py``) serves it: an output row needs the
    # same rows of the inputs only, once the whole-tensor magnitude cuts and L1 factors are known
    rows: bool = False

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def takes_base(self) -> bool:
        """Whether a base model given in the config is the base input (required or optional)."""
        return self.needs_base or self.optional_base

    def run(self, inputs: MergeInputs) -> torch.Tensor:
        """The kernel on ``inputs``; on CPU block by block when it is elementwise on them."""
        if self.elementwise is None or not self.elementwise(inputs):
            return self.kernel(inputs)
        return run_in_blocks(self.kernel, inputs, prepare=self.prepare)


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """How one member of the generalized task-arithmetic family configures the core."""

    sparsify: Sparsify | None
    consensus: bool
    normalize: bool
    rescale: bool


def trimmed_inputs(per_input: Sequence[Mapping[str, Any]], base_index: int | None) -> list[bool]:
    """Per input of a sparsifying method: whether its task vector is trimmed (non-base, density < 1)."""
    return [i != base_index and p.get("density", 1.0) < 1 for i, p in enumerate(per_input)]


def trims_for(sparsify: Sparsify | None, shared: Mapping[str, Any], per_input: Sequence[Mapping[str, Any]],
              keys: Sequence[int], base_index: int | None) -> list[Trim | None]:
    """Per input: how ``sparsify`` (a method's :attr:`MergeMethod.sparsify`) trims its task
    vector with these parameters and random keys (None: not at all)."""
    if sparsify is None:
        return [None] * len(per_input)
    return [Trim(sparsify, p["density"], shared["rescale"], p.get("gamma", 0.0), p.get("epsilon", 0.0), key)
            if trimmed else None
            for p, key, trimmed in zip(per_input, keys, trimmed_inputs(per_input, base_index))]


def _trims(variant: TaskArithmeticVariant, inputs: MergeInputs) -> list[Trim | None]:
    """Per input: how ``variant`` sparsifies its task vector (None: not at all)."""
    return trims_for(variant.sparsify, inputs.shared, inputs.per_input, inputs.keys, inputs.base_index)


def _task_arithmetic_kernel(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], torch.Tensor]:
    def kernel(inputs: MergeInputs) -> torch.Tensor:
        others = inputs.non_base()
        trims = _trims(variant, inputs)
        caches = inputs.caches.select(others)
        deltas = task_vectors(inputs.base, [inputs.tensors[i] for i in others], caches.workspace)
        return task_arithmetic_merge(
            inputs.base, deltas, [inputs.per_input[i]["weight"] for i in others],
            trims=[trims[i] for i in others], consensus=variant.consensus,
            normalize=inputs.shared["normalize"], lam=inputs.shared["lambda"], caches=caches,
            out=inputs.out)
    return kernel


def _task_arithmetic_elementwise(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], bool]:
    """Elementwise unless a task vector is trimmed by DELLA without its ranks (a magnitude
    trim without positions gets its cuts from ``prepare``)."""
    def elementwise(inputs: MergeInputs) -> bool:
        return all(trim is None or inputs.caches.trim(i).blockable(trim.method)
                   for i, trim in enumerate(_trims(variant, inputs)))
    return elementwise


def _task_arithmetic_prepare(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], MergeInputs]:
    """What the blocks need from the whole tensors: the cuts of each magnitude trim without
    cached positions, then with ``rescale`` each trimmed task vector's L1 rescale factor (each
    unless the caches hold it already: the inputs are then a row block of larger tensors)."""
    def prepare(inputs: MergeInputs) -> MergeInputs:
        trims, caches = _trims(variant, inputs), inputs.caches
        magnitude = (Sparsify.magnitude, Sparsify.magnitude_outliers)
        if not any(trim is not None and (trim.rescale or trim.method in magnitude) for trim in trims):
            return inputs
        base, prepared = inputs.base.reshape(-1), [caches.trim(i) for i in range(len(trims))]
        for i, trim in enumerate(trims):
            if trim is None:
                continue
            source = inputs.tensors[i].reshape(-1)
            if trim.method in magnitude and prepared[i].position is None and prepared[i].cuts is None:
                cuts = task_vector_cuts(source, base, trim, caches.workspace)
                prepared[i] = dataclasses.replace(prepared[i], cuts=cuts)
            if trim.rescale and prepared[i].scale is None:
                scale = rescale_factor(source, base, trim, prepared[i], caches.workspace)
                prepared[i] = dataclasses.replace(prepared[i], scale=scale)
        return dataclasses.replace(inputs, caches=dataclasses.replace(caches, trims=prepared))
    return prepare


def _linear_kernel(inputs: MergeInputs) -> torch.Tensor:
    return linear_merge(inputs.tensors, [p["weight"] for p in inputs.per_input],
                        normalize=inputs.shared["normalize"], workspace=inputs.caches.workspace,
                        out=inputs.out)


def _slerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    other = inputs.tensors[1 - inputs.base_index]
    return slerp_merge(inputs.shared["t"], inputs.base, other, workspace=inputs.caches.workspace,
                       out=inputs.out)


def _model_stock_kernel(inputs: MergeInputs) -> torch.Tensor:
    return model_stock_merge(inputs.base, [inputs.tensors[i] for i in inputs.non_base()],
                             filter_wise=inputs.shared["filter_wise"], workspace=inputs.caches.workspace,
                             out=inputs.out)


def _passthrough_kernel(inputs: MergeInputs) -> torch.Tensor:
    scale = inputs.per_input[0]["scale"]
    tensor = inputs.tensors[0]
    return tensor if scale is None else torch.mul(tensor, scale, out=inputs.out)


def _base(inputs: MergeInputs) -> torch.Tensor | None:
    return None if inputs.base_index is None else inputs.base


def _non_base(inputs: MergeInputs) -> list[torch.Tensor]:
    return [inputs.tensors[i] for i in inputs.non_base()]


def _nuslerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    return nuslerp_merge(_non_base(inputs), [inputs.per_input[i]["weight"] for i in inputs.non_base()],
                         _base(inputs), row_wise=inputs.shared["nuslerp_row_wise"],
                         flatten=inputs.shared["nuslerp_flatten"])


def _multislerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    return multislerp_merge(_non_base(inputs), [inputs.per_input[i]["weight"] for i in inputs.non_base()],
                            _base(inputs), normalize_weights=inputs.shared["normalize_weights"],
                            eps=inputs.shared["eps"])


def _karcher_kernel(inputs: MergeInputs) -> torch.Tensor:
    return karcher_merge(inputs.tensors, max_iter=int(inputs.shared["max_iter"]), tol=inputs.shared["tol"])


def _sce_kernel(inputs: MergeInputs) -> torch.Tensor:
    return sce_merge(inputs.base, _non_base(inputs), select_topk=inputs.shared["select_topk"],
                     order=inputs.caches.selection, workspace=inputs.caches.workspace)


def _nearswap_kernel(inputs: MergeInputs) -> torch.Tensor:
    return nearswap_merge(inputs.shared["t"], inputs.base, inputs.tensors[1 - inputs.base_index])


def _arcee_fusion_kernel(inputs: MergeInputs) -> torch.Tensor:
    other = 1 - inputs.base_index
    return arcee_fusion_merge(inputs.base, inputs.tensors[other], inputs.keys[other])


def _ram_kernel(inputs: MergeInputs) -> torch.Tensor:
    return ram_merge(inputs.base, _non_base(inputs), epsilon=inputs.shared["epsilon"],
                     workspace=inputs.caches.workspace)


def _ramplus_kernel(inputs: MergeInputs) -> torch.Tensor:
    shared = inputs.shared
    return ram_merge(inputs.base, _non_base(inputs), epsilon=shared["epsilon"],
                     plus=(shared["r"], shared["alpha"]), workspace=inputs.caches.workspace)


def _task_arithmetic_method(name: str, variant: TaskArithmeticVariant, reference: str) -> MergeMethod:
    params = [
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0, 0.0, 1.0),
        Param("int8_mask", bool, "shared", False),
        Param("normalize", bool, "shared", variant.normalize),
        Param("rescale", bool, "shared", variant.rescale),
        Param("lambda", float, "shared", 1.0),
    ]
    if variant.sparsify is Sparsify.magnitude_outliers:
        params.append(Param("gamma", float, "non_base", 0.01, 0.0, 1.0))
    if variant.sparsify is Sparsify.della:
        params.append(Param("epsilon", float, "non_base", 0.15, 0.0, 1.0))
    return MergeMethod(name, _task_arithmetic_kernel(variant), tuple(params), needs_base=True,
                       reference=reference, sparsify=variant.sparsify,
                       elementwise=_task_arithmetic_elementwise(variant),
                       prepare=_task_arithmetic_prepare(variant), rows=True)


_TA = TaskArithmeticVariant
METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("linear", _linear_kernel,
                (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
                needs_base=False, reference="https://arxiv.org/abs/2203.05482",
                elementwise=lambda inputs: True, rows=True),
    _task_arithmetic_method("task_arithmetic", _TA(None, False, False, False),
                            "https://arxiv.org/abs/2212.04089"),
    _task_arithmetic_method("ties", _TA(Sparsify.magnitude, True, True, False),
                            "https://arxiv.org/abs/2306.01708"),
    _task_arithmetic_method("dare_ties", _TA(Sparsify.random, True, False, True),
                            "https://arxiv.org/abs/2311.03099"),
    _task_arithmetic_method("dare_linear", _TA(Sparsify.random, False, False, True),
                            "https://arxiv.org/abs/2311.03099"),
    _task_arithmetic_method("breadcrumbs", _TA(Sparsify.magnitude_outliers, False, False, False),
                            "https://arxiv.org/abs/2312.06795"),
    _task_arithmetic_method("breadcrumbs_ties", _TA(Sparsify.magnitude_outliers, True, False, False),
                            "https://arxiv.org/abs/2312.06795"),
    _task_arithmetic_method("della", _TA(Sparsify.della, True, True, True),
                            "https://arxiv.org/abs/2406.11617"),
    _task_arithmetic_method("della_linear", _TA(Sparsify.della, False, False, True),
                            "https://arxiv.org/abs/2406.11617"),
    MergeMethod("slerp", _slerp_kernel, (Param("t", float, "shared", low=0.0, high=1.0),),
                needs_base=True, min_inputs=2, max_inputs=2,
                reference="https://en.wikipedia.org/wiki/Slerp"),
    MergeMethod("model_stock", _model_stock_kernel, (Param("filter_wise", bool, "shared", False),),
                needs_base=True, min_inputs=3, reference="https://arxiv.org/abs/2403.19522"),
    MergeMethod("passthrough", _passthrough_kernel,
                (Param("scale", float, "input", None, optional=True),),
                needs_base=False, max_inputs=1),
    MergeMethod("nuslerp", _nuslerp_kernel,
                (Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, "shared", False),
                 Param("nuslerp_flatten", bool, "shared", True)),
                needs_base=False, optional_base=True, min_non_base=2, max_non_base=2,
                reference="https://en.wikipedia.org/wiki/Slerp"),
    MergeMethod("multislerp", _multislerp_kernel,
                (Param("weight", float, "non_base"), Param("normalize_weights", bool, "shared", True),
                 Param("eps", float, "shared", 1e-8, 0.0)),
                needs_base=False, optional_base=True, min_non_base=1,
                reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    MergeMethod("karcher", _karcher_kernel,
                (Param("max_iter", int, "shared", 10, 0), Param("tol", float, "shared", 1e-5, 0.0)),
                needs_base=False, base_as_input=True, reference="https://arxiv.org/abs/2603.04972"),
    MergeMethod("sce", _sce_kernel,
                (Param("select_topk", float, "shared", 1.0, 0.0, 1.0), Param("int8_mask", bool, "shared", False)),
                needs_base=True, reference="https://arxiv.org/abs/2408.07990"),
    MergeMethod("nearswap", _nearswap_kernel, (Param("t", float, "shared", low=0.0),),
                needs_base=True, min_inputs=2, max_inputs=2,
                reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
                elementwise=lambda inputs: True),
    MergeMethod("arcee_fusion", _arcee_fusion_kernel, (), needs_base=True, min_inputs=2, max_inputs=2,
                reference="https://arcee.ai"),
    MergeMethod("ram", _ram_kernel, (Param("epsilon", float, "shared", 1e-5, 0.0),),
                needs_base=True, reference="https://arxiv.org/abs/2601.13572",
                elementwise=lambda inputs: True),
    MergeMethod("ramplus_tl", _ramplus_kernel,
                (Param("r", float, "shared", 0.1, 0.0), Param("alpha", float, "shared", 0.2, 0.0),
                 Param("epsilon", float, "shared", 1e-5, 0.0)),
                needs_base=True, reference="https://arxiv.org/abs/2601.13572"),
]}


def get_method(name: str) -> MergeMethod:
    """Look a method up by name (KeyError lists the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge_method {name!r}; expected one of: {', '.join(METHODS)}") from None
