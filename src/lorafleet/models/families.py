"""Per-family differences of the LLaMA family, as data.

One ``ModelConfig`` describes every supported model; the differences between LLaMA 2/3, Mistral, Qwen2,
Qwen3 and SmolLM2 are a handful of flags (biases, q/k norms, tied embeddings, rope scaling, sliding window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelConfig", "UnsupportedModelError", "rope_inv_freq"]


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model lorafleet cannot run."""


# HF architecture name -> (model_type, flags that differ from plain LLaMA)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {"qkv_bias": True}),
    "Qwen3ForCausalLM": ("qwen3", {"qk_norm": True}),
}
_MODEL_TYPES = {mt: arch for arch, (mt, _) in SUPPORTED_ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """The shape and flags of one decoder. Field names follow Hugging Face's config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # bias on q, k, v (Qwen2)
    o_bias: bool = False  # bias on o (LLaMA's attention_bias puts it on q, k, v and o)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture][0]

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def num_matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (all linear layers and the head)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        return self.num_hidden_layers * (attn + 3 * h * i) + h * self.vocab_size

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; refuses architectures we do not support."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and cfg.get("model_type") in _MODEL_TYPES:
            arch = _MODEL_TYPES[cfg["model_type"]]
        if arch is None:
            got = ", ".join(archs) or f"model_type={cfg.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {got}; lorafleet supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} (LLaMA 2/3, Mistral, Qwen2, Qwen3, SmolLM)"
            )
        model_type, flags = SUPPORTED_ARCHITECTURES[arch]
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in cfg:
                raise UnsupportedModelError(f"config.json has no {key!r}: not a complete {arch} config")
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported; supported: {_ROPE_TYPES}"
            )
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = list(cfg.get("layer_types") or [])
        if window is not None and not layer_types and model_type in ("qwen2", "qwen3"):
            keep = cfg.get("max_window_layers", cfg["num_hidden_layers"])
            layer_types = [
                "sliding_attention" if i >= keep else "full_attention"
                for i in range(cfg["num_hidden_layers"])
            ]
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope if rope_type != "default" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=flags.get("qkv_bias", False) or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=flags.get("qk_norm", False),
            sliding_window=window,
            layer_types=layer_types,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with linear or llama3 scaling applied."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)
