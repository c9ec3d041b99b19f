"""Counter-based random bits: the same mask on every device, order and thread count.

DARE and DELLA need Bernoulli masks. ``torch.bernoulli`` draws from a stateful,
device-specific generator, so a mask would depend on the device, on the order the
tensors are merged in and on what was drawn before. Here every element's random
32-bit word is a pure function of (key, element index), computed with exact integer
arithmetic in int64 (all products stay below 2**63), so CPU and CUDA agree bit for bit.
The key comes from (seed, output tensor name, input index).

A stream's words do not depend on the keep probability, so a caller that draws masks of
the same stream at many densities (the in-memory materializer) may compute them once with
:func:`stream_words` and threshold them with :func:`keep_flags`, which gives exactly
:func:`bernoulli_mask`'s mask. Nothing needs caching for correctness: any range of a stream
is recomputed from its first index (``stream_words(..., start=)``), e.g. for one block.
"""

from __future__ import annotations

import hashlib
import math

import torch

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 22


def random_key(seed: int, tensor_name: str, input_index: int) -> int:
    """64-bit stream key for one input's mask of one output tensor."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{input_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mul32_(x: torch.Tensor, constant: int, tmp: torch.Tensor) -> torch.Tensor:
    """x := (x * constant) mod 2**32 for x in [0, 2**32), without int64 overflow (in place)."""
    torch.mul(x, constant >> 16, out=tmp).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(constant & 0xFFFF).add_(tmp).bitwise_and_(_MASK32)


def _xorshift_(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    return x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=tmp))


def _hash32_(x: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons), a bijection on 32-bit words (in place)."""
    _xorshift_(x, 16, tmp)
    _mul32_(x, 0x7FEB352D, tmp)
    _xorshift_(x, 15, tmp)
    _mul32_(x, 0x846CA68B, tmp)
    return _xorshift_(x, 16, tmp)


def random_words(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """Uniform 32-bit words (as int64) for element indices ``start .. start+count-1``."""
    index = torch.arange(start, start + count, dtype=torch.int64, device=device)
    k0, k1, k2 = key & _MASK32, (key >> 32) & _MASK32, (key * 0x9E3779B9 >> 7) & _MASK32
    tmp = torch.empty_like(index)
    high = _hash32_(torch.bitwise_right_shift(index, 32).bitwise_and_(_MASK32).bitwise_xor_(k2), tmp)
    low = _hash32_(index.bitwise_and_(_MASK32).bitwise_xor_(k0), tmp)
    return _hash32_(low.bitwise_xor_(high).bitwise_xor_(k1), tmp)


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


def stream_words(key: int, numel: int, device: torch.device | str, *, start: int = 0) -> torch.Tensor:
    """The ``numel`` words of stream ``key`` from element index ``start`` on, as int32
    ``w - 2**31`` (4 bytes each, cacheable)."""
    words = torch.empty(numel, dtype=torch.int32, device=device)
    for first in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - first)
        words[first:first + count] = random_words(key, start + first, count, device) - 2**31
    return words


def keep_flags(probability: torch.Tensor | float, words: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`bernoulli_mask` from precomputed :func:`stream_words` (shaped like ``words``: bool,
    or 1/0 in ``out``'s dtype).

    For a scalar probability, ``w < p·2**32`` ⇔ ``w < ceil(p·2**32)`` for an integer word
    ``w``: one int32 comparison. A tensor probability is compared exactly in float64.
    """
    out = torch.empty(words.shape, dtype=torch.bool, device=words.device) if out is None else out
    if isinstance(probability, torch.Tensor):
        flat_out, flat_p, flat_w = out.view(-1), probability.reshape(-1), words.reshape(-1)
        for start in range(0, flat_w.numel(), _CHUNK):
            stop = start + _CHUNK
            threshold = flat_p[start:stop].to(torch.float64) * 2.0**32
            torch.lt(flat_w[start:stop].to(torch.float64) + 2.0**31, threshold, out=flat_out[start:stop])
        return out
    threshold = math.ceil(float(probability) * 2.0**32)
    if threshold <= 0:
        return out.fill_(False)
    if threshold >= 2**32:
        return out.fill_(True)
    return torch.lt(words, threshold - 2**31, out=out)
