"""The fused multi-adapter linear: the frozen weight once for the whole batch, each adapter on its own rows.

Legend: T tokens (rows of x), I input features, O output features, R rank of one adapter, S rows of one
segment.

``FusedLoRALinear`` replaces a frozen ``Linear`` of the decoder (it *is* a ``Linear``: same ``weight`` and
``bias`` parameters, so the base checkpoint names do not change) and holds, per adapter, ``lora_A[name]``
[R, I], ``lora_B[name]`` [O, R] and for DoRA ``lora_magnitude_vector[name]`` [O]. It is called as
``layer(x_TI, batch)``; ``batch.segments`` says which contiguous rows belong to which adapter. What it
computes is ``reference_fused_lora`` (``lora/reference.py``; the ``Semantics:`` there is the contract); the
fast path below computes the same thing with fewer passes over memory and an exact hand-written backward.

Fast path (training, ``_FusedLoRAFunction``; s = scaling, h = drop(x_S) A^T [S, R]):
    forward   each plain-LoRA segment writes b + (s h) B^T into its rows of y; the other rows get b (or 0);
              then ONE GEMM for all T rows accumulates x W^T onto y (beta = 1: reading y inside a
              compute-bound GEMM is nearly free, where ``y_S += ...`` after it would be one more read and
              write of the rows). DoRA rows are rescaled in place after the GEMM.
    backward  each segment writes its low-rank term s (g_S B) A into its rows of dx (the other rows 0),
              then ONE GEMM for all T rows accumulates g W onto dx (DoRA rows of g pre-scaled by
              m / ||W + sBA||); dB = g_S^T (s h), dA = (s g_S B)^T drop(x_S).
    Dropout masks are keyed (``lorafleet.masks``): a pure function of each row's sequence key and
    position (``batch.dropout_rows``), the layer's ``mask_site`` and the feature, drawn from no RNG. The
    forward computes a segment's mask, uses it and drops it; the backward computes it again from the same
    keys, so dropout keeps nothing for the backward. Without grad (``torch.no_grad``, inference mode,
    KV-cache generation) the same forward runs with nothing saved.

Memory saved for the backward, per token of a segment, per adapted module (bytes; e = 4 for float32,
2 for bfloat16; the input x and the weights are referenced, never copied, by both; measured with
``torch.autograd.graph.saved_tensors_hooks`` in tests/lora/test_fused.py, CPU):

    adapter              plain autograd (reference_fused_lora)        fused       saved per token
    LoRA, dropout 0      e*R (h)                                      e*R (s h)   0
    LoRA, dropout > 0    I (keep mask) + e*I (dropped x) + e*R        e*R         (e + 1) * I
    DoRA, dropout 0      2*e*O (base and LoRA outputs) + e*R          e*R         2e * O
    DoRA, dropout > 0    I + e*I + 2*e*O + e*R                        e*R         (e + 1) * I + 2e * O

(DoRA also keeps one [O] norm per call; the batch's [T] int64 ``dropout_rows`` is shared by every layer.)
With dropout on a 2048 x 2048 projection that is 6 KiB less per token and module in bfloat16 (LoRA) and
14 KiB (DoRA); 10 and 26 KiB in float32. Before keyed masks the fused path kept an I-byte bool mask per
token and module (2 KiB here). The price is a second mask computation per segment, in the backward (one
keyed mask, on int32 tensors, costs about a third of a ``bernoulli_`` draw on an AVX2 CPU; in float32 the
1 / (1 - p) of a LoRA segment goes on its [R, I] and [S, R] factors, not on [S, I] rows; with both, the layer
with dropout is within about 2% of the ``bernoulli_`` version it replaced: ``benchmarks/dropout_cost.py``).
PEFT's own mixed-batch loop saves more than the plain loop: an indexed *copy* of each adapter's input rows (``x[sub_batch_indices]``,
e*I per token). The price of DoRA's saving is one recomputed S x I x O matmul (x_S W^T, for the
magnitude's gradient) in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..masks import MaskSite, keep_mask
from ..models.decoder import BatchLike, Linear
from ..models.quant import base_linear, dense_weight
from .backend import LoraBackend
from .reference import batch_dropout_rows, check_segments, dora_weight_norm, reference_fused_lora

if TYPE_CHECKING:
    from .adapters import AdapterSpec

__all__ = ["FusedLoRALinear", "batch_dropout_rows", "dora_weight_norm", "reference_fused_lora"]


@dataclass(frozen=True)
class _Slot:
    """One adapter used by one call: its parameters are ``params[first : first + (3 if dora else 2)]``."""

    kind: str
    scaling: float
    dropout: float  # 0 outside training mode
    first: int


@dataclass(frozen=True)
class _Plan:
    slots: tuple[_Slot, ...]
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot index)
    site: MaskSite = MaskSite()
    rows: torch.Tensor | None = None  # [T] batch.dropout_rows when a slot has dropout, else None

    def keep(self, i: int, width: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Segment i's keep-mask [S, width] (1 / 0 in ``dtype``), or None when its adapter has no dropout in
        this call."""
        start, end, k = self.segments[i]
        p = self.slots[k].dropout
        return keep_mask(self.rows[start:end], self.site, width, p, dtype) if p > 0 else None


