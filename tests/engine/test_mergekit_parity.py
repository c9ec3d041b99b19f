"""Parity with mergekit 0.1.5, the reference implementation, on tiny random models.

The same YAML goes to ``evomerge merge`` and to mergekit's ``run_merge``; every output
tensor must match. Tolerances:

* float32 — exact equality is expected and asserted with ``atol=1e-6`` relative to the
  tensor scale (~0.02): both tools run the same float32 operations in the same order,
  the only freedom being the reduction order inside ``norm``/``sum`` kernels (SLERP,
  Model Stock), which can move a result by a few ulp (~1e-7 here).
* bfloat16 — one bf16 ulp at the value's magnitude (2**-7 relative): rounding the
  float32 intermediate of linear/SLERP to bf16 can flip the last bit when the two tools'
  float32 values differ by an ulp.

Magnitude trims (TIES, breadcrumbs) are only defined up to ties at the density cut, and
the two tools break ties differently (we sort stably so the result is device-independent;
mergekit's sort is not stable). ``ft - base`` rounds to the base's ulp, so ordinary
float32 fine-tunes do have tied magnitudes. The float32 tests therefore use families whose
task vectors have distinct magnitudes by construction (``distinct_deltas``); tie handling
itself is tested in ``test_merge_methods.py``. bf16 parity covers the non-trimming methods.
"""

from __future__ import annotations

import pytest
import torch
import yaml

from evomerge import merge, parse_config
from tests.conftest import read_folder
from tests.method_configs import method_configs as configs

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import MergeOptions, run_merge  # noqa: E402


def run_both(config: dict, tmp_path, dtype: str):
    config = dict(config, dtype=dtype)
    text = yaml.safe_dump(config, sort_keys=False)
    ours = read_folder(merge(parse_config(text), tmp_path / "evomerge"))
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mergekit"),
              MergeOptions(quiet=True, copy_tokenizer=False, write_model_card=False))
    theirs = read_folder(tmp_path / "mergekit")
    return ours, theirs


def assert_close(ours, theirs, dtype: str, promoted: bool = False):
    """``promoted``: mergekit returns float32 for half-precision inputs (arcee_fusion and
    ramplus_tl, whose float32 mask or factors promote the sum); evomerge rounds that to the
    working dtype, so the values are compared after the same rounding."""
    assert set(ours) == set(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        if promoted and b.dtype == torch.float32 and a.dtype != b.dtype:
            b = b.to(a.dtype)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if dtype == "float32":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
        else:
            tolerance = b.float().abs() * 2.0**-7 + 1e-6
            assert ((a.float() - b.float()).abs() <= tolerance).all(), name


NEW_METHODS = ["nuslerp", "nuslerp_base_row_wise", "nuslerp_rows", "multislerp", "multislerp_base",
               "karcher", "karcher_base", "sce", "sce_filtered", "nearswap", "arcee_fusion", "ram",
               "ramplus_tl", "sce_unselected"]
# In bfloat16: SCE's selection (a top-k of variances) has ties, as TIES's trim has, so only
# its untrimmed form; with a base, Multi-SLERP refuses the bf16 family in both tools (a task
# vector that rounds to zero everywhere makes the weighted directions vanish).
BFLOAT16_NEW_METHODS = [m for m in NEW_METHODS if m not in ("sce", "sce_filtered", "multislerp_base")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "ties_unnormalized",
                                    "breadcrumbs", "breadcrumbs_ties", "slerp", "model_stock",
                                    "model_stock_filter_wise", "passthrough", "slices_precedence",
                                    *NEW_METHODS])
def test_float32_parity(family_factory, tmp_path, arch, method):
    base, *ft = map(str, family_factory(arch, distinct_deltas=True))
    ours, theirs = run_both(configs(base, ft, arch)[method], tmp_path, "float32")
    assert_close(ours, theirs, "float32")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "slerp", "model_stock", "passthrough",
                                    *BFLOAT16_NEW_METHODS])
def test_bfloat16_parity(family_factory, tmp_path, method):
    base, *ft = map(str, family_factory("llama", torch.bfloat16))
    ours, theirs = run_both(configs(base, ft, "llama")[method], tmp_path, "bfloat16")
    assert_close(ours, theirs, "bfloat16", promoted=method in ("arcee_fusion", "ramplus_tl"))


def test_qwen2_ties_parity(family_factory, tmp_path):
    """A third family (attention biases) for the method with the most moving parts."""
    base, *ft = map(str, family_factory("qwen2", distinct_deltas=True))
    ours, theirs = run_both(configs(base, ft, "qwen2")["ties"], tmp_path, "float32")
    assert_close(ours, theirs, "float32")
