"""Causal attention over packed sequences on CUDA without padding (FlashAttention's varlen kernels).

Legend: T tokens (sequences packed back to back), H query heads, K key/value heads, D head dim, S sequences.

``FusedBatch.attention`` calls ``varlen_attention`` first; when it returns None (a CPU tensor, float32, an
unsupported head dim, or no varlen kernel installed) the batch runs its padded ``scaled_dot_product_attention``
path, which is also what this computes (``reference_varlen_attention`` is the contract). Kernels, in order:

- ``flash_attn.flash_attn_varlen_func`` from the flash-attn package, when it is installed;
- ``torch.nn.attention.varlen.varlen_attn`` (PyTorch's own FlashAttention-2 build), on PyTorch versions whose
  ``varlen_attn`` takes ``window_size`` (2.10 and later).

Both take GQA as it is (K key/value heads shared by groups of H / K query heads), the cumulative sequence
lengths as int32, and a window ``(left, right)`` meaning: query i sees key j iff ``i - left <= j <= i + right``
(-1: unbounded). Our sliding window w means ``i - j < w``, so it maps to ``(w - 1, 0)``; plain causal is
``(-1, 0)``.
"""

from __future__ import annotations

import importlib.util
import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["reference_varlen_attention", "varlen_attention", "varlen_backend"]

_HALF = (torch.float16, torch.bfloat16)


def reference_varlen_attention(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The contract, one sequence at a time (the test oracle). Returns o [T, H, D].

    Semantics:
        for each sequence s with tokens [a, b):
            scores = q[a:b] @ k[a:b].T / sqrt(D)        # per head; query head h uses kv head h // (H / K)
            query i sees key j iff j <= i and (sliding_window is None or i - j < sliding_window)
            o[a:b] = softmax(scores masked) @ v[a:b]
    """
    groups = q_THD.shape[1] // k_TKD.shape[1]
    out = []
    cu = cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        i = torch.arange(n, device=q_THD.device)
        allowed = i[None, :] <= i[:, None]
        if sliding_window is not None:
            allowed &= (i[:, None] - i[None, :]) < sliding_window
        q = q_THD[a:b].transpose(0, 1)
        k = k_TKD[a:b].transpose(0, 1).repeat_interleave(groups, 0)
        v = v_TKD[a:b].transpose(0, 1).repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).transpose(0, 1))
    return torch.cat(out)


def _flash_window(sliding_window: int | None) -> tuple[int, int]:
    """FlashAttention's (left, right) for our causal attention with an optional window (module docstring)."""
    return (-1, 0) if sliding_window is None else (sliding_window - 1, 0)


@lru_cache(maxsize=1)
def _torch_varlen_with_window() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    return "window_size" in inspect.signature(varlen_attn).parameters


@lru_cache(maxsize=1)
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def varlen_backend(q_THD: torch.Tensor) -> str | None:
    """The kernel ``varlen_attention`` uses for queries like ``q_THD``: flash_attn, torch or None (padded)."""
    head_dim = q_THD.shape[-1]
    if not q_THD.is_cuda or q_THD.dtype not in _HALF or head_dim % 8 != 0 or head_dim > 256:
        return None
    if _has_flash_attn():
        return "flash_attn"
    if _torch_varlen_with_window():
        return "torch"
    return None


def varlen_attention(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    sliding_window: int | None = None,
) -> torch.Tensor | None:
    """``reference_varlen_attention`` on a varlen kernel, or None when none applies here.

    Args:
        q_THD: [T, H, D] queries; k_TKD, v_TKD: [T, K, D] (H a multiple of K); fp16 or bf16 on CUDA.
        cu_seqlens: [S + 1] cumulative sequence lengths (any integer dtype), on q's device.
        max_seqlen: the longest sequence's length.
        sliding_window: keys further back than this are hidden (None: full causal attention).
    """
    backend = varlen_backend(q_THD)
    if backend is None:
        return None
    cu = cu_seqlens.to(torch.int32)
    window = _flash_window(sliding_window)
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(
            q_THD, k_TKD, v_TKD, cu, cu, max_seqlen, max_seqlen, causal=True, window_size=window
        )
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        q_THD, k_TKD, v_TKD, cu, cu, max_seqlen, max_seqlen, window_size=window, enable_gqa=True
    )
