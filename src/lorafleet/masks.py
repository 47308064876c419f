"""Keyed adapter-dropout masks: every element a pure function of where it is, drawn from no RNG stream.

Legend: T tokens of a batch, S rows of one segment, I input features of the adapted projection.

A dropout mask element says whether adapter input feature ``i`` of one token is kept. It is computed, never
drawn: from the sequence's 64-bit *key* (made by ``sequence_key`` from the task's seed and the sequence's
identity in the task's data order), the token's position in its sequence, the projection's *site* (layer
index and module id) and the feature index. So a task's masks do not depend on what trains beside it, on
the micro-batch split, on the pipeline stage or on a resume, and the backward recomputes them instead of
keeping [T, I] booleans. The same integer arithmetic runs in torch (CPU and CUDA) and in the Triton kernels
(``lorafleet/lora/kernels/_triton.py``): every value is an unsigned 32-bit number held in an int64 and masked back
to 32 bits after each multiply, with multipliers given as signed numbers of magnitude below 2^31, so no
product leaves int64's range and the results are exact and identical everywhere.

Semantics (M32 = 2^32 - 1, M64 = 2^64 - 1, ``^`` xor, ``>>`` logical shift, integers unbounded):

    mix32(x):                              # Chris Wellons' "lowbias32", a bijection of [0, 2^32)
        x ^= x >> 16; x = (x * 0x7FEB352D) & M32
        x ^= x >> 15; x = (x * 0x846CA68B) & M32
        x ^= x >> 16; return x
    splitmix64(z):                         # Steele et al.'s SplitMix64 finalizer
        z = (z + 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    sequence_key(seed, epoch, index, role):            # 64 bits, one per packed sequence
        z = splitmix64(seed & M64)
        for v in (epoch, index, crc32(role as UTF-8)): z = splitmix64(z ^ v)
        return z
    token_row(key, pos) = mix32(mix32(mix32((key & M32) ^ 0x2545F491) ^ (key >> 32)) ^ pos)
    site_row(row, layer, module) = mix32(row ^ mix32((16 * layer + module) ^ 0x9E3779B9))
    feature(i) = mix32(i ^ 0x6A09E667)
    u(key, pos, layer, module, i):                      # mix32 without its last xorshift (see below)
        x = site_row(token_row(key, pos), layer, module) ^ feature(i)
        x ^= x >> 16; x = (x * 0x7FEB352D) & M32
        x ^= x >> 15; x = (x * 0x846CA68B) & M32
        return x
    keep iff u < threshold(p) = floor((1 - p) * 2^32)   # keep rate (1 - p) to within 2^-32
    dropout(x)[t, i] = x[t, i] / (1 - p) if keep else 0

``seed`` is the task's dropout seed (``train/engine.py`` derives it from the run's ``seed`` and the task's
name), ``epoch`` and ``index`` the sequence's example in the task's data order (``index`` = its place in
that epoch's shuffled order), ``role`` the sequence's role (``sft``, ``chosen``, ``rejected``, ...;
``train/tasks.py``), ``pos`` the token's position in its sequence, ``layer`` the decoder layer's index in
the full model (a pipeline stage keeps the full model's numbering), ``module`` the projection's index in
``TARGET_MODULES`` (q_proj 0, k_proj 1, v_proj 2, o_proj 3, qkv_proj 4, gate_proj 5, up_proj 6,
down_proj 7, gate_up_proj 8; new names are appended, so ids never change) and ``i``
the input feature. ``reference_keep`` is this definition on Python integers (the tests' oracle).

Cost: the row and feature values are hashed once per row and per feature; each element then costs one xor,
two multiplies and one xorshift (the first xorshift is linear, ``(r ^ f) ^ ((r ^ f) >> 16)`` =
``(r ^ r >> 16) ^ (f ^ f >> 16)``, so it is applied to the row and feature values; the last xorshift of
mix32 would only reshuffle the low 16 bits of a value compared against a threshold, so it is left out).
``keep_mask`` runs these on int32 tensors holding the same 32 bits (wrapping
multiplies, a masked arithmetic shift, a signed compare after flipping the top bit): 8 int32 passes in
cache-sized row chunks, about 2.5 ns per element on one thread of an AVX2 CPU (half the time of the same
passes in int64, which have no vector multiply there), well under ``torch.bernoulli_``
(``benchmarks/fused_op.py --masks``).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "MaskSite",
    "keep_mask",
    "keep_threshold",
    "reference_keep",
    "sequence_key",
    "site_rows",
    "token_rows",
]

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
MIX_C1 = 0x7FEB352D
MIX_C2 = 0x846CA68B
# The multipliers as int64 factors: x * c and x * (c - 2^32) agree mod 2^32, and |c - 2^32| < 2^31.
MIX_C1_SIGNED = MIX_C1
MIX_C2_SIGNED = MIX_C2 - (1 << 32)
# The same multipliers as int32 factors (wrapping int32 products keep the low 32 bits), and the top bit.
_C1_I32 = MIX_C1 - (1 << 32) if MIX_C1 >= 1 << 31 else MIX_C1
_C2_I32 = MIX_C2 - (1 << 32) if MIX_C2 >= 1 << 31 else MIX_C2
_TOP_I32 = -(1 << 31)
SALT_KEY, SALT_SITE, SALT_FEATURE = 0x2545F491, 0x9E3779B9, 0x6A09E667
MAX_MODULES = 16  # module ids are in [0, 16): site = 16 * layer + module
# Elements per row chunk of ``keep_mask``: its int64 scratch (two chunks, 2 MiB) stays in cache.
_CHUNK_ELEMENTS = 1 << 17


def _mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * MIX_C1) & M32
    x ^= x >> 15
    x = (x * MIX_C2) & M32
    return x ^ (x >> 16)


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _check_int(name: str, value: int, bound: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"dropout mask: {name} must be an integer in [0, {bound}), got {value!r}")
    return value


def sequence_key(seed: int, epoch: int, index: int, role: str = "") -> int:
    """The 64-bit dropout key of one packed sequence (an int in [0, 2^64)); see the module's Semantics.

    Args:
        seed: the task's dropout seed, any integer (taken mod 2^64).
        epoch: the pass over the task's data the example belongs to, >= 0.
        index: the example's place in that epoch's (shuffled) order, >= 0.
        role: the sequence's role, e.g. ``sft``, ``chosen``, ``rejected`` (``train/tasks.py``).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"dropout mask: seed must be an integer, got {seed!r}")
    z = _splitmix64(seed & M64)
    for v in (_check_int("epoch", epoch, 1 << 64), _check_int("index", index, 1 << 64)):
        z = _splitmix64(z ^ v)
    return _splitmix64(z ^ zlib.crc32(role.encode("utf-8")))