def _dora_scale(magnitude_O: torch.Tensor, norm_O: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """m / ||W'|| [O] computed in at least float32, returned in ``dtype``."""
    ct = torch.promote_types(dtype, torch.float32)
    return (magnitude_O.detach().to(ct) / norm_O.to(ct)).to(dtype)


def _fold_keep(dtype: torch.dtype) -> bool:
    """Whether a LoRA segment's 1 / (1 - p) goes on its small factors instead of its [S, I] rows.

    In float32 and wider the two orders round alike; in 16-bit types the reference's order (the rows
    scaled, then the matmul) is kept, so the fast path stays within the oracle's rounding.
    """
    return dtype.itemsize >= 4


def _gaps(plan: _Plan, num_rows: int, lora_only: bool) -> list[tuple[int, int]]:
    """Row ranges outside the segments (outside the plain-LoRA segments when ``lora_only``)."""
    gaps, cursor = [], 0
    for start, end, k in plan.segments:
        if not lora_only or plan.slots[k].kind == "lora":
            if start > cursor:
                gaps.append((cursor, start))
            cursor = end
    if cursor < num_rows:
        gaps.append((cursor, num_rows))
    return gaps


def _fused_forward(
    x_TI: torch.Tensor,
    weight_OI: torch.Tensor,
    bias_O: torch.Tensor | None,
    plan: _Plan,
    params: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]]:
    """y [T, O], the per-segment s * h and the per-slot DoRA norms; runs without autograd.

    The low-rank terms of plain-LoRA segments are written into y first and the base GEMM accumulates onto
    them (beta = 1): its read of y hides behind its arithmetic, where a separate ``y += ...`` would be one
    more read and write of those rows.
    """
    dt = x_TI.dtype
    t = x_TI.shape[0]
    y_TO = torch.empty(t, weight_OI.shape[0], dtype=dt, device=x_TI.device)
    norms: list[torch.Tensor | None] = [
        dora_weight_norm(weight_OI, params[s.first], params[s.first + 1], s.scaling, dt)
        if s.kind == "dora"
        else None
        for s in plan.slots
    ]
    saved: list[torch.Tensor] = []
    dora_inputs: dict[int, torch.Tensor] = {}  # DoRA segments with dropout: their dropped x, this call only
    for i, (start, end, k) in enumerate(plan.segments):
        slot = plan.slots[k]
        xd_SI = x_TI[start:end]
        mask_SI = plan.keep(i, x_TI.shape[1], dt)
        factor = slot.scaling
        if mask_SI is not None:
            xd_SI = xd_SI.mul(mask_SI)
            if slot.kind == "lora" and _fold_keep(dt):
                # 1 / (1 - p) goes on the [R, I] factor: one pass less over the [S, I] rows
                factor = slot.scaling / (1.0 - slot.dropout)
            else:
                xd_SI.mul_(1.0 / (1.0 - slot.dropout))
                if slot.kind == "dora":  # the base term needs the dropped-out x itself
                    dora_inputs[i] = xd_SI
        hs_SR = xd_SI @ (params[slot.first] * factor).to(dt).t()  # scaling * h
        if slot.kind == "lora":
            b_OR = params[slot.first + 1].to(dt)
            if bias_O is None:
                torch.mm(hs_SR, b_OR.t(), out=y_TO[start:end])
            else:
                torch.addmm(bias_O, hs_SR, b_OR.t(), out=y_TO[start:end])
        saved.append(hs_SR)
    for start, end in _gaps(plan, t, lora_only=True):
        if bias_O is None:
            y_TO[start:end].zero_()
        else:
            y_TO[start:end].copy_(bias_O.expand(end - start, -1))
    y_TO.addmm_(x_TI, weight_OI.t())
    for i, (start, end, k) in enumerate(plan.segments):
        slot = plan.slots[k]
        if slot.kind != "dora":
            continue
        hs_SR = saved[i]
        c_O = _dora_scale(params[slot.first + 2], norms[k], dt)
        bc_OR = params[slot.first + 1].to(dt) * c_O[:, None]
        y_SO = y_TO[start:end]
        if i not in dora_inputs:
            # y + (c - 1) * (y - b) == c * (y - b) + b: rescale the base rows in place.
            if bias_O is not None:
                y_SO.sub_(bias_O)
            y_SO.mul_(c_O)
            y_SO.addmm_(hs_SR, bc_OR.t())
            if bias_O is not None:
                y_SO.add_(bias_O)
        else:
            extra_SO = (dora_inputs.pop(i) @ weight_OI.t()).mul_(c_O - 1)
            y_SO.add_(extra_SO.addmm_(hs_SR, bc_OR.t()))
    return y_TO, saved, norms


