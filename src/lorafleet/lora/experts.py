"""LoRA on routed experts: many adapters on the fused 3-D expert tensors of an MoE layer at once.

Legend: T tokens, H hidden size, I expert intermediate size, E experts, R rank of one adapter, N routed
(token, expert) pairs, G groups of pairs that share an expert and an adapter.

``FusedLoRAExperts`` replaces a frozen ``models.moe.Experts`` (it *is* one: same ``gate_up_proj``
[E, 2I, H] and ``down_proj`` [E, H, I] parameters) and holds, per adapter and per targeted tensor, PEFT's
``target_parameters`` factors in PEFT's own layout: ``lora_A`` [E * R, in] (expert-major rows, expert e's
A is rows ``e*R : (e+1)*R``) and ``lora_B`` [out, R * E] (expert e's B is columns ``e, e+E, e+2E, ...``), so
that expert e's weight is ``W[e] + scaling * B_e A_e``, exactly PEFT 0.21's ``ParamWrapper``. As in PEFT,
expert LoRA has no dropout and no DoRA (``AdapterSpec`` refuses both), and the router stays frozen.

What it computes is ``reference_expert_lora`` (the ``Semantics:`` there is the contract), a plain loop over
(expert, adapter) pairs. The operator computes the same with one sort: the routed pairs are ordered by
(expert, adapter), so every expert reads one contiguous block of rows and every adapter one contiguous
sub-block of it. Per expert, ONE base GEMM covers all of the expert's rows whatever adapter they belong to
(the reference runs one per adapter), and each (expert, adapter) group adds its low-rank term on its own
slice: no masks, no per-group gathers or scatters; one gather of the inputs and one ``index_add_`` of the
weighted outputs for the whole layer. On CUDA with ``torch._grouped_mm`` (bfloat16) the base GEMMs of all
experts are one grouped GEMM over the expert offsets. The backward is autograd's through these ops
(checked against the reference loop and with ``torch.autograd.gradcheck`` in tests/test_lora_experts.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..models.moe import ExpertRouting, Experts, combine

if TYPE_CHECKING:
    from .adapters import AdapterSpec

__all__ = ["EXPERT_TARGETS", "FusedLoRAExperts", "expert_delta", "expert_peft_keys", "reference_expert_lora"]

# Adapter target names of the expert tensors (PEFT's target_parameters, relative to the MoE block).
EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
_PARAMS = ("gate_up_proj", "down_proj")


def expert_peft_keys(targets: tuple[str, ...]) -> dict[str, str]:
    """Expert tensor -> the module path suffix of its LoRA keys in a PEFT state dict.

    PEFT wraps each targeted parameter of a module in a ``ParamWrapper``, nesting them in the order the
    module registers its parameters (gate_up_proj, then down_proj): the innermost wrapper's keys carry one
    ``base_layer.`` per wrapper around it. With both targeted, gate_up_proj's keys are
    ``...experts.base_layer.lora_A.weight`` and down_proj's ``...experts.lora_A.weight``.
    """
    chosen = [p for p in _PARAMS if f"experts.{p}" in targets]
    n = len(chosen)
    return {p: "experts" + ".base_layer" * (n - 1 - k) for k, p in enumerate(chosen)}


@dataclass(frozen=True)
class _Slot:
    scaling: float
    rank: int
    gate_up: tuple[torch.Tensor, torch.Tensor] | None  # (A [E*R, H], B [2I, R*E]) when targeted
    down: tuple[torch.Tensor, torch.Tensor] | None  # (A [E*R, I], B [H, R*E])


def _factors(ab: tuple[torch.Tensor, torch.Tensor], e: int, rank: int, num_experts: int, dtype):
    """Expert e's (A_e [R, in], B_e [out, R]) from PEFT's layout."""
    a, b = ab
    a_e = a[e * rank : (e + 1) * rank]
    b_e = b[:, e::num_experts]
    return a_e.to(dtype), b_e.to(dtype)


def expert_delta(a_XI: torch.Tensor, b_OX: torch.Tensor, rank: int, num_experts: int) -> torch.Tensor:
    """Every expert's dense update ``B_e A_e`` [E, out, in] (float32) from PEFT's layout (X = E * R).

    Expert e's factors are the ones ``_factors`` takes (A rows ``e*R:(e+1)*R``, B columns ``e::E``): the
    weight an adapter gives expert e is ``W[e] + scaling * expert_delta(...)[e]``, PEFT's ``get_delta_weight``.
    """
    a_ERI = a_XI.to(torch.float32).reshape(num_experts, rank, a_XI.shape[1])
    b_ORE = b_OX.to(torch.float32).reshape(b_OX.shape[0], rank, num_experts)
    return torch.einsum("ore,eri->eoi", b_ORE, a_ERI)


def _adapter_per_token(layer: FusedLoRAExperts, batch, t: int, device) -> tuple[torch.Tensor, list[_Slot]]:
    """Slot index per token [T] (-1: no adapter on this layer) and the slots, in order of appearance."""
    slot_T = torch.full((t,), -1, dtype=torch.long)
    slots: list[_Slot] = []
    index: dict[str, int] = {}
    for seg in getattr(batch, "segments", ()) if batch is not None else ():
        if seg.adapter not in layer.specs or seg.end <= seg.start:
            continue
        if seg.adapter not in index:
            index[seg.adapter] = len(slots)
            slots.append(layer.slot(seg.adapter))
        slot_T[seg.start : seg.end] = index[seg.adapter]
    return slot_T.to(device), slots


def reference_expert_lora(
    layer: FusedLoRAExperts, x_TH: torch.Tensor, routing: ExpertRouting, batch
) -> torch.Tensor:
    """The contract of ``FusedLoRAExperts``, as a plain loop over (expert, adapter) pairs (the test oracle).

    Semantics:
        out = zeros(T, H)
        for each expert e, for each adapter a (or none) with tokens routed to e:
            rows = the pairs (token t, weight w) routed to e whose token belongs to a's segments
            xs = x[t of rows]
            g = xs @ gate_up_proj[e].T + (a targets gate_up ? s_a * xs @ A_gu[a, e].T @ B_gu[a, e].T : 0)
            gate, up = g.chunk(2)
            m = act(gate) * up
            y = m @ down_proj[e].T + (a targets down ? s_a * m @ A_d[a, e].T @ B_d[a, e].T : 0)
            out[t of rows] += w of rows * y          # in float32 at least, then x's dtype
        with A_*[a, e], B_*[a, e] expert e's factors of PEFT's layout (module docstring).
    Gradients flow to x (also through the routing weights) and to every adapter's factors.
    """
    slot_T, slots = _adapter_per_token(layer, batch, x_TH.shape[0], x_TH.device)
    slot_N = slot_T[routing.token_N]
    out = torch.zeros_like(x_TH)
    dt = x_TH.dtype
    for e in range(layer.num_experts):
        for k in range(-1, len(slots)):
            sel = ((routing.expert_N == e) & (slot_N == k)).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            tok, w = routing.token_N[sel], routing.weight_N[sel]
            xs = x_TH[tok]
            g = F.linear(xs, layer.gate_up_proj[e])
            slot = slots[k] if k >= 0 else None
            if slot is not None and slot.gate_up is not None:
                a, b = _factors(slot.gate_up, e, slot.rank, layer.num_experts, dt)
                g = g + slot.scaling * F.linear(F.linear(xs, a), b)
            gate, up = g.chunk(2, dim=-1)
            m = layer.act(gate) * up
            y = F.linear(m, layer.down_proj[e])
            if slot is not None and slot.down is not None:
                a, b = _factors(slot.down, e, slot.rank, layer.num_experts, dt)
                y = y + slot.scaling * F.linear(F.linear(m, a), b)
            ct = torch.promote_types(dt, torch.float32)
            out = out.index_add(0, tok, (y.to(ct) * w[:, None]).to(dt))
    return out


def _grouped_base(xs_NI: torch.Tensor, w_EOI: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor:
    """Rows of expert e (``offsets[e]:offsets[e+1]``) times ``w_EOI[e].T``: one GEMM per expert, or one
    grouped GEMM on CUDA where torch has it (bfloat16).

    The rows are cut with ``split`` (its backward is one concatenation), not by slicing (each slice's
    backward would write a zero tensor of the whole input).
    """
    grouped = getattr(torch, "_grouped_mm", None)
    if grouped is not None and xs_NI.is_cuda and xs_NI.dtype == torch.bfloat16 and xs_NI.shape[0] > 0:
        offs = torch.tensor(offsets[1:], dtype=torch.int32, device=xs_NI.device)
        return grouped(xs_NI, w_EOI.transpose(1, 2), offs=offs)
    sizes = [hi - lo for lo, hi in zip(offsets[:-1], offsets[1:])]
    chunks = xs_NI.split(sizes)
    return torch.cat([F.linear(c, w_EOI[e]) for e, c in enumerate(chunks) if c.shape[0]])


def _add_lora(
    y_NO: torch.Tensor, x_NI: torch.Tensor, groups, slots: list[_Slot], which: str, num_experts: int
) -> torch.Tensor:
    """y plus each (expert, adapter) group's low-rank term on its own contiguous rows (cut by ``split``)."""
    cuts, owners, cursor = [], [], 0
    for e, k, lo, hi in groups:
        ab = slots[k].gate_up if which == "gate_up" else slots[k].down
        if ab is None:
            continue
        if lo > cursor:
            cuts.append(lo - cursor)
            owners.append(None)
        cuts.append(hi - lo)
        owners.append((e, slots[k], ab))
        cursor = hi
    if not owners:
        return y_NO
    if cursor < y_NO.shape[0]:
        cuts.append(y_NO.shape[0] - cursor)
        owners.append(None)
    out = []
    for y, x, owner in zip(y_NO.split(cuts), x_NI.split(cuts), owners):
        if owner is None:
            out.append(y)
            continue
        e, slot, ab = owner
        a, b = _factors(ab, e, slot.rank, num_experts, x.dtype)
        out.append(y + slot.scaling * F.linear(F.linear(x, a), b))
    return torch.cat(out)


