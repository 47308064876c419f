"""The single-device decoder for the LLaMA family, runnable over a *range* of layers.

Legend: T tokens (packed, no padding), E hidden size, H query heads, K key/value heads, D head dim, V vocab.

A ``Decoder`` holds layers ``[first_layer, last_layer)`` of a model, plus the embedding when
``first_layer == 0`` and the final norm and head when ``last_layer == num_hidden_layers``. A pipeline stage is
just such a range; the full model is the range over all layers. Module and parameter names follow Hugging
Face's (without the leading ``model.``), so checkpoints and PEFT keys map one to one.

Every projection is called as ``proj(x_TE, batch)``: the frozen ``Linear`` ignores the batch, and the fused
multi-adapter linear of ``lorafleet.lora`` (swapped in from outside) reads the batch's adapter segments.
Attention is delegated to ``batch.attention`` so that packed training batches and KV-cached generation share
this code.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import FusedBatch
from .families import ModelConfig, rope_inv_freq

__all__ = ["BatchLike", "Decoder", "Linear", "RMSNorm"]


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
        sliding_window: int | None,
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


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back, as Hugging Face's LLaMA does."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        e, d = cfg.hidden_size, cfg.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.window = cfg.window_of(layer_idx)
        self.q_proj = Linear(e, self.num_heads * d, cfg.qkv_bias, dtype, device)
        self.k_proj = Linear(e, self.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.v_proj = Linear(e, self.num_kv_heads * d, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(self.num_heads * d, e, cfg.o_bias, dtype, device)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_TE: torch.Tensor, cos_TD: torch.Tensor, sin_TD: torch.Tensor, batch: BatchLike):
        t = x_TE.shape[0]
        q = self.q_proj(x_TE, batch).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x_TE, batch).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_TE, batch).view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_TD[:, None], sin_TD[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        o = batch.attention(q, k, v, self.layer_idx, self.window)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim), batch)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        e, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(e, i, cfg.mlp_bias, dtype, device)
        self.up_proj = Linear(e, i, cfg.mlp_bias, dtype, device)
        self.down_proj = Linear(i, e, cfg.mlp_bias, dtype, device)

    def forward(self, x_TE: torch.Tensor, batch: BatchLike) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_TE, batch)) * self.up_proj(x_TE, batch), batch)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, layer_idx, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, dtype, device)

    def forward(self, x_TE, cos_TD, sin_TD, batch: BatchLike) -> torch.Tensor:
        x_TE = x_TE + self.self_attn(self.input_layernorm(x_TE), cos_TD, sin_TD, batch)
        return x_TE + self.mlp(self.post_attention_layernorm(x_TE), batch)


class Decoder(nn.Module):
    """Layers ``[first_layer, last_layer)`` of a LLaMA-family model (all of them by default).

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
        self.embed_tokens = (
            nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
            if self.has_embed
            else None
        )
        if self.embed_tokens is not None:
            self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleDict(
            {str(i): DecoderLayer(cfg, i, dtype, device) for i in range(first_layer, last_layer)}
        )
        if self.has_head:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, dtype, device)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        else:
            self.norm = self.lm_head = None
        self.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.layers.values())).input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.inv_freq.device

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for the given positions, computed in float32 and cast to ``dtype``."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward_packed(self, x: torch.Tensor, batch: BatchLike, apply_head: bool = True) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)
        cos, sin = self.rope(batch.positions, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, batch)
        if self.norm is not None:
            x = self.norm(x)
            if apply_head:
                x = self.lm_head(x, batch)
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not (self.has_embed and self.has_head):
            raise ValueError("model(input_ids) needs the full model; a stage runs forward_packed(x, batch)")
        b, n = input_ids.shape
        logits = self.forward_packed(input_ids.reshape(-1), FusedBatch.from_rectangular(input_ids))
        return logits.view(b, n, -1)
