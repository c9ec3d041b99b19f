"""The merge engine: execute a plan tensor by tensor, streaming from memory-mapped inputs.

Peak memory is the largest tensor's inputs and the kernel's scratch (a few float32 copies
of that tensor), plus the pending output shard when writing (up to ``--out-shard-size``);
it grows with the largest tensor (usually vocabulary × hidden), not with depth.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

from evomerge.compat import check_sources
from evomerge.config import MergeConfig, load_config, torch_dtype
from evomerge.errors import EvomergeError, ModelError
from evomerge.io.reader import ModelFolder
from evomerge.io.writer import DEFAULT_SHARD_SIZE, TOKENIZER_FILES, ModelWriter, check_output_dir
from evomerge.merge.registry import MergeInputs
from evomerge.merge.workspace import Workspace
from evomerge.plan import MergePlan, TensorOp, build_plan, open_models, output_config

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available) → a usable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"--device: expected cpu, cuda, cuda:N or auto, got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("--device cuda: no CUDA device is available")
    return resolved


def work_dtype(tensors: list[torch.Tensor], config_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a kernel computes in: the config's ``dtype``, else the inputs' promoted dtype."""
    if config_dtype is not None:
        return config_dtype
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def execute_op(op: TensorOp, plan: MergePlan, tensors: list[torch.Tensor], *,
               positions: list[torch.Tensor | None] | None = None,
               ranks: list[torch.Tensor | None] | None = None,
               words: list[torch.Tensor | None] | None = None,
               workspace: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Compute one output tensor from its input tensors (already on the compute device).

    ``positions``/``ranks``/``words``: optional precomputed magnitude positions / DELLA
    ranks of each input's task vector and words of its random stream (the materializer's
    caches); ``workspace``: reusable scratch buffers; ``out``: a tensor of the output's
    shape and working dtype that the kernel may write the result into (the result is
    returned either way). None of them changes the result.
    """
    if op.crop_rows is not None:
        tensors = [t[:op.crop_rows] for t in tensors]
    if not all(t.is_floating_point() for t in tensors):
        if any(t.dtype != tensors[0].dtype or not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise ModelError(f"non-floating buffer {op.name} differs between inputs")
        return tensors[0].clone()
    dtype = work_dtype(tensors, torch_dtype(plan.config.dtype))
    tensors = [t.to(dtype) for t in tensors]
    return plan.method.run(MergeInputs(tensors, op.base_index, op.shared, op.per_input, op.keys,
                                          positions, ranks, words, workspace, out))


def iter_merged(plan: MergePlan, models: dict[str, ModelFolder], device: torch.device,
                *, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every output tensor, in plan order."""
    out_dtype = torch_dtype(plan.config.out_dtype)
    for op in tqdm(plan.ops, desc=f"{plan.method.name} merge", unit="tensor", disable=not progress):
        tensors = [models[model].tensor(name).to(device) for model, name in op.inputs]
        merged = execute_op(op, plan, tensors)
        if out_dtype is not None and merged.is_floating_point():
            merged = merged.to(out_dtype)
        yield op.name, merged


def _as_config(config: MergeConfig | str | Path) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else load_config(config)


def _open_checked(config: MergeConfig) -> dict[str, ModelFolder]:
    """The config's models, with the compatibility check (:mod:`evomerge.compat`) when the
    method builds on a base: a warning for each source that does not look fine-tuned from it."""
    models = open_models(config)
    if config.base_model is not None and config.method.needs_base:
        check_sources(models[config.base_model], [f for n, f in models.items() if n != config.base_model])
    return models


def merge_state_dict(config: MergeConfig | str | Path, *, seed: int = 0,
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """Merge in memory and return the output state dict (nothing is written)."""
    config = _as_config(config)
    models = _open_checked(config)
    plan = build_plan(config, models, seed)
    return dict(iter_merged(plan, models, resolve_device(device)))


def merge(config: MergeConfig | str | Path, out_dir: str | Path, *, seed: int = 0,
          device: str = "cpu", shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False,
          progress: bool = False) -> Path:
    """Merge and write a Hugging Face model folder to ``out_dir`` (atomically); return its path.

    The folder holds sharded safetensors (+ index), ``config.json`` with the output depth
    and dtype, ``generation_config.json`` and tokenizer files from ``tokenizer_source`` (or
    the base model), and the merge config as ``evomerge_config.yml``.
    """
    config = _as_config(config)
    check_output_dir(Path(out_dir).absolute(), force)
    compute_device = resolve_device(device)
    models = _open_checked(config)
    plan = build_plan(config, models, seed)
    template_dir = models[plan.template].path
    tokenizer_dir = _tokenizer_dir(config, models, template_dir)  # fail before merging
    writer = ModelWriter(out_dir, shard_size=shard_size, force=force)
    try:
        out_dtype_name = None
        for name, tensor in iter_merged(plan, models, compute_device, progress=progress):
            writer.add(name, tensor)
            if tensor.is_floating_point() and out_dtype_name is None:
                out_dtype_name = str(tensor.dtype).removeprefix("torch.")
        writer.write_json("config.json", output_config(plan, models, out_dtype_name))
        writer.copy_files(template_dir, ("generation_config.json",))
        copied = writer.copy_files(tokenizer_dir, TOKENIZER_FILES)
        if not copied:
            log.warning("no tokenizer files found in %s; the output has no tokenizer", tokenizer_dir)
        writer.write_text("evomerge_config.yml", config.to_yaml())
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %d tensors (%.1f MB) to %s", len(plan.ops), writer.total_bytes / 1e6, path)
    return path


def _tokenizer_dir(config: MergeConfig, models: dict[str, ModelFolder], template_dir: Path) -> Path:
    source = config.tokenizer_source
    if source in (None, "base"):
        return template_dir
    path = Path(source)
    if not path.is_dir():
        raise ModelError(f"tokenizer_source: folder not found: {source}")
    return path
