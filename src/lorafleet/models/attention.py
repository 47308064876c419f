"""The one attention computation of every decoder: causal mask, sliding window, scale and logit soft-cap.

Legend: B rows (sequences or groups), H query heads, K key/value heads, N queries, M keys, D head dim.

Training (``FusedBatch.attention``), evaluation (the same batch) and generation (prefill through the same
batch, decode steps against the KV cache) all end in ``attend``; what differs between them is only which
keys a query may see, which they pass as a boolean mask. The per-layer numbers (window, scale, soft-cap)
are an ``AttentionSpec`` built once per layer from the ``ModelConfig``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AttentionSpec", "attend", "causal_window_mask"]


@dataclass(frozen=True)
class AttentionSpec:
    """How one layer attends.

    Attributes:
        sliding_window: a query at position i sees keys at positions j with ``i - j < sliding_window``
            (None: every earlier key).
        scale: multiplies q k^T (``head_dim ** -0.5``, or Gemma's ``query_pre_attn_scalar ** -0.5``).
        softcap: when set, scores become ``softcap * tanh(scores / softcap)`` before the mask (Gemma 2).
    """

    sliding_window: int | None = None
    scale: float | None = None
    softcap: float | None = None


def causal_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., N, M] boolean: query position i sees key position j iff ``j <= i`` and ``i - j < window``."""
    allowed = k_pos[..., None, :] <= q_pos[..., :, None]
    if window is not None:
        allowed = allowed & ((q_pos[..., :, None] - k_pos[..., None, :]) < window)
    return allowed


def attend(
    q_BHND: torch.Tensor,
    k_BKMD: torch.Tensor,
    v_BKMD: torch.Tensor,
    mask: torch.Tensor | None,
    spec: AttentionSpec,
    is_causal: bool = False,
) -> torch.Tensor:
    """Masked softmax attention [B, H, N, D]; query head h reads key/value head h // (H / K).

    Semantics:
        s = q @ k^T * scale                          # scale None: D ** -0.5
        if softcap: s = softcap * tanh(s / softcap)
        s[~mask] = -inf                              # is_causal: mask = lower triangle (N == M)
        o = softmax(s in float32).to(q.dtype) @ v
    A query that sees no key at all (a padding row of a packed batch, past a sliding window) gets an
    arbitrary finite row, never NaN, so that its zero gradient stays zero.
    Without a soft-cap this is ``F.scaled_dot_product_attention`` (its fused kernels); with one it is
    computed as written, as transformers' eager attention does. On a CPU in a 16-bit dtype the fused kernel
    runs in float32 on the upcast q, k, v and its output is rounded back, except for long sequences on a
    CPU with AMX, where the 16-bit kernel is the faster (``_cpu_runs_upcast``, measured).
    """
    if spec.softcap is None:
        dt = q_BHND.dtype
        up = dt.itemsize == 2 and q_BHND.device.type == "cpu" and _cpu_runs_upcast(q_BHND.shape[-2])
        if up:
            q_BHND, k_BKMD, v_BKMD = q_BHND.float(), k_BKMD.float(), v_BKMD.float()
        o = F.scaled_dot_product_attention(
            q_BHND, k_BKMD, v_BKMD, attn_mask=mask, is_causal=is_causal, scale=spec.scale, enable_gqa=True
        )
        return o.to(dt) if up else o
    groups = q_BHND.shape[1] // k_BKMD.shape[1]
    k = k_BKMD.repeat_interleave(groups, dim=1)
    v = v_BKMD.repeat_interleave(groups, dim=1)
    scale = spec.scale if spec.scale is not None else q_BHND.shape[-1] ** -0.5
    s = (q_BHND @ k.transpose(-1, -2)) * scale
    s = torch.tanh(s / spec.softcap) * spec.softcap
    if is_causal:
        n, m = s.shape[-2:]
        mask = torch.ones(n, m, dtype=torch.bool, device=s.device).tril()
    if mask is not None:  # the dtype's lowest value, not -inf: a fully masked row must not become NaN
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q_BHND.dtype)
    return p @ v


# From this many queries on, torch's bfloat16 CPU flash kernel beats float32 where the CPU has AMX tiles.
AMX_BF16_MIN_QUERIES = 192


@functools.cache
def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe is not None and probe())


def _cpu_runs_upcast(n_queries: int) -> bool:
    """Whether a 16-bit attention on the CPU over ``n_queries`` runs in float32 (the faster, measured).

    Forward + backward of the causal fused kernel, 8 heads of 64, torch 2.13, 2 threads: on AVX-512 with
    bf16 but no AMX (AMD EPYC) bfloat16 is 15 to 30% slower than float32 at every length of the benchmarks'
    buckets; on a Xeon with AMX (4096 tokens per call) bfloat16 is slower up to 160 queries (78.8 against
    53.2 ms at 160) and as fast or faster from 192, where torch's kernel moves from query blocks of 32 to
    64 (51.8 against 53.3 ms at 192, 64.1 against 72.0 at 255, 58.0 against 70.1 at 320).
    The float32 path only rounds less: its output is the exact softmax of the rounded q, k, v.
    """
    return not (_has_amx() and n_queries >= AMX_BF16_MIN_QUERIES)
