"""Closed forms and edge cases of the methods added for mergekit 0.1.5 parity (nuslerp,
multislerp, karcher, sce, nearswap, arcee_fusion, ram, ramplus_tl); their parity with mergekit
itself is in ``tests/engine/test_mergekit_parity.py``."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import ModelError
from evomerge.methods import (arcee_fusion_merge, karcher_merge, multislerp_merge, nearswap_merge, nuslerp,
                              nuslerp_merge, ram_merge, sce_merge)
from evomerge.methods.fusion import QUANTILE_SAMPLE, upper_fence
from evomerge.methods.sce import variance_mask, variance_order


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 8, generator=generator) for _ in range(4)]


def test_nuslerp_endpoints_and_weights(tensors):
    a, b = tensors[:2]
    for flatten, row_wise in [(True, False), (False, False), (False, True)]:
        torch.testing.assert_close(nuslerp(0.0, a, b, flatten=flatten, row_wise=row_wise), a)
        torch.testing.assert_close(nuslerp(1.0, a, b, flatten=flatten, row_wise=row_wise), b)
    # t = w1 / (w0 + w1); weights summing to ~0 give the midpoint
    torch.testing.assert_close(nuslerp_merge([a, b], [1.0, 3.0]), nuslerp(0.75, a, b))
    torch.testing.assert_close(nuslerp_merge([a, b], [1.0, -1.0]), nuslerp(0.5, a, b))
    # collinear inputs interpolate linearly
    torch.testing.assert_close(nuslerp(0.25, a, 2 * a), 0.75 * a + 0.5 * a)


def test_multislerp_of_one_and_of_equal_inputs(tensors):
    a, base = tensors[0], tensors[3]
    assert multislerp_merge([a], [0.3]) is a
    torch.testing.assert_close(multislerp_merge([a, a, a], [0.2, 0.3, 0.5]), a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multislerp_merge([a, a], [1.0, 1.0], base), a, atol=1e-5, rtol=1e-5)


def test_multislerp_refuses_cancelling_directions(tensors):
    a = tensors[0]
    with pytest.raises(ModelError, match="cancel out"):
        multislerp_merge([a, -a, a, -a], [1.0, 1.0, 1.0, 1.0])
    torch.testing.assert_close(multislerp_merge([a, -a], [1.0, 1.0]), torch.zeros_like(a))  # linear fallback


def test_karcher_mean_of_equal_directions_keeps_them_and_averages_norms(tensors):
    a = tensors[0]
    torch.testing.assert_close(karcher_merge([a, 3 * a]), 2 * a, atol=1e-5, rtol=1e-5)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(karcher_merge([a, zero]), 0.5 * a, atol=1e-5, rtol=1e-5)  # zero: only its norm
    assert torch.equal(karcher_merge([zero, zero]), zero)


def test_sce_selection_and_consensus(tensors):
    base, *sources = tensors
    deltas = torch.stack([s - base for s in sources])
    for fraction in (0.0, 0.3, 0.77, 1.0):
        mask = variance_mask(deltas, fraction)
        assert int(mask.sum()) == int(deltas[0].numel() * fraction)
        if 0 < fraction < 1:  # the cached order selects the same elements
            assert torch.equal(variance_mask(deltas, fraction, order=variance_order(base, sources)), mask)
    torch.testing.assert_close(sce_merge(base, sources, select_topk=0.0), base)
    # one source: the sign election keeps all of it, so the merge is that source
    torch.testing.assert_close(sce_merge(base, sources[:1]), sources[0])


def test_nearswap_swaps_near_elements_only():
    base = torch.tensor([0.0, 0.0, 0.0])
    other = torch.tensor([0.001, 0.1, -1.0])
    torch.testing.assert_close(nearswap_merge(0.01, base, other), torch.tensor([0.001, 0.01, -0.01]))
    torch.testing.assert_close(nearswap_merge(0.0, base, other), base)


def test_arcee_fusion_takes_outlying_importance_and_samples_reproducibly(tensors):
    base, source = tensors[:2]
    merged = arcee_fusion_merge(base, source)
    taken = merged != base
    assert 0 < int(taken.sum()) < base.numel()
    torch.testing.assert_close(merged[taken], source[taken])  # base + (source - base), rounded
    big = torch.rand(QUANTILE_SAMPLE + 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(upper_fence(big, key=5), upper_fence(big, key=5))  # same key, same sample
    assert not torch.equal(upper_fence(big, key=5), upper_fence(big, key=6))


def test_ram_means_shared_changes_and_keeps_unique_ones():
    base = torch.zeros(4)
    sources = [torch.tensor([1.0, 2.0, 0.0, 1e-6]), torch.tensor([3.0, 0.0, 0.0, 1e-6])]
    torch.testing.assert_close(ram_merge(base, sources), torch.tensor([2.0, 2.0, 0.0, 0.0]))
    # RAM+: unique changes scaled by 1 + r * min(alpha, shared / unique): model 0 shares 1, owns 1
    plus = ram_merge(base, sources, plus=(0.5, 0.4))
    torch.testing.assert_close(plus, torch.tensor([2.0, 2.0 * (1 + 0.5 * 0.4), 0.0, 0.0]))