@dataclass(frozen=True)
class MaskSite:
    """Where a fused projection sits: ``layer`` (index in the full model) and ``module`` (id in [0, 16)).

    ``lorafleet.lora.add_adapter`` sets it on every projection it adapts (``module`` = the index of the
    projection's name in ``TARGET_MODULES``); a layer built by hand gets ``MaskSite(0, 0)``.
    """

    layer: int = 0
    module: int = 0

    def __post_init__(self) -> None:
        _check_int("module", self.module, MAX_MODULES)
        _check_int("layer", self.layer, (M32 + 1) // MAX_MODULES)

    @property
    def value(self) -> int:
        """mix32((16 * layer + module) ^ SALT_SITE), the site's 32-bit constant."""
        return _mix32((MAX_MODULES * self.layer + self.module) ^ SALT_SITE)


def keep_threshold(p: float) -> int:
    """floor((1 - p) * 2^32): an element is kept iff its hash is below it (p = 0: 2^32, every element)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    return min(M32 + 1, int((1.0 - p) * float(M32 + 1)))


def reference_keep(key: int, position: int, site: MaskSite, feature: int, p: float) -> bool:
    """The Semantics on Python integers, one element at a time (the oracle of the vectorized version)."""
    row = _mix32(_mix32(_mix32((key & M32) ^ SALT_KEY) ^ (key >> 32)) ^ (position & M32))
    x = _mix32(row ^ site.value) ^ _mix32(feature ^ SALT_FEATURE)
    x ^= x >> 16
    x = (x * MIX_C1) & M32
    x ^= x >> 15
    x = (x * MIX_C2) & M32
    return x < keep_threshold(p)


def _mix32_(u: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """mix32 in place on an int64 tensor of values in [0, 2^32); ``tmp`` is scratch of the same shape."""
    torch.bitwise_right_shift(u, 16, out=tmp)
    u.bitwise_xor_(tmp)
    u.mul_(MIX_C1_SIGNED).bitwise_and_(M32)
    torch.bitwise_right_shift(u, 15, out=tmp)
    u.bitwise_xor_(tmp)
    u.mul_(MIX_C2_SIGNED).bitwise_and_(M32)
    torch.bitwise_right_shift(u, 16, out=tmp)
    return u.bitwise_xor_(tmp)


def _mixed(u: torch.Tensor) -> torch.Tensor:
    return _mix32_(u, torch.empty_like(u))


def token_rows(keys: Sequence[int], seq_lens: Sequence[int], positions_T: torch.Tensor) -> torch.Tensor:
    """token_row(key of the token's sequence, its position) for every token: [T] int64 in [0, 2^32).

    Args:
        keys: one ``sequence_key`` per sequence, in batch order.
        seq_lens: the sequences' lengths (they sum to T).
        positions_T: [T] each token's position in its own sequence.
    """
    if len(keys) != len(seq_lens) or sum(seq_lens) != positions_T.numel():
        raise ValueError(
            f"dropout keys: {len(keys)} keys for {len(seq_lens)} sequences of {sum(seq_lens)} tokens "
            f"({positions_T.numel()} positions); give one key per sequence"
        )
    dev = positions_T.device
    k = [_check_int("sequence key", int(key), 1 << 64) for key in keys]
    lens = torch.tensor(list(seq_lens), dtype=torch.long, device=dev)
    lo = torch.tensor([(v & M32) ^ SALT_KEY for v in k], dtype=torch.long, device=dev)
    hi = torch.tensor([v >> 32 for v in k], dtype=torch.long, device=dev)
    row = _mixed(_mixed(lo).bitwise_xor_(hi))
    row_T = torch.repeat_interleave(row, lens)
    return _mixed(row_T.bitwise_xor_(positions_T.to(torch.long).bitwise_and(M32)))


def site_rows(rows_S: torch.Tensor, site: MaskSite) -> torch.Tensor:
    """site_row(row, layer, module) for each of ``rows_S`` ([S] int64 from ``token_rows``): [S] int64."""
    return _mixed(rows_S.bitwise_xor(site.value))


def _xorshift16(v: torch.Tensor) -> torch.Tensor:
    return v.bitwise_xor_(v >> 16)


@lru_cache(maxsize=64)
def _features(width: int, device: torch.device) -> torch.Tensor:
    """feature(i) ^ (feature(i) >> 16) for i in [0, width): [width] int64, built once per width and device."""
    f = _mixed(torch.arange(width, dtype=torch.long, device=device).bitwise_xor_(SALT_FEATURE))
    return _xorshift16(f)


@lru_cache(maxsize=64)
def _features32(width: int, device: torch.device) -> torch.Tensor:
    """``_features`` as int32 (the same 32 bits)."""
    return _as_int32(_features(width, device))


def _as_int32(v: torch.Tensor) -> torch.Tensor:
    """Values in [0, 2^32) held in int64 -> the same 32 bits as int32 (two's complement)."""
    return v.sub(v.bitwise_and(1 << 31).mul_(2)).to(torch.int32)


def keep_mask(
    rows_S: torch.Tensor, site: MaskSite, width: int, p: float, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Keep-mask [S, width] of rows with ``token_rows`` values ``rows_S`` at ``site``, dropout ``p``: bool,
    or 1 / 0 in ``dtype``.

    Give the dtype of the activations the mask multiplies: on a CPU ``x * mask`` with a bool mask first
    copies the mask to x's dtype (a pass and a [S, width] allocation more; 409 us against 163 us for
    [1400, 512] float32, 2 threads), while the compare writes either dtype at the same speed.

    The per-element work runs on int32 tensors (the same 32 bits as the Semantics' unsigned values): a
    wrapping int32 multiply keeps exactly the low 32 bits of the product, a logical shift is an arithmetic
    shift with the sign-extended bits masked off, and the unsigned compare ``u < threshold`` is a signed one
    after flipping the top bit of both sides. That is half the memory traffic of int64 and, on CPUs without
    64-bit vector multiplies (AVX2), native multiplies. Computed in row chunks of about 2^17 elements, so
    the scratch stays small and in cache; the result is the only [S, width] tensor. ``mask / (1 - p)`` times
    the input is the dropped-out input.
    """
    thr = keep_threshold(p)
    s = rows_S.numel()
    out = torch.empty(s, width, dtype=dtype, device=rows_S.device)
    if s == 0 or width == 0:
        return out
    if thr > M32:  # p == 0: every element is kept
        return out.fill_(1)
    r_S = _as_int32(_xorshift16(site_rows(rows_S, site)))
    f_I = _features32(width, rows_S.device)
    thr_flipped = thr - (1 << 31)  # u < thr (unsigned) iff (u ^ 2^31) < thr - 2^31 (signed)
    step = max(1, _CHUNK_ELEMENTS // width)
    u = torch.empty(min(step, s), width, dtype=torch.int32, device=rows_S.device)
    tmp = torch.empty_like(u)
    for a in range(0, s, step):
        n = min(step, s - a)
        x, t = u[:n], tmp[:n]
        torch.bitwise_xor(r_S[a : a + n, None], f_I[None, :], out=x)  # x ^ x >> 16, by linearity
        x.mul_(_C1_I32)
        torch.bitwise_right_shift(x, 15, out=t)
        x.bitwise_xor_(t.bitwise_and_(0x1FFFF)).mul_(_C2_I32).bitwise_xor_(_TOP_I32)
        torch.lt(x, thr_flipped, out=out[a : a + n])
    return out
