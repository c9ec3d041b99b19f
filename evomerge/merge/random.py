"""Counter-based random bits: the same mask on every device, order and thread count.

DARE and DELLA need Bernoulli masks. ``torch.bernoulli`` draws from a stateful,
device-specific generator, so a mask would depend on the device, on the order the
tensors are merged in and on what was drawn before. Here every element's random
32-bit word is a pure function of (key, element index), computed with exact integer
arithmetic in int64 (all products stay below 2**63), so CPU and CUDA agree bit for bit.
The key comes from (seed, output tensor name, input index).
"""

from __future__ import annotations

import hashlib

import torch

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22


def random_key(seed: int, tensor_name: str, input_index: int) -> int:
    """64-bit stream key for one input's mask of one output tensor."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{input_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons), a bijection on 32-bit words."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def random_words(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Uniform 32-bit words (as int64) for element indices ``start .. start+count-1``."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    k0, k1, k2 = key & _MASK32, (key >> 32) & _MASK32, (key * 0x9E3779B9 >> 7) & _MASK32
    low = _hash32((index & _MASK32) ^ k0)
    high = _hash32(((index >> 32) & _MASK32) ^ k2)
    return _hash32(low ^ high ^ k1)


def bernoulli_mask(probability: torch.Tensor | float, shape: torch.Size, key: int,
                   device: torch.device | str) -> torch.Tensor:
    """Boolean mask with P(True) = probability (a scalar or a tensor of ``shape``).

    An element is kept when its word is below ``probability * 2**32``; the comparison is
    done in float64, where both sides are exact, so it does not depend on the device.
    """
    numel = 1
    for size in shape:
        numel *= size
    mask = torch.empty(numel, dtype=torch.bool, device=device)
    if isinstance(probability, torch.Tensor):
        flat_p = probability.reshape(-1)
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        words = random_words(key, start, count, device).to(torch.float64)
        if isinstance(probability, torch.Tensor):
            threshold = flat_p[start:start + count].to(torch.float64) * 2.0**32
        else:
            threshold = float(probability) * 2.0**32
        torch.lt(words, threshold, out=mask[start:start + count])
    return mask.reshape(shape)
