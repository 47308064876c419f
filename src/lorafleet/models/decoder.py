"""The single-device decoder of every supported family, runnable over a *range* of layers.

Legend: T tokens (packed, no padding), E hidden size, H query heads, K key/value heads, D head dim, V vocab.

A ``Decoder`` holds layers ``[first_layer, last_layer)`` of a model, plus the embedding when
``first_layer == 0`` and the final norm and head when ``last_layer == num_hidden_layers``. A pipeline stage is
just such a range; the full model is the range over all layers. Module and parameter names follow Hugging
Face's (without the leading ``model.``), so checkpoints and PEFT keys map one to one.

Every projection is called as ``proj(x_TE, batch)``: the frozen ``Linear`` ignores the batch, and the fused
multi-adapter linear of ``lorafleet.lora`` (swapped in from outside) reads the batch's adapter segments.
Attention is delegated to ``batch.attention`` (which ends in ``models.attention.attend``) so that packed
training batches and KV-cached generation share this code. Family differences (``models/families.py``) are
read from the ``ModelConfig``: norm offset, sandwich norms, fused projections, per-layer rope and window,
attention scale and soft-cap, routed experts (``models/moe.py``), the head's final soft-cap (``LMHead``).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionSpec
from .families import ModelConfig, RopeSpec, rope_inv_freq
from .moe import SparseMoE

__all__ = ["Activation", "BatchLike", "Decoder", "LMHead", "Linear", "RMSNorm", "activation"]


class BatchLike(Protocol):
    """What the decoder needs of a batch: positions, adapter segments and an attention routine."""

    positions: torch.Tensor
    segments: tuple

    def attention(
        self,
        q_THD: torch.Tensor,
        k_TKD: torch.Tensor,
        v_TKD: torch.Tensor,
        layer_idx: int,
        spec: AttentionSpec,
    ) -> torch.Tensor: ...


class Linear(nn.Module):
    """A frozen linear layer ``y = x W^T + b`` called as ``layer(x, batch)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), False) if bias else None
        )

    def forward(self, x: torch.Tensor, batch: BatchLike | None = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class LMHead(Linear):
    """The output head: ``logits = x W^T``, then ``softcap * tanh(logits / softcap)`` when ``softcap`` is set.

    The training losses read ``weight``, ``bias`` and ``softcap`` of this module (``train/logprobs.py``), so
    generation, evaluation and the loss see the same logits.
    """

    def __init__(self, in_features: int, out_features: int, softcap: float | None, dtype, device) -> None:
        super().__init__(in_features, out_features, False, dtype, device)
        self.softcap = softcap

    def forward(self, x: torch.Tensor, batch: BatchLike | None = None) -> torch.Tensor:
        logits = F.linear(x, self.weight, self.bias)
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, as Hugging Face's models do.

    ``offset`` 0 (LLaMA): ``w * normed.to(dtype)``; ``offset`` 1 (Gemma): ``(normed * (1 + w)).to(dtype)``
    with the product in float32.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device, offset: float = 0.0) -> None:
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


class Activation:
    """The MLP activation of ``ModelConfig.hidden_act``: ``act(x)``, and ``act.gated(gate, up)`` for the
    gated MLP's ``act(gate) * up``.

    ``gated`` computes the same numbers as ``act(gate) * up`` under autograd, forward and backward, bit for
    bit, with less memory: autograd would keep gate, act(gate) and up (three [T, I] tensors per layer) and
    allocate act(gate) and the product; ``gated`` keeps gate and up, writes the product over act(gate), and
    recomputes act(gate) in the backward (one elementwise pass over [T, I]).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._approximate = "tanh" if name == "gelu_pytorch_tanh" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) if self._approximate is None else F.gelu(x, approximate=self._approximate)

    def backward(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """d act(x) / dx times ``grad`` (torch's own fused backward kernels)."""
        if self._approximate is None:
            return torch.ops.aten.silu_backward(grad, x)
        return torch.ops.aten.gelu_backward(grad, x, approximate=self._approximate)

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            return _GatedProduct.apply(gate, up, self)
        return self(gate).mul_(up)


class _GatedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: Activation) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = ctx.act.backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = ctx.act(gate).mul_(grad) if ctx.needs_input_grad[1] else None
        return d_gate, d_up, None


def activation(name: str) -> Activation:
    """The MLP activation of ``ModelConfig.hidden_act`` (``families._ACTIVATIONS``)."""
    return Activation(name)


