"""Atomic writing of a Hugging Face model folder: sharded safetensors, index, config, tokenizer.

Everything is written into a hidden temporary folder next to the destination and renamed
into place at the end, so an interrupted or failed merge leaves no half-written model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from evomerge.errors import EvomergeError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "vocab.txt",
)
DEFAULT_SHARD_SIZE = 5 * 1000**3
_UNITS = {"": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str | int) -> int:
    """'5GB', '500M', '2.5G' or a byte count → bytes (decimal units, like mergekit)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B?\s*", text.upper())
        if not match:
            raise EvomergeError(f"--out-shard-size: expected a size like 5GB or 500M, got {text!r}")
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise EvomergeError(f"--out-shard-size: must be positive, got {text!r}")
    return size


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse an existing non-empty destination unless ``force``."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise EvomergeError(f"output folder {out_dir} exists and is not empty (use --force to replace it)")


class ModelWriter:
    """Collects tensors into shards in a temporary folder; :meth:`commit` renames it into place."""

    def __init__(self, out_dir: str | Path, *, shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False):
        self.out_dir = Path(out_dir).absolute()
        check_output_dir(self.out_dir, force)
        self.shard_size = shard_size
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir()
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._pending_storages: set[int] = set()
        self._shards: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.shard_size:
            self._flush()
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._pending_storages:  # e.g. a repeated layer read twice from one mmap
            tensor = tensor.clone()
        self._pending_storages.add(tensor.untyped_storage().data_ptr())
        self._pending[name] = tensor
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        file_name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._pending, str(self.tmp_dir / file_name), metadata={"format": "pt"})
        self._shards.append((file_name, list(self._pending)))
        self._pending, self._pending_bytes, self._pending_storages = {}, 0, set()

    def write_json(self, file_name: str, data: dict) -> None:
        (self.tmp_dir / file_name).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    def write_text(self, file_name: str, text: str) -> None:
        (self.tmp_dir / file_name).write_text(text)

    def copy_files(self, source_dir: Path, names: tuple[str, ...]) -> list[str]:
        copied = []
        for name in names:
            if (source_dir / name).is_file():
                shutil.copy2(source_dir / name, self.tmp_dir / name)
                copied.append(name)
        return copied

    def commit(self) -> Path:
        """Finish the shards and the index, then move the folder into place."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self.tmp_dir / self._shards[0][0], self.tmp_dir / "model.safetensors")
        else:
            weight_map = {}
            for i, (file_name, names) in enumerate(self._shards):
                final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
                os.replace(self.tmp_dir / file_name, self.tmp_dir / final)
                weight_map.update({name: final for name in names})
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir) if self.out_dir.is_dir() else self.out_dir.unlink()
        os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
