"""Merge methods by name: their parameters (scope, type, default, range), input contract
and the kernel that computes one output tensor from its inputs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from evomerge.methods.blocks import run_in_blocks
from evomerge.methods.linear import linear_merge
from evomerge.methods.model_stock import model_stock_merge
from evomerge.methods.slerp import slerp_merge
from evomerge.methods.sparsify import Sparsify, rescale_factor
from evomerge.methods.task_arithmetic import task_arithmetic_merge, task_vectors
from evomerge.methods.workspace import Workspace

REQUIRED = object()
Scope = Literal["shared", "input", "non_base"]


@dataclass(frozen=True)
class Param:
    """One method parameter. ``scope``: shared by all inputs, per input, or per non-base input."""

    name: str
    kind: type
    scope: Scope
    default: Any = REQUIRED
    low: float | None = None
    high: float | None = None
    optional: bool = False  # None is a valid value (e.g. passthrough ``scale``)


@dataclass(frozen=True)
class MergeInputs:
    """What a kernel sees for one output tensor; per-input lists are in input order."""

    tensors: Sequence[torch.Tensor]
    base_index: int | None
    shared: Mapping[str, Any]
    per_input: Sequence[Mapping[str, Any]]
    keys: Sequence[int]  # random-stream keys, one per input
    # optional, per input: precomputed magnitude positions / DELLA ranks of its task vector,
    # and its random stream's words (``stream_words``)
    positions: Sequence[torch.Tensor | None] | None = None
    ranks: Sequence[torch.Tensor | None] | None = None
    words: Sequence[torch.Tensor | None] | None = None
    workspace: Workspace | None = None  # scratch buffers (None: fresh allocations)
    out: torch.Tensor | None = None  # where the kernel may write its result
    # when the tensors are one block of larger ones: their element count, and per input its
    # task vector's L1 rescale factor (computed on the whole tensor by the method's ``prepare``)
    numel: int | None = None
    scales: Sequence[torch.Tensor | None] | None = None

    @property
    def base(self) -> torch.Tensor:
        return self.tensors[self.base_index]

    def non_base(self) -> list[int]:
        return [i for i in range(len(self.tensors)) if i != self.base_index]


@dataclass(frozen=True)
class MergeMethod:
    name: str
    kernel: Callable[[MergeInputs], torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None
    reference: str = ""
    sparsify: Sparsify | None = None  # task-arithmetic family: how task vectors are trimmed
    # whether the kernel computes each output element from the same element of its inputs
    # (and caches) alone, so that it may run block by block (see ``blocks.py``)
    elementwise: Callable[[MergeInputs], bool] | None = None
    # what a blocked run needs computed on the whole tensors first (e.g. L1 rescale factors)
    prepare: Callable[[MergeInputs], MergeInputs] | None = None

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def run(self, inputs: MergeInputs) -> torch.Tensor:
        """The kernel on ``inputs``; on CPU block by block when it is elementwise on them."""
        if (self.elementwise is None or inputs.tensors[0].device.type != "cpu"
                or not self.elementwise(inputs)):
            return self.kernel(inputs)
        return run_in_blocks(self.kernel, inputs, prepare=self.prepare)


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """How one member of the generalized task-arithmetic family configures the core."""

    sparsify: Sparsify | None
    consensus: bool
    normalize: bool
    rescale: bool


def _task_arithmetic_kernel(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], torch.Tensor]:
    def kernel(inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        others = inputs.non_base()
        per = [inputs.per_input[i] for i in others]

        def non_base(values: Sequence | None) -> list | None:
            return [values[i] for i in others] if values else None

        deltas = task_vectors(base, non_base(inputs.tensors), inputs.workspace)
        return task_arithmetic_merge(
            base, deltas, [p["weight"] for p in per],
            densities=[p["density"] for p in per], sparsify_method=variant.sparsify,
            consensus=variant.consensus, normalize=inputs.shared["normalize"],
            rescale=inputs.shared["rescale"], lam=inputs.shared["lambda"],
            gammas=[p.get("gamma", 0.0) for p in per], epsilons=[p.get("epsilon", 0.0) for p in per],
            keys=non_base(inputs.keys), positions=non_base(inputs.positions),
            ranks=non_base(inputs.ranks), words=non_base(inputs.words),
            workspace=inputs.workspace, out=inputs.out, numel=inputs.numel,
            scales=non_base(inputs.scales))
    return kernel


# the per-input caches without which a trim needs the whole task vector
_TRIM_CACHES = {Sparsify.magnitude: ("positions",), Sparsify.magnitude_outliers: ("positions",),
                Sparsify.random: ("words",), Sparsify.della: ("words", "ranks")}


def trimmed_inputs(per_input: Sequence[Mapping[str, Any]], base_index: int | None) -> list[bool]:
    """Per input of a sparsifying method: whether its task vector is trimmed (non-base, density < 1)."""
    return [i != base_index and p.get("density", 1.0) < 1 for i, p in enumerate(per_input)]


def _trimmed(variant: TaskArithmeticVariant, inputs: MergeInputs) -> list[int]:
    """The inputs whose task vectors ``variant`` sparsifies."""
    if variant.sparsify is None:
        return []
    return [i for i, trim in enumerate(trimmed_inputs(inputs.per_input, inputs.base_index)) if trim]


def _task_arithmetic_elementwise(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], bool]:
    """Elementwise unless a task vector is trimmed without its caches."""
    def elementwise(inputs: MergeInputs) -> bool:
        caches = [getattr(inputs, name) for name in _TRIM_CACHES.get(variant.sparsify, ())]
        return all(cache is not None and cache[i] is not None
                   for cache in caches for i in _trimmed(variant, inputs))
    return elementwise


def _flat(cache: Sequence[torch.Tensor | None] | None, index: int) -> torch.Tensor | None:
    return None if cache is None or cache[index] is None else cache[index].reshape(-1)


def _task_arithmetic_prepare(variant: TaskArithmeticVariant) -> Callable[[MergeInputs], MergeInputs]:
    """With ``rescale``: each trimmed task vector's L1 rescale factor, a sum over the whole tensor."""
    def prepare(inputs: MergeInputs) -> MergeInputs:
        trimmed = _trimmed(variant, inputs)
        if not inputs.shared["rescale"] or not trimmed:
            return inputs
        workspace = Workspace() if inputs.workspace is None else inputs.workspace
        scales: list[torch.Tensor | None] = [None] * len(inputs.tensors)
        base = inputs.base.reshape(-1)
        for i in trimmed:
            per = inputs.per_input[i]
            scales[i] = rescale_factor(
                inputs.tensors[i].reshape(-1), base, variant.sparsify, per["density"],
                gamma=per.get("gamma", 0.0), epsilon=per.get("epsilon", 0.0), key=inputs.keys[i],
                position=_flat(inputs.positions, i), rank=_flat(inputs.ranks, i),
                words=_flat(inputs.words, i), workspace=workspace)
        return dataclasses.replace(inputs, scales=scales, workspace=workspace)
    return prepare


