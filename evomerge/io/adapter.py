"""PEFT LoRA adapters as model sources: reading, validation, and the dense view over the base.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``) with, per adapted linear layer ``<module>``, the tensors
``base_model.model.<module>.lora_A.weight`` (r × in) and ``...lora_B.weight`` (out × r).
The adapted model's weight is ``W + scale · B @ A`` with ``scale = lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` give
per-module values, matched as PEFT matches them), transposed for ``fan_in_fan_out``
layers (GPT-2's ``Conv1D``).

:func:`lora_dense` is the one formula, used by the lazy view :class:`AdapterFolder` (which
the merge engine reads like any model folder) and by the materializer (which keeps the
factors resident and forms each tensor in its scratch): in a working dtype ``d`` it is
``round_d(W_d + scale · (B @ A))``, where ``W_d`` is the base weight in ``d`` and the
product and the sum are computed in ``c = promote(d, float32)`` (one rounding). This is
PEFT's ``merge_and_unload`` bit for bit (``W += (B @ A) * scale``, on CPU): in float32, and
in bf16/fp16 for a base loaded in that dtype (PEFT keeps the factors in float32 by default,
``autocast_adapter_dtype``).

Refused with a :class:`~evomerge.errors.ModelError` naming the file and field: another
``peft_type`` than LORA, LoRA variants (DoRA ``use_dora``, aLoRA, ...), ``lora_bias``,
``bias`` other than ``none``, ``modules_to_save``, ``trainable_token_indices``,
``layer_replication``, initializations that change the base (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA), embedding/convolution LoRA tensors, and factors that do not fit the base's shapes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from evomerge.errors import ModelError
from evomerge.io.reader import ModelFolder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
_FACTOR = re.compile(r"(.+)\.lora_([AB])\.weight")
# options whose presence (a truthy value) changes what the adapter computes beyond W + s·B@A
_UNSUPPORTED = ("use_dora", "velora_config", "alora_invocation_tokens", "monteclora_config", "use_bdlora",
                "arrow_config", "kasa_config", "use_qalora", "lora_bias", "modules_to_save",
                "trainable_token_indices", "layer_replication", "target_parameters", "megatron_config")
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: ``W + scale · B @ A`` (transposed when ``transpose``)."""

    a: torch.Tensor  # r × in
    b: torch.Tensor  # out × r
    scale: float
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the weight the factors adapt."""
        shape = (self.b.shape[0], self.a.shape[1])
        return shape[::-1] if self.transpose else shape

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def lora_dense(weight: torch.Tensor, factors: LoraFactors, dtype: torch.dtype | None = None, *,
               out: torch.Tensor | None = None, product: torch.Tensor | None = None) -> torch.Tensor:
    """``round_dtype(weight + scale · B @ A)``, computed in ``promote(dtype, float32)``.

    ``dtype``: the result's (default: ``weight``'s); ``out``: where to write it (that shape and
    dtype); ``product``: a scratch tensor of ``B @ A``'s shape in the compute dtype. Neither
    changes the result. ``weight`` and the factors must be on one device.
    """
    dtype = dtype or weight.dtype
    compute = torch.promote_types(dtype, torch.float32)
    a, b = factors.a.to(compute), factors.b.to(compute)
    delta = torch.matmul(b, a, out=product)
    delta.mul_(factors.scale)
    if factors.transpose:
        delta = delta.T
    delta.add_(weight)  # weight upcast exactly; the one rounding is the cast below
    if out is None:
        return delta.to(dtype, copy=product is not None).contiguous()
    return out.copy_(delta)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key matching the module name's end."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder, read and checked: its config and its factors by weight name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_path = self.path / ADAPTER_CONFIG
        if not self.path.is_dir():
            raise ModelError(f"adapter folder not found: {self.path}")
        try:
            self.config = json.loads(config_path.read_text())
        except FileNotFoundError:
            raise ModelError(f"{config_path}: missing (not a PEFT adapter folder)") from None
        except (OSError, json.JSONDecodeError) as error:
            raise ModelError(f"{config_path}: unreadable ({getattr(error, 'msg', error)})") from None
        if not isinstance(self.config, dict):
            raise ModelError(f"{config_path}: expected a JSON object")
        self._check_config(config_path)
        self.factors = self._read_factors()

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def _check_config(self, config_path: Path) -> None:
        config = self.config

        def refuse(field: str, why: str):
            raise ModelError(f"{config_path}: {field}: {why}")

        if config.get("peft_type", "LORA") != "LORA":
            refuse("peft_type", f"{config['peft_type']!r} is not supported (only LORA adapters)")
        for field in _UNSUPPORTED:
            if config.get(field):
                refuse(field, f"{config[field]!r} is not supported (plain LoRA only: W + scale·B@A)")
        if config.get("bias", "none") != "none":
            refuse("bias", f"{config['bias']!r} is not supported (adapters with trained biases); expected 'none'")
        init = config.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            refuse("init_lora_weights", f"{init!r} changes the base weights; convert the adapter to plain "
                   "LoRA first (PEFT: save_pretrained(path_initial_model_for_weight_conversion=...))")
        for field in ("r", "lora_alpha"):
            if not isinstance(config.get(field, 8), (int, float)) or config.get(field, 8) <= 0:
                refuse(field, f"expected a positive number, got {config.get(field)!r}")
        for field in ("rank_pattern", "alpha_pattern"):
            if not isinstance(config.get(field) or {}, dict):
                refuse(field, f"expected a mapping, got {config.get(field)!r}")

    def _weights(self) -> tuple[Path, dict[str, torch.Tensor]]:
        for name in ADAPTER_WEIGHTS:
            file = self.path / name
            if not file.exists():
                continue
            try:
                if file.suffix == ".safetensors":
                    with safe_open(str(file), framework="pt", device="cpu") as handle:
                        return file, {key: handle.get_tensor(key) for key in handle.keys()}
                return file, torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:  # safetensors/torch raise several types for bad files
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise ModelError(f"{file}: corrupt or unreadable adapter weights ({reason})") from None
        raise ModelError(f"{self.path}: no {' or '.join(ADAPTER_WEIGHTS)}")

    def _read_factors(self) -> dict[str, LoraFactors]:
        file, tensors = self._weights()
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            match = _FACTOR.fullmatch(key.removeprefix(_PREFIX))
            if not key.startswith(_PREFIX) or match is None or not isinstance(tensor, torch.Tensor):
                raise ModelError(f"{file}: {key}: unsupported tensor (only base_model.model.<module>.lora_A/"
                                 "lora_B.weight of linear layers)")
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        if not pairs:
            raise ModelError(f"{file}: holds no LoRA factors")
        config = self.config
        factors = {}
        for module, pair in pairs.items():
            if set(pair) != {"A", "B"}:
                missing = "lora_B" if "A" in pair else "lora_A"
                raise ModelError(f"{file}: {_PREFIX}{module}: has no {missing}.weight")
            a, b = pair["A"], pair["B"]
            rank = _pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != rank:
                raise ModelError(f"{file}: {_PREFIX}{module}: lora_A {list(a.shape)} and lora_B "
                                 f"{list(b.shape)} are not rank-{rank} factors (r / rank_pattern)")
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            factors[f"{module}.weight"] = LoraFactors(a, b, scale, bool(config.get("fan_in_fan_out")))
        return factors

    def num_parameters(self) -> int:
        return sum(f.a.numel() + f.b.numel() for f in self.factors.values())


class AdapterFolder:
    """The adapted model as a read-only model folder: the base's tensors, with ``W + scale·B@A``
    formed on read for the adapted weights (:func:`lora_dense`). Same interface as
    :class:`~evomerge.io.reader.ModelFolder`; ``path`` is the adapter folder, ``files_dir`` the
    base's (config, generation config and tokenizer files)."""

    def __init__(self, adapter: LoraAdapter | str | Path, base: ModelFolder, reference: str | None = None):
        self.adapter = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter(adapter)
        self.base = base
        self.path = self.adapter.path
        self.reference = reference or str(self.path)
        self.config = base.config
        weights = next(self.path / n for n in ADAPTER_WEIGHTS if (self.path / n).exists())
        for name, factors in self.adapter.factors.items():
            module = _PREFIX + name.removesuffix(".weight")
            if name not in base:
                raise ModelError(f"{weights}: {module}: the base {base.path} has no tensor {name} "
                                 "(an adapter of another model?)")
            if tuple(base.shape(name)) != factors.shape:
                raise ModelError(f"{weights}: {module}: adapts a {list(factors.shape)} weight but {name} of the "
                                 f"base {base.path} is {list(base.shape(name))} (an adapter of another model?)")

    @property
    def files_dir(self) -> Path:
        return self.base.files_dir

    @property
    def factors(self) -> dict[str, LoraFactors]:
        return self.adapter.factors

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor (CPU); adapted weights formed in ``dtype`` (default: the base's stored dtype)."""
        factors = self.adapter.factors.get(name)
        if factors is None:
            return self.base.tensor(name, dtype)
        return lora_dense(self.base.tensor(name, dtype), factors, dtype)

    def head(self, name: str, rows: int) -> torch.Tensor:
        factors = self.adapter.factors.get(name)
        if factors is None or factors.transpose:
            return self.base.head(name, rows) if factors is None else self.tensor(name)[:rows]
        rows = min(rows, factors.b.shape[0])
        top = LoraFactors(factors.a, factors.b[:rows], factors.scale)
        return lora_dense(self.base.head(name, rows), top)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.names()}

    def num_parameters(self) -> int:
        return self.base.num_parameters()

    def total_bytes(self) -> int:
        return self.base.total_bytes()