class _FusedLoRAFunction(torch.autograd.Function):
    """Forward and exact backward of the fused layer; see the module docstring for the algorithm."""

    @staticmethod
    def forward(ctx, x_TI, weight_OI, bias_O, plan: _Plan, *params):
        # A quantized base (models/quant.py) is dequantized for this call only; the quantized one is saved.
        y_TO, saved, norms = _fused_forward(x_TI, dense_weight(weight_OI, x_TI.dtype), bias_O, plan, params)
        need_params = any(ctx.needs_input_grad[4:])
        ctx.plan = plan
        ctx.num_params = len(params)
        # x is needed only for the adapters' gradients; h only for B's: keep neither otherwise. Dropout
        # masks are not kept: the backward recomputes them from the plan's keys (plan.rows).
        keep_x = x_TI if need_params else None
        kept = saved if need_params else [None] * len(saved)
        ctx.save_for_backward(keep_x, weight_OI, *params, *kept, *norms)
        return y_TO

    @staticmethod
    def backward(ctx, g_TO):
        plan: _Plan = ctx.plan
        n = ctx.num_params
        x_TI, weight_OI, *rest = ctx.saved_tensors
        weight_OI = dense_weight(weight_OI, g_TO.dtype)
        params, rest = rest[:n], rest[n:]
        saved, norms = rest[: len(plan.segments)], rest[len(plan.segments) :]
        dt = g_TO.dtype
        g_TO = g_TO.contiguous()
        t = g_TO.shape[0]
        scales = [
            _dora_scale(params[s.first + 2], norms[k], dt) if s.kind == "dora" else None
            for k, s in enumerate(plan.slots)
        ]
        need_dx = ctx.needs_input_grad[0]
        dx_TI = torch.empty(t, weight_OI.shape[1], dtype=dt, device=g_TO.device) if need_dx else None
        gw_TO = g_TO  # what goes through W for all rows at once
        grads: list[torch.Tensor | None] = [None] * n
        for i, (start, end, k) in enumerate(plan.segments):
            slot, c_O = plan.slots[k], scales[k]
            hs_SR = saved[i]
            mask_SI = plan.keep(i, weight_OI.shape[1], dt)  # the forward's mask, recomputed from its keys
            s = slot.scaling
            keep = 1.0 / (1.0 - slot.dropout) if mask_SI is not None else 1.0
            a_RI, b_OR = params[slot.first].to(dt), params[slot.first + 1].to(dt)
            g_SO = g_TO[start:end]
            bc_OR = b_OR if c_O is None else b_OR * c_O[:, None]
            # scaling * (g c) B, the gradient of h; for LoRA with dropout also times 1 / (1 - p), so that
            # neither dA = us^T (x * mask) nor dx = (us A) * mask takes a pass over [S, I] for it.
            lora_drop = c_O is None and mask_SI is not None and _fold_keep(dt)
            us_SR = (g_SO @ bc_OR).mul_(s * keep if lora_drop else s)
            needs = ctx.needs_input_grad[4 + slot.first : 4 + slot.first + (3 if c_O is not None else 2)]
            xd_SI = None
            if any(needs):
                x_SI = x_TI[start:end]
                if mask_SI is None:
                    xd_SI = x_SI
                elif lora_drop:
                    xd_SI = x_SI.mul(mask_SI)
                else:
                    xd_SI = x_SI.mul(mask_SI).mul_(keep)
                ps_OR = (hs_SR.t() @ g_SO).t()  # scaling * g^T h
                new = [us_SR.t() @ xd_SI, ps_OR if c_O is None else ps_OR * c_O[:, None]]
                if c_O is not None:
                    ct = torch.promote_types(dt, torch.float32)
                    base_SO = xd_SI @ weight_OI.t()
                    dm = (g_SO * base_SO).sum(0).to(ct) + (b_OR * ps_OR).sum(1).to(ct)
                    new.append(dm / norms[k].to(ct))
                for j, d in enumerate(new):
                    d = d.to(params[slot.first + j].dtype)
                    grads[slot.first + j] = d if grads[slot.first + j] is None else grads[slot.first + j] + d
            if dx_TI is None:
                continue
            dx_SI = dx_TI[start:end]
            if c_O is not None and mask_SI is None:
                # Without dropout a DoRA row's base term is c * (x W^T): g goes through W scaled by c.
                if gw_TO is g_TO:
                    gw_TO = g_TO.clone()
                gw_TO[start:end].mul_(c_O)
            if mask_SI is None:
                torch.mm(us_SR, a_RI, out=dx_SI)
            elif c_O is None:  # 1 / (1 - p) on the [S, R] factor: one pass less over dx
                torch.mm(us_SR if lora_drop else us_SR.mul_(keep), a_RI, out=dx_SI)
                dx_SI.mul_(mask_SI)
            else:
                torch.mm(g_SO * (c_O - 1), weight_OI, out=dx_SI)
                dx_SI.addmm_(us_SR, a_RI)
                dx_SI.mul_(mask_SI).mul_(keep)
        if dx_TI is not None:
            for start, end in _gaps(plan, t, lora_only=False):
                dx_TI[start:end].zero_()
            dx_TI.addmm_(gw_TO, weight_OI)
        return (dx_TI, None, None, None, *grads)


