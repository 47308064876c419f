"""Top-k routed experts (Mixtral, Qwen3-MoE), with the expert weights in transformers' fused layout.

Legend: T tokens, H hidden size, I expert intermediate size, E experts, K experts per token (top-k),
N routed (token, expert) pairs = T * K.

``SparseMoE`` is the ``mlp`` of an MoE layer: ``gate`` (the router, frozen [E, H]) and ``experts``, whose
parameters are named as transformers names them in memory, ``experts.gate_up_proj`` [E, 2I, H] (gate rows
first) and ``experts.down_proj`` [E, H, I], so PEFT's ``target_parameters`` keys map one to one.

Routing (``route``): softmax over the router logits in float32 (float64 stays float64), the top K, renormalised to sum 1 unless
``norm_topk_prob`` is false (Qwen3-MoE may turn it off; Mixtral always renormalises). The pairs are then
sorted by expert so every expert reads one contiguous block of rows: ``ExpertRouting`` is that order, and
the fused LoRA expert operator (``lorafleet.lora.experts``) sorts each expert's block further by adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .families import ModelConfig

__all__ = ["ExpertRouting", "Experts", "SparseMoE", "expert_forward", "route"]


@dataclass(frozen=True)
class ExpertRouting:
    """The routed pairs of one call, sorted by expert.

    Attributes:
        token_N: the token (row of x) of each pair, in expert order.
        weight_N: its routing weight (float32).
        expert_N: its expert.
        offsets: ``offsets[e] : offsets[e + 1]`` are expert e's pairs (E + 1 numbers, on the CPU).
    """

    token_N: torch.Tensor
    weight_N: torch.Tensor
    expert_N: torch.Tensor
    offsets: tuple[int, ...]


def route(logits_TE: torch.Tensor, top_k: int, normalize: bool) -> ExpertRouting:
    """Top-k routing of every token (module docstring), as ``ExpertRouting``."""
    probs = torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)
    weight_TK, expert_TK = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
    t, e = logits_TE.shape
    expert_N = expert_TK.reshape(-1)
    order = torch.argsort(expert_N, stable=True)
    token_N = torch.arange(t, device=logits_TE.device).repeat_interleave(top_k)[order]
    counts = torch.bincount(expert_N, minlength=e).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return ExpertRouting(token_N, weight_TK.reshape(-1)[order], expert_N[order], tuple(offsets))


def expert_forward(experts: Experts, x_TH: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """The frozen experts on their routed tokens, weighted and summed per token: [T, H].

    Semantics (transformers' loop):
        out = zeros(T, H)
        for each pair n (token t, expert e, weight w):
            gate, up = (x[t] @ gate_up_proj[e].T).chunk(2)
            out[t] += w * ((act(gate) * up) @ down_proj[e].T)
    """
    xs_NH = x_TH.index_select(0, routing.token_N)
    sizes = [hi - lo for lo, hi in zip(routing.offsets[:-1], routing.offsets[1:])]
    ys = []
    for e, xs in enumerate(xs_NH.split(sizes)):  # split, not slices: its backward is one concatenation
        if xs.shape[0] == 0:
            continue
        gate, up = F.linear(xs, experts.gate_up_proj[e]).chunk(2, dim=-1)
        ys.append(F.linear(experts.act.gated(gate, up), experts.down_proj[e]))
    return combine(x_TH, torch.cat(ys), routing)


def combine(x_TH: torch.Tensor, y_NH: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
    """Sum each pair's output, times its routing weight (in float32 at least), into its token's row."""
    ct = torch.promote_types(y_NH.dtype, torch.float32)
    weighted = (y_NH.to(ct) * routing.weight_N[:, None]).to(x_TH.dtype)
    return torch.zeros_like(x_TH).index_add_(0, routing.token_N, weighted)


class Experts(nn.Module):
    """The frozen expert weights of one layer; ``experts(x, routing, batch)`` runs ``expert_forward``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        from .decoder import activation

        e, h = cfg.num_experts, cfg.hidden_size
        i = cfg.moe_intermediate_size or cfg.intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = e, h, i
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h, dtype=dtype, device=device), False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i, dtype=dtype, device=device), False)
        self.hidden_act = cfg.hidden_act
        self.act = activation(cfg.hidden_act)

    def forward(self, x_TH: torch.Tensor, routing: ExpertRouting, batch=None) -> torch.Tensor:
        return expert_forward(self, x_TH, routing)


class _Router(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.empty(cfg.num_experts, cfg.hidden_size, dtype=dtype, device=device), False
        )


class SparseMoE(nn.Module):
    """The MoE ``mlp`` of one layer: route with the frozen ``gate``, then run the ``experts``."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.top_k, self.normalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = _Router(cfg, dtype, device)
        self.experts = Experts(cfg, dtype, device)

    def forward(self, x_TH: torch.Tensor, batch=None) -> torch.Tensor:
        routing = route(F.linear(x_TH, self.gate.weight), self.top_k, self.normalize)
        return self.experts(x_TH, routing, batch)
