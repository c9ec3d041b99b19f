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
        "nuslerp": {
            "merge_method": "nuslerp",
            "models": [{"model": ft[0], "parameters": {"weight": [0.2, 0.9]}},
                       {"model": ft[1], "parameters": {"weight": [{"filter": attn, "value": 0.3}, {"value": 0.6}]}}],
        },
        "nuslerp_base_row_wise": {
            "merge_method": "nuslerp", "base_model": base,
            "models": [{"model": ft[0], "parameters": {"weight": 0.7}},
                       {"model": ft[2], "parameters": {"weight": [0.5, 0.1]}}],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "nuslerp_rows": {
            "merge_method": "nuslerp", "base_model": base,
            "models": [{"model": ft[1], "parameters": {"weight": 0.4}},
                       {"model": ft[2], "parameters": {"weight": 0.4}}],
            "parameters": {"nuslerp_flatten": [{"filter": mlp, "value": False}, {"value": True}]},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [{"model": ft[0], "parameters": {"weight": [0.5, 1.0]}},
                       {"model": ft[1], "parameters": {"weight": [{"filter": mlp, "value": 0.2}, {"value": 0.7}]}},
                       {"model": ft[2], "parameters": {"weight": 0.3}}],
        },
        "multislerp_base": {
            "merge_method": "multislerp", "base_model": base,
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(ft, [0.6, 0.3, 0.4])],
            "parameters": {"normalize_weights": False, "eps": 1e-7},
        },
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": m} for m in ft],
            "parameters": {"max_iter": [{"filter": attn, "value": 3}, {"value": 10}], "tol": 1e-6},
        },
        "karcher_base": {
            "merge_method": "karcher", "base_model": base,
            "models": [{"model": ft[0]}, {"model": ft[1]}],
        },
        "sce": {
            "merge_method": "sce", "base_model": base,
            "models": [{"model": m} for m in ft],
            "parameters": {"select_topk": [0.3, 0.9]},
        },
        "sce_filtered": {
            "merge_method": "sce", "base_model": base,
            "models": [{"model": ft[2]}, {"model": ft[0]}, {"model": ft[1]}],
            "parameters": {"select_topk": [{"filter": attn, "value": 0.5}, {"value": 1.0}], "int8_mask": True},
        },
        "sce_unselected": {
            "merge_method": "sce", "base_model": base,
            "models": [{"model": m} for m in ft],
        },
        "nearswap": {
            "merge_method": "nearswap", "base_model": base,
            "models": [{"model": ft[0]}],
            "parameters": {"t": [{"filter": mlp, "value": [0.0001, 0.01]}, {"value": 0.001}]},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion", "base_model": base,
            "models": [{"model": ft[1]}],
        },
        "ram": {
            "merge_method": "ram", "base_model": base,
            "models": [{"model": m} for m in ft],
            "parameters": {"epsilon": [{"filter": attn, "value": 0.005}, {"value": [0.001, 0.01]}]},
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl", "base_model": base,
            "models": [{"model": m} for m in ft],
            "parameters": {"r": [0.1, 0.5], "alpha": [{"filter": mlp, "value": 0.4}, {"value": 0.2}],
                           "epsilon": 0.003},
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
