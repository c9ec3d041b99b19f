"""PEFT LoRA adapters for the tests, made with PEFT itself (the oracle) on tiny synthetic bases.

``lora_family(arch)`` (a session fixture, registered in ``tests/conftest.py``): a base, three
adapters of it with different options (rank, alpha, rsLoRA, rank/alpha patterns; GPT-2's
``fan_in_fan_out`` Conv1D layers) and random non-zero B (PEFT starts B at zero, which would
make every check trivial), and for each adapter PEFT's ``merge_and_unload`` saved as a full
model folder (the dense equivalent).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ADAPTERS = {
    "llama": [dict(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj", "up_proj"]),
              dict(r=8, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"], use_rslora=True),
              dict(r=2, alpha=4, targets=["q_proj", "down_proj"], rank_pattern={"down_proj": 6},
                   alpha_pattern={"q_proj": 10})],
    "gpt2": [dict(r=4, alpha=16, targets=["c_attn", "c_fc"]),
             dict(r=2, alpha=8, targets=["c_attn", "mlp.c_proj"]),
             dict(r=6, alpha=6, targets=["c_fc", "mlp.c_proj"])],
}


@dataclass
class LoraFamily:
    base: str
    adapters: list[str]
    dense: list[str]  # PEFT's merge_and_unload of each adapter, saved


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, r: int = 4, alpha: float = 16,
                 targets: list[str], b_std: float = 0.004, dtype: torch.dtype = torch.float32,
                 **options) -> Path:
    """Save a LoRA adapter of ``base_dir`` with random non-zero B to ``out_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **options))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, b_std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_merged(base_dir: str | Path, adapter_dir: str | Path, dtype: torch.dtype = torch.float32):
    """PEFT's own ``merge_and_unload`` of the adapter on its base: the merged model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory):
    """``lora_family(arch)`` → :class:`LoraFamily`, built once per architecture."""
    from evomerge.zoo.synthetic import build_family, save_tokenizer

    cache: dict[str, LoraFamily] = {}

    def family(arch: str = "llama") -> LoraFamily:
        if arch not in cache:
            out = tmp_path_factory.mktemp(f"lora-{arch}")
            base = build_family(out, arch, sources=0, seed=11)[0]
            adapters, dense = [], []
            for i, spec in enumerate(ADAPTERS[arch]):
                spec = dict(spec, fan_in_fan_out=arch == "gpt2")
                adapters.append(str(make_adapter(base, out / f"adapter{i}", seed=20 + i, **spec)))
                merged = out / f"dense{i}"
                peft_merged(base, adapters[-1]).save_pretrained(merged)
                save_tokenizer(merged, 256)
                dense.append(str(merged))
            cache[arch] = LoraFamily(str(base), adapters, dense)
        return cache[arch]

    return family