class _Rope(torch.autograd.Function):
    """``x * cos + rotate_half(x) * sin`` over the last dim, and its backward, in half-width passes.

    The same numbers as the plain expression under autograd, bit for bit (each product and sum rounds
    once, as there; x, cos and sin share a dtype), without its temporaries: the negated half, the rotated
    copy and its full-width product with sin, forward and backward alike. One full-width product and four
    half-width passes each way; forward and backward of [4000, 8, 64] float32 7.0 ms -> 4.7 ms (2 threads).
    Nothing is saved but cos and sin.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_pass(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        # d/dx of (x1 c1 - x2 s1, x2 c2 + x1 s2) is (g1 c1 + g2 s2, g2 c2 - g1 s1): the same pass with sin's
        # halves swapped, which the sign flip gives.
        return _rope_pass(g, cos, sin, sign=-1.0), None, None


def _rope_pass(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """sign 1: (x1 c1 - x2 s1, x2 c2 + x1 s2); sign -1: (x1 c1 + x2 s2, x2 c2 - x1 s1)."""
    h = x.shape[-1] // 2
    out = x * cos
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    s1, s2 = sin[..., :h], sin[..., h:]
    if sign > 0:
        tmp = torch.mul(x2, s1)
        o1.sub_(tmp)
        o2.add_(torch.mul(x1, s2, out=tmp))
    else:
        tmp = torch.mul(x2, s2)
        o1.add_(tmp)
        o2.sub_(torch.mul(x1, s1, out=tmp))
    return out


def _apply_rope(x_THD: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of every head (all of them unless the family uses partial rotary)."""
    r = cos_TR.shape[-1]
    cos, sin = cos_TR[:, None], sin_TR[:, None]
    if r == x_THD.shape[-1]:
        return _Rope.apply(x_THD, cos, sin)
    rot, rest = x_THD[..., :r], x_THD[..., r:]
    return torch.cat((_Rope.apply(rot, cos, sin), rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        e, d = cfg.hidden_size, cfg.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.spec = AttentionSpec(cfg.window_of(layer_idx), cfg.attention_scale(), cfg.attn_logit_softcapping)
        self.fused_qkv = cfg.fused_qkv
        if cfg.fused_qkv:
            self.qkv_proj = Linear(
                e, (self.num_heads + 2 * self.num_kv_heads) * d, cfg.qkv_bias, dtype, device
            )
        else:
            self.q_proj = Linear(e, self.num_heads * d, cfg.qkv_bias, dtype, device)
            self.k_proj = Linear(e, self.num_kv_heads * d, cfg.qkv_bias, dtype, device)
            self.v_proj = Linear(e, self.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(self.num_heads * d, e, cfg.o_bias, dtype, device)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_TE: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor, batch: BatchLike):
        t, h, kv, d = x_TE.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused_qkv:
            q, k, v = self.qkv_proj(x_TE, batch).split([h * d, kv * d, kv * d], dim=-1)
        else:
            q, k, v = self.q_proj(x_TE, batch), self.k_proj(x_TE, batch), self.v_proj(x_TE, batch)
        q, k, v = q.reshape(t, h, d), k.reshape(t, kv, d), v.reshape(t, kv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _apply_rope(q, cos_TR, sin_TR), _apply_rope(k, cos_TR, sin_TR)
        o = batch.attention(q, k, v, self.layer_idx, self.spec)
        return self.o_proj(o.reshape(t, h * d), batch)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        e, i = cfg.hidden_size, cfg.intermediate_size
        self.act = activation(cfg.hidden_act)
        self.fused_gate_up = cfg.fused_gate_up
        if cfg.fused_gate_up:
            self.gate_up_proj = Linear(e, 2 * i, cfg.mlp_bias, dtype, device)
        else:
            self.gate_proj = Linear(e, i, cfg.mlp_bias, dtype, device)
            self.up_proj = Linear(e, i, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(i, e, cfg.mlp_bias, dtype, device)

    def forward(self, x_TE: torch.Tensor, batch: BatchLike) -> torch.Tensor:
        if self.fused_gate_up:
            gate, up = self.gate_up_proj(x_TE, batch).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x_TE, batch), self.up_proj(x_TE, batch)
        return self.down_proj(self.act.gated(gate, up), batch)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        e, eps, off = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(e, eps, dtype, device, off)
        self.self_attn = Attention(cfg, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(e, eps, dtype, device, off)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            self.pre_feedforward_layernorm = RMSNorm(e, eps, dtype, device, off)
            self.post_feedforward_layernorm = RMSNorm(e, eps, dtype, device, off)
        self.mlp = SparseMoE(cfg, dtype, device) if cfg.is_moe_layer(layer_idx) else MLP(cfg, dtype, device)

    def forward(self, x_TE, cos_TR, sin_TR, batch: BatchLike) -> torch.Tensor:
        h_TE = self.self_attn(self.input_layernorm(x_TE), cos_TR, sin_TR, batch)
        if not self.sandwich:
            x_TE = x_TE + h_TE
            return x_TE + self.mlp(self.post_attention_layernorm(x_TE), batch)
        x_TE = x_TE + self.post_attention_layernorm(h_TE)
        h_TE = self.mlp(self.pre_feedforward_layernorm(x_TE), batch)
        return x_TE + self.post_feedforward_layernorm(h_TE)


def _last_positions(batch: BatchLike) -> torch.Tensor | None:
    """Per token, the last position of its sequence, for a batch of whole sequences (``cu_seqlens``)."""
    cu = getattr(batch, "cu_seqlens", None)
    if cu is None:
        return None
    lens = cu[1:] - cu[:-1]
    return torch.repeat_interleave(lens - 1, lens)


class Decoder(nn.Module):
    """Layers ``[first_layer, last_layer)`` of a model of any supported family (all of them by default).

    ``model(input_ids)`` with input_ids [B, L] returns logits [B, L, V] (full range only).
    ``model.forward_packed(x, batch)`` is the stage entry: x is token ids [T] on the first stage, hidden
    states [T, E] elsewhere; returns logits [T, V] on the last stage (or hidden [T, E] with
    ``apply_head=False``), hidden states [T, E] elsewhere.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        first_layer: int = 0,
        last_layer: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        n = cfg.num_hidden_layers
        last_layer = n if last_layer is None else last_layer
        if not 0 <= first_layer < last_layer <= n:
            raise ValueError(f"layer range [{first_layer}, {last_layer}) is not inside [0, {n})")
        self.config = cfg
        self.first_layer, self.last_layer = first_layer, last_layer
        self.has_embed, self.has_head = first_layer == 0, last_layer == n
        # Uninitialized, as every weight here: the loader fills it (nn.Embedding's own normal_ init took
        # 0.27 s of startup for a 49152 x 512 table, written over at once).
        self.embed_tokens = (
            nn.Embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                _weight=torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                _freeze=True,
            )
            if self.has_embed
            else None
        )
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, dtype, device) for i in range(first_layer, last_layer)}
        )
        if self.has_head:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device, cfg.norm_offset)
            self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.final_logit_softcapping, dtype, device)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        else:
            self.norm = self.lm_head = None
        # One rope per distinct RopeSpec of the layers held (Gemma 3: one per layer type); LongRoPE keeps
        # its short and long frequencies and picks per call, as transformers does.
        self._rope_specs: list[RopeSpec] = []
        self._layer_rope: dict[int, int] = {}
        for i in range(first_layer, last_layer):
            spec = cfg.rope_of(i)
            if spec not in self._rope_specs:
                self._rope_specs.append(spec)
            self._layer_rope[i] = self._rope_specs.index(spec)
        self._rope_factor: list[tuple[float, float]] = []
        for j, spec in enumerate(self._rope_specs):
            short, f_short = rope_inv_freq(spec, long=False)
            long, f_long = rope_inv_freq(spec, long=True)
            self.register_buffer(f"inv_freq_{j}", short.to(device), persistent=False)
            self.register_buffer(f"inv_freq_long_{j}", long.to(device), persistent=False)
            self._rope_factor.append((f_short, f_long))
        self.embed_multiplier = cfg.hidden_size**0.5 if cfg.embed_scale else None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).input_layernorm.weight.dtype

    @property
    def inv_freq(self) -> torch.Tensor:
        """The (short) inverse frequencies of the first rope; GGUF's rope factors are applied in place."""
        return self.inv_freq_0

    @property
    def device(self) -> torch.device:
        return self.inv_freq_0.device

    def rope(
        self,
        positions: torch.Tensor,
        dtype: torch.dtype,
        which: int = 0,
        last_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, R] of rope ``which`` for the given positions, in float32, cast to ``dtype``.

        LongRoPE: a token takes the long factors when its sequence reaches past the original context
        (``last_positions``: the last position of each token's sequence; None: the positions themselves,
        as in a decode step), the short ones otherwise. For one sequence that is transformers' rule (its
        forward decides by the largest position of the call), for a packed batch each sequence as if alone.
        """
        spec = self._rope_specs[which]
        short = getattr(self, f"inv_freq_{which}")
        factor_short, factor_long = self._rope_factor[which]
        freqs = positions.float()[:, None] * short[None, :]
        factor: float | torch.Tensor = factor_short
        if spec.scaling and spec.scaling.get("rope_type") == "longrope":
            last = positions if last_positions is None else last_positions
            long_T = (last + 1 > int(spec.scaling["original_max_position_embeddings"]))[:, None]
            long_freqs = positions.float()[:, None] * getattr(self, f"inv_freq_long_{which}")[None, :]
            freqs = torch.where(long_T, long_freqs, freqs)
            factor = torch.where(long_T, factor_long, factor_short)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if not isinstance(factor, float) or factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)

    def forward_packed(self, x: torch.Tensor, batch: BatchLike, apply_head: bool = True) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
            if self.embed_multiplier is not None:  # as transformers: the scale cast to the weights' dtype
                x = x * torch.tensor(self.embed_multiplier, dtype=x.dtype)
        last = _last_positions(batch)
        ropes = {j: self.rope(batch.positions, x.dtype, j, last) for j in range(len(self._rope_specs))}
        for i, layer in self.layers.items():
            cos, sin = ropes[self._layer_rope[int(i)]]
            x = layer(x, cos, sin, batch)
        if self.norm is not None:
            x = self.norm(x)
            if apply_head:
                x = self.lm_head(x, batch)
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.has_embed and self.has_head):
            raise ValueError("model(input_ids) needs the full model; a stage runs forward_packed(x, batch)")
        from ..batch import FusedBatch

        b, n = input_ids.shape
        logits = self.forward_packed(input_ids.reshape(-1), FusedBatch.from_rectangular(input_ids))
        return logits.view(b, n, -1)
