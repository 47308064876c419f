"""Segmented multi-LoRA operators: plain-PyTorch references, Triton launchers and the fused layer's GPU path.

Legend: T rows of the batch, I input features, O output features, N any feature width, R rank (the largest
of the call; smaller ranks are zero-padded), K adapter slots of one call, S rows of one segment.

A *segment* here is ``(start, end, slot)``: rows ``[start, end)`` use adapter slot ``slot`` (an index into
the stacked adapter weights). Segments are disjoint; rows of no segment are left alone. Each operator has a
``reference_*`` twin (a plain loop, the test oracle) and a Triton version that covers every segment in one
launch (``segmented_outer`` uses a second, tiny launch for its deterministic reduction).

``triton_fused_lora`` is the GPU fast path of ``FusedLoRALinear`` (``lorafleet.lora.fused``); it computes
``reference_fused_lora`` for LoRA adapters (DoRA stays on the PyTorch path):

    forward   h = shrink(drop(x), A) [T, R] (one launch); expand writes y = s_k * h B_k^T + b into every
              segment row (one launch, y not read); then the base GEMM accumulates y += x W^T (cuBLAS,
              beta = 1), so the low-rank update costs no extra pass over y
    backward  u = shrink(g, B^T) [T, R], dx = expand(u, A) (dropout rows masked), then dx += g W (GEMM);
              dB_k = s_k * sum over slot k's rows of g^T h and dA_k = s_k * sum of u^T drop(x)
              (``segmented_outer``: float32 partials per row chunk, summed per slot in chunk order)

Dropout masks are keyed (``lorafleet.masks``): the same pure function of the rows' keys, the layer's site and
the feature as on the PyTorch path, so both paths drop the same inputs; the backward recomputes them from the
keys, nothing is kept. The adapters' A and B are stacked (and cast to x's dtype, as the PyTorch path casts
them) once per call: K * R * (I + O) elements, small next to x.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from ...masks import MaskSite, keep_mask
from ...models.quant import dense_weight

__all__ = [
    "reference_segmented_expand",
    "reference_segmented_outer",
    "reference_segmented_shrink",
    "segmented_expand",
    "segmented_outer",
    "segmented_shrink",
    "triton_available",
    "triton_fused_lora",
    "triton_unsupported",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

SegmentSpec = tuple[int, int, int]  # (start, end, slot)


# -- references ------------------------------------------------------------------------------------------


def reference_segmented_shrink(
    x_TI: torch.Tensor, a_KRI: torch.Tensor, segments: Sequence[SegmentSpec]
) -> torch.Tensor:
    """h [T, R] in x's dtype; rows outside every segment are zero.

    Semantics:
        h = zeros(T, R)
        for start, end, k in segments:
            h[start:end] = x[start:end] @ a[k].T
    """
    h_TR = x_TI.new_zeros(x_TI.shape[0], a_KRI.shape[1])
    for start, end, k in segments:
        h_TR[start:end] = x_TI[start:end] @ a_KRI[k].to(x_TI.dtype).t()
    return h_TR


def reference_segmented_expand(
    y_TO: torch.Tensor,
    h_TR: torch.Tensor,
    b_KOR: torch.Tensor,
    segments: Sequence[SegmentSpec],
    scales: Sequence[float],
    accumulate: bool = True,
    bias_O: torch.Tensor | None = None,
) -> torch.Tensor:
    """A new y [T, O] with each segment's low-rank update added (or written, ``accumulate=False``).

    Semantics:
        y = y.clone()
        for start, end, k in segments:
            lora = scales[k] * h[start:end] @ b[k].T + (bias if bias is not None else 0)
            y[start:end] = y[start:end] + lora if accumulate else lora
    """
    y_TO = y_TO.clone()
    for start, end, k in segments:
        lora_SO = scales[k] * (h_TR[start:end] @ b_KOR[k].to(h_TR.dtype).t())
        if bias_O is not None:
            lora_SO = lora_SO + bias_O
        y_TO[start:end] = y_TO[start:end] + lora_SO if accumulate else lora_SO
    return y_TO


def reference_segmented_outer(
    left_TR: torch.Tensor,
    right_TN: torch.Tensor,
    segments: Sequence[SegmentSpec],
    num_slots: int,
    scales: Sequence[float],
) -> torch.Tensor:
    """Per-slot sums of outer products, out [K, R, N] in float32 (the weight gradients' form).

    Semantics:
        out = zeros(K, R, N)
        for start, end, k in segments:
            out[k] += scales[k] * left[start:end].T @ right[start:end]     # in float32
    """
    out_KRN = torch.zeros(num_slots, left_TR.shape[1], right_TN.shape[1], dtype=torch.float32)
    out_KRN = out_KRN.to(left_TR.device)
    for start, end, k in segments:
        out_KRN[k] += scales[k] * (left_TR[start:end].float().t() @ right_TN[start:end].float())
    return out_KRN


# -- host-side tables --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tables:
    """Row blocks (start, end, slot) for shrink/expand, and row chunks (start, end) grouped by slot."""

    blocks: torch.Tensor
    num_blocks: int
    chunks: torch.Tensor
    num_chunks: int
    ranges: torch.Tensor  # [K * 2]: each slot's chunks are chunks[ranges[2k] : ranges[2k + 1]]


@lru_cache(maxsize=256)
def _tables(
    segments: tuple[SegmentSpec, ...], num_slots: int, block_m: int, chunk_rows: int, device: torch.device
) -> _Tables:
    """Built once per distinct batch layout (each decoder layer of a micro-batch reuses it)."""
    blocks = [(b, min(b + block_m, end), k) for start, end, k in segments for b in range(start, end, block_m)]
    chunks: list[tuple[int, int]] = []
    ranges: list[int] = []
    for k in range(num_slots):
        ranges.append(len(chunks))
        for start, end, slot in segments:
            if slot == k:
                chunks += [(c, min(c + chunk_rows, end)) for c in range(start, end, chunk_rows)]
        ranges.append(len(chunks))

    def table(rows: list) -> torch.Tensor:
        flat = [v for row in rows for v in row] if rows and isinstance(rows[0], tuple) else rows
        return torch.tensor(flat or [0], dtype=torch.int32).to(device)

    return _Tables(table(blocks), len(blocks), table(chunks), len(chunks), table(ranges))


@lru_cache(maxsize=256)
def _scales(scalings: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The slots' scalings [K] as a float32 tensor on ``device``, copied there once per distinct tuple."""
    return torch.tensor(scalings, dtype=torch.float32).to(device)


def _check(segments: Sequence[SegmentSpec], num_rows: int, num_slots: int) -> tuple[SegmentSpec, ...]:
    segs = tuple(sorted((int(a), int(b), int(k)) for a, b, k in segments))
    last = 0
    for start, end, k in segs:
        if not (0 <= start < end <= num_rows and start >= last and 0 <= k < num_slots):
            raise ValueError(
                f"segment ({start}, {end}, slot {k}) is empty, outside the {num_rows} rows, overlaps another "
                f"segment or names a slot outside [0, {num_slots}); segments must be disjoint, non-empty row "
                "ranges with valid slots"
            )
        last = end
    return segs


def _tiles(num_rows: int, rank: int, width: int, device: torch.device):
    """Tile sizes for one call: small in the interpreter (CPU tests), sized to fill the GPU otherwise."""
    from ._triton import Tiles, interpreting

    block_r = min(max(16, 1 << (max(rank, 1) - 1).bit_length()), 64)
    if interpreting() or device.type != "cuda":
        return Tiles(block_m=16, block_k=32, block_n=32, block_r=block_r, split_k=1, chunk_rows=64)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_m = 64
    blocks = max(1, -(-num_rows // block_m))
    # Few row blocks (a short batch) leave SMs idle in the shrink: cut the reduction over I instead.
    split_k = max(1, min(2 * sms // blocks, width // 512, 16))
    chunk_rows = max(block_m, -(-num_rows // 8 // block_m) * block_m)
    return Tiles(
        block_m=block_m, block_k=64, block_n=128, block_r=block_r, split_k=split_k, chunk_rows=chunk_rows
    )


# -- the segmented operators (Triton) ------------------------------------------------------------------------


def segmented_shrink(
    x_TI: torch.Tensor, a_KRI: torch.Tensor, segments: Sequence[SegmentSpec], *, tiles=None
) -> torch.Tensor:
    """``reference_segmented_shrink`` in one Triton launch; rows outside every segment are undefined.

    Args:
        x_TI: [T, I] rows (float32, float16 or bfloat16; CUDA, or CPU under ``TRITON_INTERPRET=1``).
        a_KRI: [K, R, I] stacked adapter A matrices in x's dtype (any strides, e.g. a transposed view).
        segments: ``(start, end, slot)`` row ranges, disjoint.
        tiles: ``_triton.Tiles`` to override the automatic tile sizes (tests).
    Returns:
        h_TR [T, R] in x's dtype.
    """
    from ._triton import launch_shrink

    segs = _check(segments, x_TI.shape[0], a_KRI.shape[0])
    t, r = x_TI.shape[0], a_KRI.shape[1]
    tiles = tiles or _tiles(t, r, x_TI.shape[1], x_TI.device)
    tab = _tables(segs, a_KRI.shape[0], tiles.block_m, tiles.chunk_rows, x_TI.device)
    if tiles.split_k == 1:
        h_TR = torch.empty(t, r, dtype=x_TI.dtype, device=x_TI.device)
        launch_shrink(x_TI, a_KRI, h_TR[None], tab.blocks, tab.num_blocks, tiles)
        return h_TR
    part_PTR = torch.zeros(tiles.split_k, t, r, dtype=torch.float32, device=x_TI.device)
    launch_shrink(x_TI, a_KRI, part_PTR, tab.blocks, tab.num_blocks, tiles)
    return part_PTR.sum(0).to(x_TI.dtype)


def segmented_expand(
    y_TO: torch.Tensor,
    h_TR: torch.Tensor,
    b_KOR: torch.Tensor,
    segments: Sequence[SegmentSpec],
    scales_K: torch.Tensor,
    *,
    accumulate: bool = True,
    bias_O: torch.Tensor | None = None,
    tiles=None,
) -> torch.Tensor:
    """``reference_segmented_expand`` in one Triton launch, *in place* on ``y_TO`` (returned).

    Args:
        y_TO: [T, O] output rows, updated in place (rows outside every segment are never touched).
        h_TR: [T, R] in y's dtype.
        b_KOR: [K, O, R] stacked adapter B matrices in y's dtype (any strides).
        segments: ``(start, end, slot)`` row ranges, disjoint.
        scales_K: [K] float32 scaling of each slot, on y's device.
        accumulate: add to y's rows; False writes them without reading y (y may be uninitialised there).
        bias_O: [O] added to every segment row, or None.
    """
    from ._triton import launch_expand

    segs = _check(segments, y_TO.shape[0], b_KOR.shape[0])
    tiles = tiles or _tiles(y_TO.shape[0], h_TR.shape[1], y_TO.shape[1], y_TO.device)
    tab = _tables(segs, b_KOR.shape[0], tiles.block_m, tiles.chunk_rows, y_TO.device)
    launch_expand(y_TO, h_TR, b_KOR, scales_K, tab.blocks, tab.num_blocks, tiles, accumulate, bias_O)
    return y_TO


def segmented_outer(
    left_TR: torch.Tensor,
    right_TN: torch.Tensor,
    segments: Sequence[SegmentSpec],
    num_slots: int,
    scales_K: torch.Tensor,
    *,
    tiles=None,
) -> torch.Tensor:
    """``reference_segmented_outer`` with Triton: out [K, R, N] float32, deterministic (no atomics).

    Args:
        left_TR: [T, R], right_TN: [T, N], same dtype.
        segments: ``(start, end, slot)`` row ranges, disjoint; every slot in ``range(num_slots)`` that has no
            segment gets zeros.
        scales_K: [K] float32 on the inputs' device.
    """
    from ._triton import launch_outer

    segs = _check(segments, left_TR.shape[0], num_slots)
    tiles = tiles or _tiles(left_TR.shape[0], left_TR.shape[1], right_TN.shape[1], left_TR.device)
    tab = _tables(segs, num_slots, tiles.block_m, tiles.chunk_rows, left_TR.device)
    return launch_outer(left_TR, right_TN, scales_K, tab.chunks, tab.num_chunks, tab.ranges, num_slots, tiles)


# -- the fused layer's Triton path ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def _runs_here(x_TI: torch.Tensor) -> bool:
    if x_TI.is_cuda:
        return True
    if x_TI.device.type != "cpu":
        return False
    from ._triton import interpreting

    return interpreting()


def triton_unsupported(x_TI: torch.Tensor, plan) -> str | None:
    """Why the Triton path cannot run this call of a fused layer, or None when it can.

    ``plan`` is the fused layer's per-call plan (``lorafleet.lora.fused._Plan``).
    """
    if not triton_available():
        return "the triton package is not installed (pip install triton, Linux x86_64)"
    if not _runs_here(x_TI):
        return f"x is on {x_TI.device}; Triton needs CUDA (or the CPU interpreter, TRITON_INTERPRET=1)"
    if x_TI.dtype not in _DTYPES:
        return f"x has dtype {x_TI.dtype}; the kernels take float32, float16 or bfloat16"
    dora = [k for k, s in enumerate(plan.slots) if s.kind != "lora"]
    if dora:
        return "DoRA adapters run on the PyTorch path (the kernels compute plain LoRA updates)"
    return None


@dataclass(frozen=True)
class _Call:
    """What the autograd function needs of one call besides tensors."""

    segments: tuple[SegmentSpec, ...]
    scalings: tuple[float, ...]
    dropouts: tuple[float, ...]
    ranks: tuple[int, ...]
    firsts: tuple[int, ...]  # params[first] is slot k's A, params[first + 1] its B
    site: MaskSite = MaskSite()
    rows: torch.Tensor | None = None  # [T] the batch's dropout_rows when a slot has dropout


def _stack(
    params: Sequence[torch.Tensor], call: _Call, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [K, R, I] and B [K, O, R] in ``dtype``, zero-padded to the largest rank."""
    r = max(call.ranks)
    a0, b0 = params[call.firsts[0]], params[call.firsts[0] + 1]
    k = len(call.firsts)
    if all(rk == r for rk in call.ranks):
        a_KRI = torch.stack([params[f].detach() for f in call.firsts]).to(dtype)
        b_KOR = torch.stack([params[f + 1].detach() for f in call.firsts]).to(dtype)
        return a_KRI, b_KOR
    a_KRI = torch.zeros(k, r, a0.shape[1], dtype=dtype, device=a0.device)
    b_KOR = torch.zeros(k, b0.shape[0], r, dtype=dtype, device=b0.device)
    for j, (f, rk) in enumerate(zip(call.firsts, call.ranks)):
        a_KRI[j, :rk] = params[f].detach()
        b_KOR[j, :, :rk] = params[f + 1].detach()
    return a_KRI, b_KOR


def _masks(call: _Call, width: int) -> list[torch.Tensor | None]:
    """One keyed keep-mask [S, width] per segment (None where its adapter has no dropout in this call)."""
    return [
        keep_mask(call.rows[start:end], call.site, width, call.dropouts[k]) if call.dropouts[k] > 0 else None
        for start, end, k in call.segments
    ]


def _dropped(x_TI: torch.Tensor, masks: Sequence[torch.Tensor | None], call: _Call) -> torch.Tensor:
    """The adapters' input: x with each dropout segment's mask applied (x itself when none has dropout)."""
    xd_TI = x_TI
    for (start, end, k), mask_SI in zip(call.segments, masks):
        if mask_SI is not None:
            if xd_TI is x_TI:
                xd_TI = x_TI.clone()
            xd_TI[start:end].mul_(mask_SI).mul_(1.0 / (1.0 - call.dropouts[k]))
    return xd_TI


def _gaps(segments: Sequence[SegmentSpec], num_rows: int) -> list[tuple[int, int]]:
    """Row ranges outside every segment (rows of no adapter, or of one this layer does not hold)."""
    gaps, cursor = [], 0
    for start, end, _ in sorted(segments):
        if start > cursor:
            gaps.append((cursor, start))
        cursor = end
    if cursor < num_rows:
        gaps.append((cursor, num_rows))
    return gaps


def _forward(x_TI, weight_OI, bias_O, call: _Call, params):
    dt = x_TI.dtype
    a_KRI, b_KOR = _stack(params, call, dt)
    scales_K = _scales(call.scalings, x_TI.device)
    xd_TI = _dropped(x_TI, _masks(call, x_TI.shape[1]), call)
    h_TR = segmented_shrink(xd_TI, a_KRI, call.segments)
    del xd_TI
    # The low-rank terms (and the bias) are written first and the base GEMM accumulates onto them (beta = 1),
    # where its read of y hides behind its arithmetic; adding them after the GEMM would read y once more.
    y_TO = torch.empty(x_TI.shape[0], b_KOR.shape[1], dtype=dt, device=x_TI.device)
    segmented_expand(y_TO, h_TR, b_KOR, call.segments, scales_K, accumulate=False, bias_O=bias_O)
    for start, end in _gaps(call.segments, x_TI.shape[0]):
        if bias_O is None:
            y_TO[start:end].zero_()
        else:
            y_TO[start:end].copy_(bias_O.expand(end - start, -1))
    y_TO.addmm_(x_TI, dense_weight(weight_OI, dt).t())
    return y_TO, h_TR, a_KRI, b_KOR, scales_K


class _TritonLoRAFunction(torch.autograd.Function):
    """Forward and exact backward of the fused layer on the Triton kernels (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_TI, weight_OI, bias_O, call: _Call, *params):
        y_TO, h_TR, a_KRI, b_KOR, scales_K = _forward(x_TI, weight_OI, bias_O, call, params)
        need_params = any(ctx.needs_input_grad[4:])
        ctx.call = call  # its keys (call.rows) give the backward the forward's masks again
        ctx.param_dtypes = [p.dtype for p in params]
        ctx.num_params = len(params)
        ctx.save_for_backward(
            x_TI if need_params else None,
            weight_OI,
            h_TR if need_params else None,
            a_KRI,
            b_KOR,
            scales_K,
        )
        return y_TO

    @staticmethod
    def backward(ctx, g_TO):
        call: _Call = ctx.call
        x_TI, weight_OI, h_TR, a_KRI, b_KOR, scales_K = ctx.saved_tensors
        masks = _masks(call, a_KRI.shape[2])
        g_TO = g_TO.contiguous()
        dt = g_TO.dtype
        k = len(call.firsts)
        u_TR = segmented_shrink(g_TO, b_KOR.transpose(1, 2), call.segments)
        dx_TI = None
        if ctx.needs_input_grad[0]:
            # As in the forward: the adapters' share first, then the GEMM g W accumulates onto it.
            weight_OI = dense_weight(weight_OI, dt)
            dx_TI = torch.empty(g_TO.shape[0], weight_OI.shape[1], dtype=dt, device=g_TO.device)
            segmented_expand(dx_TI, u_TR, a_KRI.transpose(1, 2), call.segments, scales_K, accumulate=False)
            for start, end in _gaps(call.segments, g_TO.shape[0]):
                dx_TI[start:end].zero_()
            for (start, end, slot), mask_SI in zip(call.segments, masks):
                if mask_SI is not None:  # dropout scales the adapters' input gradient by its mask
                    dx_TI[start:end].mul_(mask_SI).mul_(1.0 / (1.0 - call.dropouts[slot]))
            dx_TI.addmm_(g_TO, weight_OI)
        grads: list[torch.Tensor | None] = [None] * ctx.num_params
        if x_TI is not None:
            xd_TI = _dropped(x_TI, masks, call)
            d_b_KRO = segmented_outer(h_TR, g_TO, call.segments, k, scales_K)
            d_a_KRI = segmented_outer(u_TR, xd_TI, call.segments, k, scales_K)
            for j, (f, rk) in enumerate(zip(call.firsts, call.ranks)):
                if ctx.needs_input_grad[4 + f]:
                    grads[f] = d_a_KRI[j, :rk].to(ctx.param_dtypes[f]).contiguous()
                if ctx.needs_input_grad[5 + f]:
                    grads[f + 1] = d_b_KRO[j, :rk].t().to(ctx.param_dtypes[f + 1]).contiguous()
        return (dx_TI, None, None, None, *grads)


def triton_fused_lora(
    x_TI: torch.Tensor,
    weight_OI: torch.Tensor,
    bias_O: torch.Tensor | None,
    plan,
    params: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The fused layer's output on the Triton kernels: ``reference_fused_lora`` for LoRA adapters.

    Args:
        x_TI: [T, I] rows; weight_OI [O, I] (frozen, possibly quantized: ``lorafleet.models.quant``);
        bias_O: [O] or None.
        plan: the layer's ``_Plan`` (slots with kind, scaling, dropout and first parameter index; segments as
            (start, end, slot)); ``triton_unsupported(x_TI, plan)`` must be None.
        params: the slots' parameters, A [R_k, I] at ``slot.first`` and B [O, R_k] after it.
    Returns:
        y_TO [T, O]; differentiable in x and every A and B when grad is enabled.
    """
    call = _Call(
        segments=tuple(plan.segments),
        scalings=tuple(float(s.scaling) for s in plan.slots),
        dropouts=tuple(float(s.dropout) for s in plan.slots),
        ranks=tuple(int(params[s.first].shape[0]) for s in plan.slots),
        firsts=tuple(s.first for s in plan.slots),
        site=plan.site,
        rows=plan.rows,
    )
    x_TI = x_TI.contiguous()
    if torch.is_grad_enabled() and (x_TI.requires_grad or any(p.requires_grad for p in params)):
        return _TritonLoRAFunction.apply(x_TI, weight_OI, bias_O, call, *params)
    with torch.no_grad():
        return _forward(x_TI, weight_OI, bias_O, call, params)[0]
