"""PEFT LoRA adapters for the tests, made with PEFT itself (the oracle) on a tiny base folder."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "up_proj"], "gpt2": ["c_attn", "c_fc", "mlp.c_proj"]}


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int = 0, r: int = 4, alpha: float = 16,
                 targets: list[str] | None = None, arch: str = "llama", b_std: float = 0.004,
                 dtype: torch.dtype = torch.float32, **options) -> Path:
    """Save a LoRA adapter of ``base_dir`` with random non-zero B (PEFT starts B at zero) to ``out_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets or TARGETS[arch],
                        fan_in_fan_out=arch == "gpt2", **options)
    peft_model = get_peft_model(model, config)
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