def _linear_kernel(inputs: MergeInputs) -> torch.Tensor:
    return linear_merge(inputs.tensors, [p["weight"] for p in inputs.per_input],
                        normalize=inputs.shared["normalize"], workspace=inputs.workspace,
                        out=inputs.out)


def _slerp_kernel(inputs: MergeInputs) -> torch.Tensor:
    other = inputs.tensors[1 - inputs.base_index]
    return slerp_merge(inputs.shared["t"], inputs.base, other, workspace=inputs.workspace,
                       out=inputs.out)


def _model_stock_kernel(inputs: MergeInputs) -> torch.Tensor:
    return model_stock_merge(inputs.base, [inputs.tensors[i] for i in inputs.non_base()],
                             filter_wise=inputs.shared["filter_wise"], workspace=inputs.workspace,
                             out=inputs.out)


def _passthrough_kernel(inputs: MergeInputs) -> torch.Tensor:
    scale = inputs.per_input[0]["scale"]
    tensor = inputs.tensors[0]
    return tensor if scale is None else torch.mul(tensor, scale, out=inputs.out)


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
                       prepare=_task_arithmetic_prepare(variant))


_TA = TaskArithmeticVariant
METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("linear", _linear_kernel,
                (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
                needs_base=False, reference="https://arxiv.org/abs/2203.05482",
                elementwise=lambda inputs: True),
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
]}


def get_method(name: str) -> MergeMethod:
    """Look a method up by name (KeyError lists the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown merge_method {name!r}; expected one of: {', '.join(METHODS)}") from None
