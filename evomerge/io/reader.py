"""Lazy reading of Hugging Face model folders, one tensor at a time through memory maps.

Accepts ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
``pytorch_model.bin`` and sharded ``.bin`` with ``pytorch_model.bin.index.json`` (loaded
with ``weights_only=True``, so no pickle code runs, and with ``mmap=True`` for the zip format
of torch>=1.6, so nothing is read until a tensor is used; legacy-format files load eagerly).
Every file is opened and its header checked when the folder is opened, so a truncated or
corrupt file fails before any merge work starts.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import ModelError

SAFETENSORS_INDEX = "model.safetensors.index.json"
# the dtype names of the safetensors header (its format's spec)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                      "F8_E5M2": torch.float8_e5m2}
BIN_INDEX = "pytorch_model.bin.index.json"


class ModelFolder:
    """A read-only view of a model folder: its config and its tensors by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelError(f"model folder not found: {self.path} (no hub access: give a local path)")
        self.config = self._read_config()
        self._handles: dict[Path, object] = {}
        self._files: dict[str, Path] = self._tensor_files()
        for file in dict.fromkeys(self._files.values()):
            self._open(file)
        self._check_index()

    def _read_config(self) -> dict:
        config_path = self.path / "config.json"
        try:
            return json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{config_path}: missing config.json") from None
        except json.JSONDecodeError as error:
            raise ModelError(f"{config_path}: invalid JSON ({error.msg}, line {error.lineno})") from None

    def _tensor_files(self) -> dict[str, Path]:
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index_path = self.path / index_name
            if index_path.exists():
                try:
                    weight_map = json.loads(index_path.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ModelError(f"{index_path}: expected JSON with a 'weight_map'") from None
                return {name: self.path / file for name, file in weight_map.items()}
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (self.path / single).exists():
                return {name: self.path / single for name in self._names_in(self.path / single)}
        raise ModelError(f"{self.path}: no model.safetensors, pytorch_model.bin or index file")

    def _names_in(self, file: Path) -> list[str]:
        return list(self._open(file).keys())

    def _open(self, file: Path):
        if file in self._handles:
            return self._handles[file]
        if not file.exists():
            raise ModelError(f"{file}: listed in the index but missing")
        try:
            if file.suffix == ".safetensors":
                handle = safe_open(str(file), framework="pt", device="cpu")
            else:
                # mmap needs the zip format of torch>=1.6; legacy .bin files load eagerly
                handle = torch.load(file, map_location="cpu", weights_only=True,
                                    mmap=zipfile.is_zipfile(file))
        except Exception as error:  # safetensors/torch raise several types for bad files
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if "Weights only load failed" in reason:
                raise ModelError(f"{file}: refused: the pickle holds objects other than tensors "
                                 "(loaded with weights_only=True)") from None
            raise ModelError(f"{file}: corrupt or truncated weights file ({reason})") from None
        self._handles[file] = handle
        return handle

    def _check_index(self) -> None:
        for name, file in self._files.items():
            if name not in self._open(file).keys():
                raise ModelError(f"{file}: index lists tensor {name} but the file lacks it")

    def names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    @property
    def files_dir(self) -> Path:
        """The folder with the model's config, generation config and tokenizer files."""
        return self.path

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Load one tensor (CPU, stored dtype; a floating one cast to ``dtype`` when given)."""
        try:
            handle = self._open(self._files[name])
        except KeyError:
            raise ModelError(f"{self.path}: no tensor named {name}") from None
        tensor = handle[name] if isinstance(handle, dict) else handle.get_tensor(name)
        return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor

    def head(self, name: str, rows: int) -> torch.Tensor:
        """The first ``rows`` rows of a tensor (CPU, stored dtype); for safetensors only those
        bytes are read."""
        if not self.shape(name):
            return self.tensor(name)
        return self.rows(name, slice(0, rows))

    def rows(self, name: str, rows: slice) -> torch.Tensor:
        """Rows ``rows`` (dim 0) of a tensor with at least one dimension (CPU, stored dtype);
        for safetensors only those bytes are read."""
        handle = self._open(self._files[name])
        if isinstance(handle, dict):
            return handle[name][rows]
        return handle.get_slice(name)[rows]

    def shape(self, name: str) -> tuple[int, ...]:
        handle = self._open(self._files[name])
        if isinstance(handle, dict):
            return tuple(handle[name].shape)
        return tuple(handle.get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor (for safetensors, from the file's header: nothing is read)."""
        handle = self._open(self._files[name])
        if isinstance(handle, dict):
            return handle[name].dtype
        stored = handle.get_slice(name).get_dtype()
        if stored not in SAFETENSORS_DTYPES:
            raise ModelError(f"{self._files[name]}: {name}: unsupported dtype {stored}")
        return SAFETENSORS_DTYPES[stored]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, loaded (for small models and comparisons)."""
        return {name: self.tensor(name) for name in self.names()}

    def num_parameters(self) -> int:
        """Total element count, from the file headers (nothing is loaded)."""
        total = 0
        for name in self.names():
            count = 1
            for size in self.shape(name):
                count *= size
            total += count
        return total

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in dict.fromkeys(self._files.values()))
