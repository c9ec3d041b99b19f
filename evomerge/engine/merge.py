"""The merge engine: execute a plan tensor by tensor, streaming from memory-mapped inputs.

Peak memory is the largest tensor's inputs and the kernel's scratch (a few float32 copies
of that tensor), plus the pending output shard when writing (up to ``--out-shard-size``);
it grows with the largest tensor (usually vocabulary × hidden), not with depth.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from evomerge.engine.config import MergeConfig, load_config
from evomerge.engine.execute import iter_merged, resolve_device
from evomerge.engine.inspect import check_sources
from evomerge.engine.plan import MergePlan, build_plan, open_models, output_config
from evomerge.io.reader import ModelFolder
from evomerge.io.writer import DEFAULT_SHARD_SIZE, TOKENIZER_FILES, ModelWriter, check_output_dir

log = logging.getLogger(__name__)


def _as_config(config: MergeConfig | str | Path) -> MergeConfig:
    return config if isinstance(config, MergeConfig) else load_config(config)


def _open_checked(config: MergeConfig) -> dict[str, ModelFolder]:
    """The config's models, with the compatibility check (:mod:`evomerge.engine.inspect`) when the
    method builds on a base: a warning for each source that does not look fine-tuned from it."""
    models = open_models(config)
    if config.base_model is not None and config.method.takes_base:
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
    and dtype, ``generation_config.json``, the tokenizer (the one ``tokenizer_source``/``tokenizer``
    builds, with ``vocab_size`` set to its padded size; without either, the base model's files),
    and the merge config as ``evomerge_config.yml``.
    """
    config = _as_config(config)
    check_output_dir(Path(out_dir).absolute(), force)
    compute_device = resolve_device(device)
    models = _open_checked(config)
    plan = build_plan(config, models, seed)
    template_dir = models[plan.template].files_dir
    writer = ModelWriter(out_dir, shard_size=shard_size, force=force)
    try:
        out_dtype_name = None
        for name, tensor in iter_merged(plan, models, compute_device, progress=progress):
            writer.add(name, tensor)
            if tensor.is_floating_point() and out_dtype_name is None:
                out_dtype_name = str(tensor.dtype).removeprefix("torch.")
        writer.write_json("config.json", output_config(plan, models, out_dtype_name))
        writer.copy_files(template_dir, ("generation_config.json",))
        _write_tokenizer(writer, plan, template_dir)
        writer.write_text("evomerge_config.yml", config.to_yaml())
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log.info("wrote %d tensors (%.1f MB) to %s", len(plan.ops), writer.total_bytes / 1e6, path)
    return path


def _write_tokenizer(writer: ModelWriter, plan: MergePlan, template_dir: Path) -> None:
    """The output tokenizer: the plan's vocabulary (its source folder's files byte for byte when
    it is that folder's tokenizer unchanged, else saved by ``transformers``), or the template's files."""
    vocabulary = plan.vocabulary
    if vocabulary is not None and vocabulary.copy_from is None:
        vocabulary.tokenizer.save_pretrained(writer.tmp_dir)
        return
    folder = template_dir if vocabulary is None else vocabulary.copy_from
    if not writer.copy_files(folder, TOKENIZER_FILES):
        log.warning("no tokenizer files found in %s; the output has no tokenizer", folder)
