"""Importing a GGUF file (llama.cpp's format) as a plain Hugging Face safetensors folder.

The GGUF is read by transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``:
config from the metadata, tensors dequantized and mapped to transformers' names, the
tokenizer rebuilt from the metadata), so the folder holds exactly the model transformers
loads from that file, in the chosen dtype. What differs from ``save_pretrained``, which refuses
a GGUF-loaded model: the config has no ``quantization_config`` (the tensors are plain
dequantized floats; with it, loading the folder would treat it as a GGUF again), tied weights
are stored once, and the folder is written like every evomerge output (:class:`ModelWriter`:
a hidden temporary folder renamed into place, so a failure leaves nothing).

Errors (:class:`~evomerge.errors.ModelError`, one line naming the file): missing or unreadable
file, not a GGUF, an architecture transformers' GGUF loader does not support.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from evomerge.errors import EvomergeError, ModelError
from evomerge.io.writer import ModelWriter, check_output_dir

log = logging.getLogger(__name__)


def gguf_architecture(file: str | Path) -> str:
    """The ``general.architecture`` of a GGUF file; ModelError when it is not a readable GGUF."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise EvomergeError("reading GGUF files needs the gguf package: pip install 'evomerge[gguf]'") from None

    file = Path(file)
    if not file.is_file():
        raise ModelError(f"{file}: GGUF file not found")
    try:
        field = GGUFReader(file).fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelError(f"{file}: general.architecture: missing from the GGUF metadata") from None
    except Exception as error:  # the reader raises ValueError, OSError, struct errors ... on bad files
        raise ModelError(f"{file}: not a readable GGUF file ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def import_gguf(file: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32,
                force: bool = False) -> Path:
    """Write the model of GGUF ``file`` to ``out_dir`` as safetensors in ``dtype``, with its config
    (no ``quantization_config``), generation config, tokenizer and chat template; return the folder.

    Example: ``import_gguf("tinyllama.Q8_0.gguf", "models/tinyllama", dtype=torch.bfloat16)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.core_model_loading import revert_weight_conversion

    file = Path(file).absolute()
    check_output_dir(Path(out_dir).absolute(), force)
    architecture = gguf_architecture(file)
    where = {"pretrained_model_name_or_path": file.parent, "gguf_file": file.name}
    try:
        AutoConfig.from_pretrained(**where)
    except (ValueError, KeyError) as error:
        raise ModelError(f"{file}: general.architecture: {architecture!r} is not supported by transformers' "
                         f"GGUF loader ({_first_line(error)})") from None
    model = AutoModelForCausalLM.from_pretrained(**where, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(**where)
    except (ValueError, KeyError, OSError) as error:
        raise ModelError(f"{file}: tokenizer.ggml: transformers cannot build the tokenizer "
                         f"({_first_line(error)})") from None
    writer = ModelWriter(out_dir, force=force)
    try:
        tensors = revert_weight_conversion(model, model.state_dict())
        head = model.get_output_embeddings()
        head_names = {name for name, module in model.named_modules() if module is head}  # e.g. {"lm_head"}
        stored: set[int] = set()
        # a tied head is stored once, under the input embedding's name, as save_pretrained does (the
        # head last, so the embedding's name is met first); mergekit and HF fine-tunes expect that name
        for name, tensor in sorted(tensors.items(), key=lambda item: item[0].rsplit(".", 1)[0] in head_names):
            if tensor.data_ptr() in stored:
                continue
            stored.add(tensor.data_ptr())
            writer.add(name, tensor)
        config = model.config.to_diff_dict()  # what save_pretrained writes ...
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):  # ... less the GGUF's
            config.pop(key, None)
        config["architectures"] = [type(model).__name__]  # as save_pretrained writes it
        config["dtype"] = str(dtype).removeprefix("torch.")
        writer.write_json("config.json", config)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(writer.tmp_dir)
        tokenizer.save_pretrained(writer.tmp_dir)
        path = writer.commit()
    except BaseException:
        writer.abort()
        raise
    log.info("imported %s (%s, %.1f MB) to %s", file.name, architecture, writer.total_bytes / 1e6, path)
    return path
