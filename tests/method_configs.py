"""Merge configs exercising every method with gradients, filters and slices (shared by tests)."""

from __future__ import annotations

ATTN_MLP = {"llama": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"), "qwen2": ("self_attn", "mlp")}


def method_configs(base: str, ft: list[str], arch: str = "llama") -> dict[str, dict]:
    """Named configs with gradients, filters and slices for every method (3 fine-tunes)."""
    attn, mlp = ATTN_MLP[arch]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": ft[0], "parameters": {"weight": [1.0, 0.2]}},
                {"model": ft[1], "parameters": {"weight": [{"filter": mlp, "value": 0.5}, {"value": 1.0}]}},
                {"model": base, "parameters": {"weight": 0.3}},
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": [0.5, 1.0, 0.2]}},
                       {"model": ft[1], "parameters": {"weight": -0.3}}],
            "parameters": {"lambda": 0.8},
        },
        "ties": {
            "merge_method": "ties", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": [0.2, 0.8], "density": [0.3, 0.9]}},
                       {"model": ft[1], "parameters": {"weight": [{"filter": attn, "value": 0.7}, {"value": 0.3}],
                                                       "density": 0.6}},
                       {"model": ft[2], "parameters": {"weight": 0.5}}],
            "parameters": {"density": 0.5, "normalize": True},
        },
        "ties_unnormalized": {
            "merge_method": "ties", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": 1.0, "density": 0.4}},
                       {"model": ft[1], "parameters": {"weight": 0.6, "density": 0.7}}],
            "parameters": {"normalize": False, "int8_mask": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": 0.6, "density": 0.8, "gamma": 0.05}},
                       {"model": ft[1], "parameters": {"weight": [0.2, 0.7], "density": [0.9, 0.5]}}],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5}} for m in ft],
            "parameters": {"density": [0.9, 0.6], "gamma": 0.02},
        },
        "slerp": {
            "merge_method": "slerp", "base_model": base,
            "slices": [{"sources": [{"model": base, "layer_range": [0, 4]},
                                    {"model": ft[0], "layer_range": [0, 4]}]}],
            "parameters": {"t": [{"filter": attn, "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": mlp, "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]},
        },
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": [0.3, 0.9], "density": [0.4, 0.8]}},
                       {"model": ft[1], "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": ft[2], "parameters": {"weight": 0.4, "density": 0.7}}],
        },
        "dare_linear": {
            "merge_method": "dare_linear", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.4, "density": 0.6}} for m in ft],
        },
        "della": {
            "merge_method": "della", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": 0.6, "density": [0.5, 0.8], "epsilon": 0.1}},
                       {"model": ft[1], "parameters": {"weight": 0.5, "density": 0.6}}],
            "parameters": {"lambda": 1.1},
        },
        "dare_ties_unrescaled": {
            "merge_method": "dare_ties", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": 0.8, "density": [0.3, 0.7]}},
                       {"model": ft[2], "parameters": {"weight": 0.6, "density": 0.5}}],
            "parameters": {"rescale": False},
        },
        "della_unrescaled": {
            "merge_method": "della", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.1}} for m in ft],
            "parameters": {"rescale": False},
        },
        "della_linear": {
            "merge_method": "della_linear", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": 0.4, "density": 0.7, "epsilon": 0.2}} for m in ft],
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": base,
            "models": [{"model": m} for m in ft],
        },
        "model_stock_filter_wise": {
            "merge_method": "model_stock", "base_model": base,
            "models": [{"model": m} for m in ft],
            "parameters": {"filter_wise": True},
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": base, "layer_range": [0, 3]}]},
                       {"sources": [{"model": ft[0], "layer_range": [1, 4],
                                     "parameters": {"scale": [{"filter": "o_proj" if arch != "gpt2" else "c_proj",
                                                               "value": 0.5}, {"value": 1.0}]}}]}],
        },
        "slices_precedence": {
            "merge_method": "task_arithmetic", "base_model": base,
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]},
                             {"model": ft[0], "layer_range": [0, 2], "parameters": {"weight": 0.9}},
                             {"model": ft[1], "layer_range": [0, 2]}],
                 "parameters": {"weight": 0.1}},
                {"sources": [{"model": base, "layer_range": [2, 4]},
                             {"model": ft[0], "layer_range": [2, 4]},
                             {"model": ft[1], "layer_range": [2, 4],
                              "parameters": {"weight": [{"filter": "nothing-matches", "value": 5.0}]}}],
                 "parameters": {"weight": [0.2, 0.6]}},
            ],
            "parameters": {"weight": 0.5},
        },
    }