class FusedLoRALinear(Linear):
    """A frozen ``Linear`` plus any number of LoRA / DoRA adapters, each applied to its own rows.

    Built from the ``Linear`` it replaces (sharing its ``weight`` and ``bias``). Adapters are added with
    ``add`` (``lorafleet.lora.add_adapter`` does that with PEFT's initialisation for every targeted module).
    ``forward(x_TI, batch)`` returns ``x W^T + b`` plus each segment's adapter update; see
    ``reference_fused_lora`` for the exact semantics. Dropout applies in training mode only, as in PEFT,
    with keyed masks (``lorafleet.masks``) at ``mask_site``: the layer's index and module id, which
    ``add_adapter`` sets when it swaps the layer in (``MaskSite(0, 0)`` for a layer built by hand).
    ``backend`` (``LoraBackend`` or its name) picks the implementation, once: it is read-only afterwards.
    """

    def __init__(
        self, base: Linear, site: MaskSite | None = None, backend: LoraBackend | str = LoraBackend.AUTO
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.training = base.training  # swapped into an eval-mode model, it must not start dropping out
        self._backend = LoraBackend.parse(backend)
        self.mask_site = site if site is not None else MaskSite()
        self.specs: dict[str, AdapterSpec] = {}
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()

    @property
    def backend(self) -> LoraBackend:
        """The implementation this layer runs (fixed when it was built)."""
        return self._backend

    def with_backend(self, backend: LoraBackend | str) -> FusedLoRALinear:
        """A twin of this layer running ``backend``: the very same weight, bias, mask site and adapter
        parameters (the same ``Parameter`` objects, so gradients land on them; adapters added to either
        are on both). For running one layer's adapters on two implementations side by side."""
        twin = FusedLoRALinear(self, self.mask_site, backend)
        twin.training = self.training
        twin.specs = self.specs
        twin.lora_A, twin.lora_B = self.lora_A, self.lora_B
        twin.lora_magnitude_vector = self.lora_magnitude_vector
        return twin

    def add(
        self,
        spec: AdapterSpec,
        a_RI: torch.Tensor,
        b_OR: torch.Tensor,
        magnitude_O: torch.Tensor | None = None,
    ) -> None:
        """Register adapter ``spec.name`` with the given initial A [R, I], B [O, R] (and DoRA magnitude [O])."""
        name = spec.name
        if name in self.specs:
            raise ValueError(
                f"adapter {name!r} is already on this layer; remove it first or pick another name"
            )
        r = spec.rank
        if tuple(a_RI.shape) != (r, self.in_features) or tuple(b_OR.shape) != (self.out_features, r):
            raise ValueError(
                f"adapter {name!r}: lora_A must be [{r}, {self.in_features}] and lora_B [{self.out_features}, {r}], "
                f"got {list(a_RI.shape)} and {list(b_OR.shape)}"
            )
        if (spec.kind == "dora") != (magnitude_O is not None):
            raise ValueError(
                f"adapter {name!r}: a magnitude vector is given iff kind is 'dora' (kind={spec.kind!r})"
            )
        if magnitude_O is not None and tuple(magnitude_O.shape) != (self.out_features,):
            raise ValueError(
                f"adapter {name!r}: magnitude must be [{self.out_features}], got {list(magnitude_O.shape)}"
            )
        self.specs[name] = spec
        self.lora_A[name] = nn.Parameter(a_RI)
        self.lora_B[name] = nn.Parameter(b_OR)
        if magnitude_O is not None:
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude_O)

    def remove(self, name: str) -> None:
        """Drop adapter ``name`` (no error when this layer does not hold it)."""
        if self.specs.pop(name, None) is None:
            return
        del self.lora_A[name]
        del self.lora_B[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def _plan(
        self, x_TI: torch.Tensor, batch: BatchLike | None
    ) -> tuple[_Plan, tuple[torch.Tensor, ...]] | None:
        if batch is None or not self.specs:
            return None
        segments = sorted(
            (s.start, s.end, s.adapter) for s in batch.segments if s.adapter in self.specs and s.end > s.start
        )
        if not segments:
            return None
        if x_TI.dim() != 2:
            raise ValueError(
                f"the fused LoRA layer takes rows [T, I]; got an input of shape {list(x_TI.shape)}"
            )
        check_segments(segments, x_TI.shape[0])
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            raise ValueError("the base weight of a fused LoRA layer must stay frozen (requires_grad=False)")
        index: dict[str, int] = {}
        slots: list[_Slot] = []
        params: list[torch.Tensor] = []
        planned = []
        for start, end, name in segments:
            if name not in index:
                spec = self.specs[name]
                index[name] = len(slots)
                slots.append(
                    _Slot(spec.kind, spec.scaling, spec.dropout if self.training else 0.0, len(params))
                )
                params += [self.lora_A[name], self.lora_B[name]]
                if spec.kind == "dora":
                    params.append(self.lora_magnitude_vector[name])
            planned.append((start, end, index[name]))
        rows = batch_dropout_rows(batch, x_TI.shape[0]) if any(s.dropout > 0 for s in slots) else None
        return _Plan(tuple(slots), tuple(planned), self.mask_site, rows), tuple(params)

    def forward(self, x: torch.Tensor, batch: BatchLike | None = None) -> torch.Tensor:
        planned = self._plan(x, batch)
        if planned is None:
            return base_linear(x, self.weight, self.bias)
        plan, params = planned
        backend = self._backend
        if backend is LoraBackend.TRITON or (backend is LoraBackend.AUTO and x.is_cuda):
            from .kernels import triton_fused_lora, triton_unsupported

            why = triton_unsupported(x, plan)
            if why is None:
                return triton_fused_lora(x, self.weight, self.bias, plan, params)
            if backend is LoraBackend.TRITON:
                raise ValueError(
                    f"LoRA backend 'triton' cannot run this call: {why}; build the layers with backend "
                    "'auto' or 'torch'"
                )
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
            return _FusedLoRAFunction.apply(x, self.weight, self.bias, plan, *params)
        with torch.no_grad():
            return _fused_forward(x, dense_weight(self.weight, x.dtype), self.bias, plan, params)[0]

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}:{s.kind}/r{s.rank}" for n, s in self.specs.items())
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters=[{kinds}]"
