"""Live ``transformers`` models: their decoder layer list, checkpoint names, parameter
replacement, per-layer input scales, loading.

Data-flow merges (Akiba et al., 2024) scale the hidden state that enters a layer. Standard
checkpoints cannot express that, so evomerge stores the scales in ``config.json``
(``evomerge_input_scales``) and installs them as forward pre-hooks; :func:`load_model`
does this for merged folders, and the materializer does it on its live model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from evomerge.engine.architecture import Family
from evomerge.engine.plan import INPUT_SCALES_KEY

_HOOK = "_evomerge_input_scale"


def layer_list_path(names: list[str], family: Family) -> str:
    """Dotted path of the decoder's layer ``ModuleList`` (e.g. ``model.layers``)."""
    for name in names:
        match = re.match(family.layer_prefix, name)
        if match:
            return name[:match.start(1) - 1]
    raise ValueError("the model has no decoder layers")


def checkpoint_names(model: nn.Module) -> dict[str, str]:
    """Checkpoint tensor name → the live model's parameter/buffer name.

    ``transformers`` 5 renames some weights on load (e.g. GPT-NeoX ``embed_out`` →
    ``lm_head``); the reverse of that renaming is what ``save_pretrained`` writes.
    """
    from transformers.core_model_loading import revert_weight_conversion

    live = dict(model.named_parameters(remove_duplicate=False))
    live.update(model.named_buffers())
    by_id = {id(tensor): name for name, tensor in live.items()}
    names = {name: by_id[id(tensor)]
             for name, tensor in revert_weight_conversion(model, dict(live)).items() if id(tensor) in by_id}
    return {**{name: name for name in live}, **names}


def set_parameter(module: nn.Module, dotted: str, parameter: nn.Parameter | None) -> None:
    """Make ``parameter`` (None: no parameter) ``module``'s parameter at dotted path ``dotted``,
    replacing the one there. Raises ``KeyError`` when the name is taken by a non-parameter."""
    owner_path, _, leaf = dotted.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    owner.register_parameter(leaf, parameter)


def _scale_hidden(module: nn.Module, args: tuple, kwargs: dict):
    scale = getattr(module, _HOOK)[0]
    if args:
        return (args[0] * scale, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}


def set_input_scale(layer: nn.Module, scale: float | None) -> None:
    """Multiply the hidden state entering ``layer`` by ``scale`` (None or 1: no hook)."""
    current = getattr(layer, _HOOK, None)
    if current is not None:
        current[1].remove()
        delattr(layer, _HOOK)
    if scale is not None and scale != 1:
        handle = layer.register_forward_pre_hook(_scale_hidden, with_kwargs=True)
        setattr(layer, _HOOK, (scale, handle))


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> nn.Module:
    """Load a (merged) model folder with ``transformers``, including evomerge input scales."""
    from transformers import AutoModelForCausalLM

    from evomerge.engine.architecture import family_for

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto").to(device).eval()
    scales = getattr(model.config, INPUT_SCALES_KEY, None)
    if scales:
        names = [name for name, _ in model.named_parameters()]
        layers = model.get_submodule(layer_list_path(names, family_for(model.config.to_dict())))
        for layer, scale in zip(layers, scales):
            set_input_scale(layer, scale)
    return model
