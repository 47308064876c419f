"""Triton bodies of the segmented LoRA kernels and their launchers (imported only when Triton is present).

Legend: T rows, I / O / N feature widths, R rank (padded to the largest rank of the call), K adapter slots,
NB row blocks, C row chunks.

Every kernel walks a small int32 table built on the host from the segments (``ops._row_blocks`` /
``ops._row_chunks``): one entry per block of rows that belongs to one adapter slot, so one launch covers
every segment whatever their lengths, and no program ever mixes two adapters. The kernels are built on
first use (``_kernels``), for the mode Triton was imported in (compiled, or its CPU interpreter under
``TRITON_INTERPRET=1``), so importing this module does no work.

Accumulation is always float32; inputs and outputs keep the caller's dtype. Two constexpr switches:
``PRECISION`` ("ieee" for float32 inputs, so the result matches torch's float32 matmul, which does not use
TF32 by default; "tf32" otherwise, where it is ignored for 16-bit inputs) and ``UPCAST``: the interpreter of
Triton 3.9 multiplies bfloat16 tiles as raw integers inside ``tl.dot``, so under the interpreter bfloat16
tiles are cast to float32 before the product (loads, stores and rounding are unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

__all__: list[str] = []


def _shrink_body(
    x_ptr,
    w_ptr,
    out_ptr,
    blocks_ptr,
    K_DIM,
    R_DIM,
    K_PER_SPLIT,
    stride_xt,
    stride_xk,
    stride_ws,
    stride_wr,
    stride_wk,
    stride_os,
    stride_ot,
    stride_or,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[split, rows, r] = sum over this split's k of x[rows, k] * w[slot, r, k] (rows of one block)."""
    blk = tl.program_id(0)
    split = tl.program_id(1)
    rblk = tl.program_id(2)
    start = tl.load(blocks_ptr + 3 * blk).to(tl.int64)
    end = tl.load(blocks_ptr + 3 * blk + 1).to(tl.int64)
    slot = tl.load(blocks_ptr + 3 * blk + 2).to(tl.int64)
    rows = start + tl.arange(0, BLOCK_M)
    rr = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    row_ok = rows < end
    r_ok = rr < R_DIM
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K_DIM)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        k_idx = k0 + kk
        k_ok = k_idx < k_hi
        x_t = tl.load(
            x_ptr + rows[:, None] * stride_xt + k_idx[None, :] * stride_xk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + slot * stride_ws + rr[None, :] * stride_wr + k_idx[:, None] * stride_wk,
            mask=r_ok[None, :] & k_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            x_t = x_t.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc += tl.dot(x_t, w_t, input_precision=PRECISION)
    tl.store(
        out_ptr + split * stride_os + rows[:, None] * stride_ot + rr[None, :] * stride_or,
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & r_ok[None, :],
    )


def _expand_body(
    h_ptr,
    w_ptr,
    y_ptr,
    bias_ptr,
    blocks_ptr,
    scale_ptr,
    N_DIM,
    R_DIM,
    stride_ht,
    stride_hr,
    stride_ws,
    stride_wn,
    stride_wr,
    stride_yt,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[rows, n] (+)= scale[slot] * sum_r h[rows, r] * w[slot, n, r] (+ bias[n]), one block, one column tile.

    ``ACCUMULATE``: add to y (read and write it); else overwrite y's rows without reading them.
    """
    blk = tl.program_id(0)
    nblk = tl.program_id(1)
    start = tl.load(blocks_ptr + 3 * blk).to(tl.int64)
    end = tl.load(blocks_ptr + 3 * blk + 1).to(tl.int64)
    slot = tl.load(blocks_ptr + 3 * blk + 2).to(tl.int64)
    scale = tl.load(scale_ptr + slot)
    rows = start + tl.arange(0, BLOCK_M)
    cols = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    row_ok = rows < end
    col_ok = cols < N_DIM
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R_DIM, BLOCK_R):
        r_idx = r0 + rr
        r_ok = r_idx < R_DIM
        h_t = tl.load(
            h_ptr + rows[:, None] * stride_ht + r_idx[None, :] * stride_hr,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + slot * stride_ws + cols[None, :] * stride_wn + r_idx[:, None] * stride_wr,
            mask=col_ok[None, :] & r_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            h_t = h_t.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc += tl.dot(h_t, w_t, input_precision=PRECISION)
    out = acc * scale
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    y_at = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn
    io_ok = row_ok[:, None] & col_ok[None, :]
    if ACCUMULATE:
        out += tl.load(y_at, mask=io_ok, other=0.0).to(tl.float32)
    tl.store(y_at, out.to(y_ptr.dtype.element_ty), mask=io_ok)


def _outer_body(
    left_ptr,
    right_ptr,
    part_ptr,
    chunks_ptr,
    N_DIM,
    R_DIM,
    stride_lt,
    stride_lr,
    stride_rt,
    stride_rn,
    stride_pc,
    stride_pr,
    stride_pn,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """part[c, r, n] = sum over the rows of chunk c of left[row, r] * right[row, n] (float32)."""
    chunk = tl.program_id(0)
    nblk = tl.program_id(1)
    rblk = tl.program_id(2)
    start = tl.load(chunks_ptr + 2 * chunk).to(tl.int64)
    end = tl.load(chunks_ptr + 2 * chunk + 1).to(tl.int64)
    rr = rblk * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = tl.arange(0, BLOCK_M)
    r_ok = rr < R_DIM
    col_ok = cols < N_DIM
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + mm
        row_ok = rows < end
        l_t = tl.load(
            left_ptr + rows[:, None] * stride_lt + rr[None, :] * stride_lr,
            mask=row_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        r_t = tl.load(
            right_ptr + rows[:, None] * stride_rt + cols[None, :] * stride_rn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            l_t = l_t.to(tl.float32)
            r_t = r_t.to(tl.float32)
        acc += tl.dot(tl.trans(l_t), r_t, input_precision=PRECISION)
    tl.store(
        part_ptr + chunk * stride_pc + rr[:, None] * stride_pr + cols[None, :] * stride_pn,
        acc,
        mask=r_ok[:, None] & col_ok[None, :],
    )


def _reduce_body(part_ptr, out_ptr, ranges_ptr, scale_ptr, NUMEL, BLOCK: tl.constexpr):
    """out[k] = scale[k] * sum of part[c] over the chunks c in ranges[k] (in chunk order: deterministic)."""
    slot = tl.program_id(0)
    blk = tl.program_id(1)
    c_lo = tl.load(ranges_ptr + 2 * slot).to(tl.int64)
    c_hi = tl.load(ranges_ptr + 2 * slot + 1).to(tl.int64)
    scale = tl.load(scale_ptr + slot)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(c_lo, c_hi):
        acc += tl.load(part_ptr + c * NUMEL + offs, mask=ok, other=0.0)
    tl.store(out_ptr + slot.to(tl.int64) * NUMEL + offs, acc * scale, mask=ok)


@lru_cache(maxsize=1)
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter.

    That mode is fixed when ``triton`` is first imported (``TRITON_INTERPRET=1`` in the environment then):
    Triton's own library functions (``tl.zeros``, ...) are built for one mode at import, so the kernels
    here are built for the same mode, whatever the variable says later.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


@lru_cache(maxsize=1)
def _kernels() -> SimpleNamespace:
    """The kernels, built on first use for the mode Triton was imported in."""
    if interpreting():
        from triton.runtime.interpreter import InterpretedFunction as build
    else:
        from triton.runtime.jit import JITFunction as build
    return SimpleNamespace(
        shrink=build(_shrink_body),
        expand=build(_expand_body),
        outer=build(_outer_body),
        reduce=build(_reduce_body),
    )


@dataclass(frozen=True)
class Tiles:
    """Tile sizes of one call (powers of two >= 16, as ``tl.dot`` needs) and the work splits.

    ``split_k``: the shrink's reduction over I is cut into this many slices (partial sums in float32,
    added by torch in a fixed order), to fill the GPU when there are few row blocks. ``chunk_rows``: rows per
    chunk of the weight-gradient reduction; each chunk writes its own float32 partial.
    """

    block_m: int = 64
    block_k: int = 64
    block_n: int = 64
    block_r: int = 16
    split_k: int = 1
    chunk_rows: int = 1024
    num_warps: int = 4


def _flags(dtype: torch.dtype) -> dict:
    return {
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST": interpreting() and dtype == torch.bfloat16,
    }


def _launch_opts(tiles: Tiles) -> dict:
    return {} if interpreting() else {"num_warps": tiles.num_warps}


def launch_shrink(
    x_TI: torch.Tensor,
    w_KRI: torch.Tensor,
    out_PTR: torch.Tensor,
    blocks: torch.Tensor,
    num_blocks: int,
    tiles: Tiles,
) -> None:
    """Fill ``out_PTR`` [split_k, T, R] (rows of the blocks only); ``w_KRI`` may be any strided view."""
    if num_blocks == 0:
        return
    rank, dim = w_KRI.shape[1], x_TI.shape[1]
    per_split = triton.cdiv(triton.cdiv(dim, tiles.split_k), tiles.block_k) * tiles.block_k
    grid = (num_blocks, tiles.split_k, triton.cdiv(rank, tiles.block_r))
    _kernels().shrink[grid](
        x_TI,
        w_KRI,
        out_PTR,
        blocks,
        dim,
        rank,
        per_split,
        *x_TI.stride(),
        *w_KRI.stride(),
        *out_PTR.stride(),
        BLOCK_M=tiles.block_m,
        BLOCK_R=tiles.block_r,
        BLOCK_K=tiles.block_k,
        **_flags(x_TI.dtype),
        **_launch_opts(tiles),
    )


def launch_expand(
    y_TN: torch.Tensor,
    h_TR: torch.Tensor,
    w_KNR: torch.Tensor,
    scales_K: torch.Tensor,
    blocks: torch.Tensor,
    num_blocks: int,
    tiles: Tiles,
    accumulate: bool,
    bias_N: torch.Tensor | None,
) -> None:
    """``y_TN[rows] (+)= scale[slot] * h_TR[rows] @ w_KNR[slot]^T (+ bias)`` in place, rows of every block."""
    if num_blocks == 0:
        return
    width, rank = y_TN.shape[1], h_TR.shape[1]
    grid = (num_blocks, triton.cdiv(width, tiles.block_n))
    _kernels().expand[grid](
        h_TR,
        w_KNR,
        y_TN,
        y_TN if bias_N is None else bias_N,
        blocks,
        scales_K,
        width,
        rank,
        *h_TR.stride(),
        *w_KNR.stride(),
        *y_TN.stride(),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_R=tiles.block_r,
        ACCUMULATE=accumulate,
        HAS_BIAS=bias_N is not None,
        **_flags(h_TR.dtype),
        **_launch_opts(tiles),
    )


def launch_outer(
    left_TR: torch.Tensor,
    right_TN: torch.Tensor,
    scales_K: torch.Tensor,
    chunks: torch.Tensor,
    num_chunks: int,
    ranges: torch.Tensor,
    num_slots: int,
    tiles: Tiles,
) -> torch.Tensor:
    """out [K, R, N] float32: ``out[k] = scale[k] * sum over slot k's chunks of left^T @ right``."""
    rank, width = left_TR.shape[1], right_TN.shape[1]
    if num_chunks == 0:
        return torch.zeros(num_slots, rank, width, dtype=torch.float32, device=left_TR.device)
    part_CRN = torch.empty(num_chunks, rank, width, dtype=torch.float32, device=left_TR.device)
    grid = (num_chunks, triton.cdiv(width, tiles.block_n), triton.cdiv(rank, tiles.block_r))
    k = _kernels()
    k.outer[grid](
        left_TR,
        right_TN,
        part_CRN,
        chunks,
        width,
        rank,
        *left_TR.stride(),
        *right_TN.stride(),
        *part_CRN.stride(),
        BLOCK_M=tiles.block_m,
        BLOCK_R=tiles.block_r,
        BLOCK_N=tiles.block_n,
        **_flags(left_TR.dtype),
        **_launch_opts(tiles),
    )
    out_KRN = torch.empty(num_slots, rank, width, dtype=torch.float32, device=left_TR.device)
    block = 1024
    k.reduce[(num_slots, triton.cdiv(rank * width, block))](
        part_CRN, out_KRN, ranges, scales_K, rank * width, BLOCK=block
    )
    return out_KRN