class FusedLoRAExperts(Experts):
    """Frozen experts plus any number of LoRA adapters on ``gate_up_proj`` and / or ``down_proj``.

    Built from the ``Experts`` it replaces (sharing its tensors). ``forward(x, routing, batch)`` returns
    the weighted sum of the experts' outputs per token; see ``reference_expert_lora`` for the semantics.
    """

    def __init__(self, base: Experts) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.hidden_size = base.num_experts, base.hidden_size
        self.intermediate_size = base.intermediate_size
        self.gate_up_proj, self.down_proj = base.gate_up_proj, base.down_proj
        self.hidden_act, self.act = base.hidden_act, base.act
        self.training = base.training
        self.specs: dict[str, AdapterSpec] = {}
        self.gate_up_lora_A, self.gate_up_lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.down_lora_A, self.down_lora_B = nn.ParameterDict(), nn.ParameterDict()

    def shapes(self, param: str) -> tuple[int, int]:
        """(in, out) features of one expert's matrix of ``param`` (gate_up_proj or down_proj)."""
        w = getattr(self, param)
        return w.shape[2], w.shape[1]

    def add(self, spec: AdapterSpec, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Register adapter ``spec.name`` with PEFT-layout (A [E*R, in], B [out, R*E]) per targeted tensor."""
        name = spec.name
        if name in self.specs:
            raise ValueError(f"adapter {name!r} is already on these experts; remove it first")
        for param, (a, b) in factors.items():
            i, o = self.shapes(param)
            er = self.num_experts * spec.rank
            if tuple(a.shape) != (er, i) or tuple(b.shape) != (o, er):
                raise ValueError(
                    f"adapter {name!r}: experts.{param} needs lora_A [{er}, {i}] and lora_B [{o}, {er}], "
                    f"got {list(a.shape)} and {list(b.shape)}"
                )
            prefix = "gate_up" if param == "gate_up_proj" else "down"
            getattr(self, f"{prefix}_lora_A")[name] = nn.Parameter(a)
            getattr(self, f"{prefix}_lora_B")[name] = nn.Parameter(b)
        self.specs[name] = spec

    def remove(self, name: str) -> None:
        if self.specs.pop(name, None) is None:
            return
        for d in (self.gate_up_lora_A, self.gate_up_lora_B, self.down_lora_A, self.down_lora_B):
            if name in d:
                del d[name]

    def parameters_of(self, name: str) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Targeted tensor -> (lora_A, lora_B) of adapter ``name``."""
        out = {}
        if name in self.gate_up_lora_A:
            out["gate_up_proj"] = (self.gate_up_lora_A[name], self.gate_up_lora_B[name])
        if name in self.down_lora_A:
            out["down_proj"] = (self.down_lora_A[name], self.down_lora_B[name])
        return out

    def slot(self, name: str) -> _Slot:
        spec, own = self.specs[name], self.parameters_of(name)
        return _Slot(spec.scaling, spec.rank, own.get("gate_up_proj"), own.get("down_proj"))

    def forward(self, x_TH: torch.Tensor, routing: ExpertRouting, batch=None) -> torch.Tensor:
        slot_T, slots = _adapter_per_token(self, batch, x_TH.shape[0], x_TH.device)
        if not slots:
            return super().forward(x_TH, routing, batch)
        n_slots = len(slots) + 1  # slot -1 (no adapter) sorts first within an expert
        key_N = routing.expert_N * n_slots + (slot_T[routing.token_N] + 1)
        order = torch.argsort(key_N, stable=True)  # within an expert block only: expert order is kept
        token_N = routing.token_N[order]
        counts = torch.bincount(key_N, minlength=self.num_experts * n_slots).tolist()
        groups, lo = [], 0
        for g, c in enumerate(counts):
            e, k = divmod(g, n_slots)
            if c and k > 0:
                groups.append((e, k - 1, lo, lo + c))
            lo += c
        xs_NH = x_TH.index_select(0, token_N)
        g_NO = _grouped_base(xs_NH, self.gate_up_proj, routing.offsets)
        g_NO = _add_lora(g_NO, xs_NH, groups, slots, "gate_up", self.num_experts)
        gate, up = g_NO.chunk(2, dim=-1)
        m_NI = self.act.gated(gate, up)
        y_NH = _grouped_base(m_NI, self.down_proj, routing.offsets)
        y_NH = _add_lora(y_NH, m_NI, groups, slots, "down", self.num_experts)
        sorted_routing = ExpertRouting(
            token_N, routing.weight_N[order], routing.expert_N[order], routing.offsets
        )
        return combine(x_TH, y_NH, sorted_routing)

    def extra_repr(self) -> str:
        kinds = ", ".join(f"{n}:r{s.rank}" for n, s in self.specs.items())
        return f"experts={self.num_experts}, adapters=[{kinds}]"


def init_expert_factors(
    layer: Experts, spec: AdapterSpec, params: tuple[str, ...], g: torch.Generator, dtype
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's initialisation of expert LoRA: A as ``nn.Linear(in, E*R)`` (kaiming uniform, a=sqrt(5)), B 0."""
    out = {}
    dev = layer.gate_up_proj.device
    for param in params:
        w = getattr(layer, param)
        i, o = w.shape[2], w.shape[1]
        a = torch.empty(layer.num_experts * spec.rank, i, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[param] = (
            a.to(device=dev, dtype=dtype),
            torch.zeros(o, layer.num_experts * spec.rank, device=dev, dtype=dtype),
        )
    return out
