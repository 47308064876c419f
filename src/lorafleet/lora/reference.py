"""The contract of the fused multi-adapter linear, as a plain autograd loop (the oracle), and its shared checks.

Legend: T rows of x, I input features, O output features, R rank of one adapter.

``reference_fused_lora`` is what ``FusedLoRALinear`` computes (``lorafleet.lora.fused``); the fast paths
(PyTorch there, Triton in ``lora/kernels/``) are tested against it. ``batch_dropout_rows`` and
``dora_weight_norm`` are shared by the reference and the fast paths, so the keyed dropout masks and DoRA's
norm are defined once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..masks import keep_mask
from ..models.decoder import BatchLike
from ..models.quant import dense_weight

if TYPE_CHECKING:
    from .fused import FusedLoRALinear

__all__ = ["batch_dropout_rows", "check_segments", "dora_weight_norm", "reference_fused_lora"]


def batch_dropout_rows(batch: BatchLike, num_rows: int) -> torch.Tensor:
    """The batch's [T] ``dropout_rows`` (``FusedBatch.dropout_rows``), checked; what keyed masks hash."""
    rows = getattr(batch, "dropout_rows", None)
    if rows is None:
        raise ValueError(
            "adapter dropout in training mode needs the batch's dropout keys: pass a FusedBatch (or a batch "
            "with dropout_rows [T], lorafleet.masks.token_rows), or call model.eval() for no dropout"
        )
    if rows.dim() != 1 or rows.shape[0] != num_rows:
        raise ValueError(
            f"batch.dropout_rows has shape {list(rows.shape)}; it needs one entry per row ({num_rows})"
        )
    return rows


def dora_weight_norm(
    weight_OI: torch.Tensor, a_RI: torch.Tensor, b_OR: torch.Tensor, scaling: float, dtype: torch.dtype
) -> torch.Tensor:
    """DoRA's row norm ||W + scaling * B A|| [O] in ``dtype``, detached, as PEFT 0.21 computes it.

    PEFT forms the low-rank product in the adapter's dtype, casts it and W to the input's dtype and takes
    the norm of each output row there; no gradient flows through the norm (DoRA paper, section 4.3).
    """
    with torch.no_grad():
        lora_OI = (b_OR @ a_RI).to(dtype)
        return torch.linalg.vector_norm(dense_weight(weight_OI, dtype).to(dtype) + scaling * lora_OI, dim=1)


def check_segments(segments: list[tuple[int, int, str]], num_rows: int) -> None:
    last = 0
    for start, end, name in sorted(segments):
        if not 0 <= start < end <= num_rows or start < last:
            raise ValueError(
                f"adapter {name!r}: segment [{start}, {end}) is outside the batch's {num_rows} rows or overlaps "
                "another segment; segments must be disjoint row ranges of the input"
            )
        last = end


def reference_fused_lora(layer: FusedLoRALinear, x_TI: torch.Tensor, batch: BatchLike | None) -> torch.Tensor:
    """The contract of ``FusedLoRALinear``, written as a plain autograd loop (the test oracle).

    Args:
        layer: the fused layer; its ``weight`` [O, I], ``bias`` [O] or None and per-adapter parameters
            ``lora_A[n]`` [R, I], ``lora_B[n]`` [O, R], ``lora_magnitude_vector[n]`` [O] (DoRA) are used.
        x_TI: [T, I] input rows.
        batch: anything with ``segments``: ``Segment(adapter, start, end)`` row ranges, disjoint.
    Returns:
        y_TO [T, O].

    Semantics:
        y = F.linear(x, W, b)                              # every row, adapter or not
        for (name, start, end) in sorted(batch.segments):  # rows of no adapter, or of an adapter that
            if name not in layer.lora_A: continue          # does not target this layer: base only
            s, p = scaling(name), dropout(name) if layer.training else 0.0
            xs = x[start:end]
            keep = keep_mask(batch.dropout_rows[start:end], layer.mask_site, I, p)   # lorafleet.masks
            xd = xs * keep * (1 / (1 - p)) if p > 0 else xs
            lora = xd @ A.T @ B.T                          # A, B cast to x's dtype
            if kind(name) == "lora":
                y[start:end] += s * lora
            else:                                          # DoRA, as PEFT 0.21 in training mode
                n = ||W + s * B @ A|| per output row, detached
                c = m / n
                base = y[start:end] - b if p == 0 else xd @ W.T   # PEFT reuses the base output
                y[start:end] += (c - 1) * base + c * s * lora      # only when there is no dropout;
                                                                   # the bias is never rescaled
    Gradients flow to x and to every adapter's A, B and m; W and b are frozen.
    """
    if batch is None or not layer.specs:
        return F.linear(x_TI, layer.weight, layer.bias)
    y_TO = F.linear(x_TI, layer.weight, layer.bias)
    segments = [
        (s.start, s.end, s.adapter) for s in batch.segments if s.adapter in layer.specs and s.end > s.start
    ]
    check_segments(segments, x_TI.shape[0])
    pieces, cursor = [], 0
    for start, end, name in sorted(segments):
        spec = layer.specs[name]
        a_RI = layer.lora_A[name].to(x_TI.dtype)
        b_OR = layer.lora_B[name].to(x_TI.dtype)
        p = spec.dropout if layer.training else 0.0
        xd_SI = x_TI[start:end]
        if p > 0:
            rows = batch_dropout_rows(batch, x_TI.shape[0])[start:end]
            xd_SI = xd_SI * keep_mask(rows, layer.mask_site, x_TI.shape[1], p) * (1.0 / (1.0 - p))
        lora_SO = F.linear(F.linear(xd_SI, a_RI), b_OR)
        y_SO = y_TO[start:end]
        if spec.kind == "lora":
            out_SO = y_SO + lora_SO * spec.scaling
        else:
            norm_O = dora_weight_norm(
                layer.weight, layer.lora_A[name], layer.lora_B[name], spec.scaling, x_TI.dtype
            )
            c_O = layer.lora_magnitude_vector[name] / norm_O.detach()
            if p == 0:
                base_SO = y_SO if layer.bias is None else y_SO - layer.bias
            else:
                base_SO = F.linear(xd_SI, layer.weight)
            out_SO = y_SO + ((c_O - 1) * base_SO + c_O * lora_SO * spec.scaling).to(y_SO.dtype)
        pieces += [y_TO[cursor:start], out_SO]
        cursor = end
    pieces.append(y_TO[cursor:])
    return torch.cat(pieces)
