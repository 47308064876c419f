"""Per-family differences of the supported decoders, as data.

One ``ModelConfig`` describes every supported model. The differences between the families are flags and
numbers read from ``config.json``; the per-architecture defaults are the ``_FAMILIES`` table below:

- LLaMA 2/3, Mistral, SmolLM2: the plain decoder (pre-norm, SwiGLU MLP, rope, GQA).
- Qwen2: q/k/v biases. Qwen3: RMSNorm over head_dim on q and k.
- Gemma 2/3: (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), GELU-tanh MLP, a norm after attention and
  around the MLP ("sandwich" norms), attention scale ``query_pre_attn_scalar ** -0.5``, local (sliding
  window) and global layers (``layer_types``), final-logit soft-capping; Gemma 2 soft-caps attention logits,
  Gemma 3 has q/k norms and its own rope base per layer type (transformers' Gemma 3 does not apply
  ``attn_logit_softcapping``, so neither do we).
- Phi-3 / Phi-4 (``phi3``): fused ``qkv_proj`` and ``gate_up_proj``, LongRoPE, partial rotary.
- Mixtral, Qwen3-MoE: top-k routed experts (softmax, top-k, renormalised unless Qwen3-MoE's
  ``norm_topk_prob`` is false), expert weights held as transformers holds them: fused 3-D tensors
  ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj`` [E, H, I].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UnsupportedModelError

__all__ = [
    "EXPERT_CHECKPOINT_NAMES",
    "SUPPORTED_ARCHITECTURES",
    "ModelConfig",
    "RopeSpec",
    "UnsupportedModelError",
    "rope_inv_freq",
]

_GEMMA = {
    "norm_offset": 1.0,
    "embed_scale": True,
    "sandwich_norm": True,
    "hidden_act": "gelu_pytorch_tanh",
}
# HF architecture name -> (model_type, flags that differ from plain LLaMA)
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {"qkv_bias": True}),
    "Qwen3ForCausalLM": ("qwen3", {"qk_norm": True}),
    "Gemma2ForCausalLM": ("gemma2", {**_GEMMA, "attn_softcap": True}),
    "Gemma3ForCausalLM": ("gemma3_text", {**_GEMMA, "qk_norm": True, "rope_per_layer_type": True}),
    "Phi3ForCausalLM": ("phi3", {"fused_qkv": True, "fused_gate_up": True}),
    "MixtralForCausalLM": ("mixtral", {"expert_layout": "mixtral"}),
    "Qwen3MoeForCausalLM": ("qwen3_moe", {"qk_norm": True, "expert_layout": "qwen3_moe"}),
}
# How a checkpoint names the experts of each ``ModelConfig.expert_layout`` (what transformers' save_pretrained
# writes, one matrix per expert): the MoE block's name inside a layer, and the name of each expert's matrix.
# "gate" and "up" are the two halves of experts.gate_up_proj[e] (gate rows first), "down" is
# experts.down_proj[e]; the router is "<block>.gate.weight".
EXPERT_CHECKPOINT_NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "mixtral": ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"}),
    "qwen3_moe": ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
_MODEL_TYPES = {mt: arch for arch, (mt, _) in SUPPORTED_ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
_ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
_FAMILY_NAMES = "LLaMA 2/3, Mistral, Qwen2, Qwen3, SmolLM, Gemma 2/3, Phi-3/4, Mixtral, Qwen3-MoE"


@dataclass(frozen=True)
class RopeSpec:
    """Rope of one layer type: base, optional scaling dict (HF's ``rope_parameters``) and rotated dims."""

    theta: float
    scaling: dict[str, Any] | None
    rotary_dim: int


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
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3, Gemma 3)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention" per layer
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + w): 1 for Gemma
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    sandwich_norm: bool = False  # post-attention, pre- and post-feedforward norms (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale is its ** -0.5 (Gemma); None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_rope: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer type -> rope parameters
    partial_rotary_factor: float = 1.0
    fused_qkv: bool = False  # one qkv_proj (Phi-3)
    fused_gate_up: bool = False  # one gate_up_proj, gate first (Phi-3)
    num_experts: int = 0  # routed experts per MoE layer (0: dense MLP everywhere)
    num_experts_per_tok: int = 0
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool = True
    moe_layers: list[int] = field(default_factory=list)
    expert_layout: str | None = None  # how a checkpoint names per-expert tensors: "mixtral" | "qwen3_moe"

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture][0]

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else "full_attention"

    def window_of(self, layer: int) -> int | None:
        """The sliding window of ``layer``, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def rope_of(self, layer: int) -> RopeSpec:
        """The rope of ``layer``: its layer type's when the family has one per type, else the model's."""
        params = self.layer_rope.get(self.layer_type(layer)) if self.layer_rope else None
        rot = int(self.head_dim * self.partial_rotary_factor)
        if params is None:
            return RopeSpec(self.rope_theta, self.rope_scaling, rot)
        params = dict(params)
        theta = float(params.pop("rope_theta", self.rope_theta))
        kind = params.get("rope_type", params.get("type", "default"))
        return RopeSpec(theta, params if kind != "default" else None, rot)

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer in self.moe_layers

    def num_matmul_params(self) -> int:
        """Parameters that take part in matmuls per token (linear layers, active experts, router, head)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_key_value_heads)
        total = 0
        for layer in range(self.num_hidden_layers):
            if self.is_moe_layer(layer):
                mi = self.moe_intermediate_size or i
                total += attn + self.num_experts_per_tok * 3 * h * mi + h * self.num_experts
            else:
                total += attn + 3 * h * i
        return total + h * self.vocab_size

    @staticmethod
    def from_hf(cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face ``config.json`` dict; refuses architectures we do not support."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and cfg.get("model_type") in _MODEL_TYPES:
            arch = _MODEL_TYPES[cfg["model_type"]]
        if arch is None:
            got = ", ".join(archs) or f"model_type={cfg.get('model_type')!r}"
            hint = ""
            if "text_config" in cfg:
                hint = " (a multimodal checkpoint: lorafleet runs the text model, e.g. Gemma3ForCausalLM)"
            raise UnsupportedModelError(
                f"unsupported architecture {got}{hint}; lorafleet supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} ({_FAMILY_NAMES})"
            )
        model_type, flags = SUPPORTED_ARCHITECTURES[arch]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
            if key not in cfg:
                raise UnsupportedModelError(f"config.json has no {key!r}: not a complete {arch} config")
        if "intermediate_size" not in cfg and "moe_intermediate_size" not in cfg:
            raise UnsupportedModelError(
                f"config.json has no 'intermediate_size': not a complete {arch} config"
            )
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(
                f"{arch} with use_bidirectional_attention is an encoder; lorafleet trains causal decoders"
            )
        heads = cfg["num_attention_heads"]
        n_layers = cfg["num_hidden_layers"]
        raw_rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        layer_rope: dict[str, dict[str, Any]] = {}
        if flags.get("rope_per_layer_type"):
            layer_rope = {k: dict(v) for k, v in raw_rope.items() if isinstance(v, dict)}
            for params in layer_rope.values():
                _check_rope_type(params)
            raw_rope = dict(layer_rope.get("full_attention", {}))
        partial = float(raw_rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        theta = float(raw_rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_type = _check_rope_type(raw_rope)
        if rope_type == "longrope":
            old = raw_rope.setdefault(
                "original_max_position_embeddings",
                cfg.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096)),
            )
            if raw_rope.get("factor") is None:  # as transformers: the context extension ratio
                raw_rope["factor"] = cfg.get("max_position_embeddings", old) / old
        attention_bias = bool(cfg.get("attention_bias", False))
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            window = None
        layer_types = list(cfg.get("layer_types") or [])
        if window is not None and not layer_types and model_type in ("qwen2", "qwen3", "qwen3_moe"):
            keep = cfg.get("max_window_layers", n_layers)
            layer_types = ["sliding_attention" if i >= keep else "full_attention" for i in range(n_layers)]
        if model_type == "gemma2" and not layer_types:  # Gemma 2 alternates local and global layers
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or flags.get("hidden_act", "silu")
        if act not in _ACTIVATIONS:
            raise UnsupportedModelError(f"activation {act!r} is not supported; supported: {_ACTIVATIONS}")
        num_experts, moe_layers = _experts(cfg, flags, n_layers)
        window_int = None if window is None else int(window)
        return ModelConfig(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg.get("intermediate_size") or cfg["moe_intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=raw_rope if rope_type != "default" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=flags.get("qkv_bias", False) or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=flags.get("qk_norm", False),
            sliding_window=window_int,
            layer_types=layer_types,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            hidden_act=act,
            norm_offset=flags.get("norm_offset", 0.0),
            embed_scale=flags.get("embed_scale", False),
            sandwich_norm=flags.get("sandwich_norm", False),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if flags.get("norm_offset") else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if flags.get("attn_softcap") else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            layer_rope=layer_rope,
            partial_rotary_factor=partial,
            fused_qkv=flags.get("fused_qkv", False),
            fused_gate_up=flags.get("fused_gate_up", False),
            num_experts=num_experts,
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0)) if num_experts else 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") if num_experts else None,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            moe_layers=moe_layers,
            expert_layout=flags.get("expert_layout"),
        )


def _check_rope_type(params: dict[str, Any]) -> str:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling {kind!r} is not supported; supported: {_ROPE_TYPES}")
    return kind


def _experts(cfg: dict[str, Any], flags: dict[str, Any], n_layers: int) -> tuple[int, list[int]]:
    """(experts per MoE layer, indices of the MoE layers) of a Mixtral or Qwen3-MoE config."""
    layout = flags.get("expert_layout")
    if layout is None:
        return 0, []
    n = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0)
    k = int(cfg.get("num_experts_per_tok", 0))
    if n <= 0 or not 0 < k <= n:
        raise UnsupportedModelError(
            f"MoE config: num_experts_per_tok ({k}) must be in [1, number of experts ({n})]"
        )
    if layout == "mixtral":
        return n, list(range(n_layers))
    skip = set(cfg.get("mlp_only_layers") or [])
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    return n, [i for i in range(n_layers) if i not in skip and (i + 1) % step == 0]


def rope_inv_freq(spec: RopeSpec, long: bool = False) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in float32, attention factor for cos/sin) of one rope.

    Scaling: linear, llama3, and LongRoPE (``short_factor`` up to ``original_max_position_embeddings``,
    ``long_factor`` beyond it, as ``long`` says; cos and sin scaled by the attention factor).
    """
    d = spec.rotary_dim
    exponent = torch.arange(0, d, 2, dtype=torch.int64).float() / d
    inv = 1.0 / (spec.theta**exponent)
    sc = spec.scaling
    if not sc:
        return inv, 1.0
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "longrope":
        old_len = float(sc["original_max_position_embeddings"])
        ext = torch.tensor(sc["long_factor" if long else "short_factor"], dtype=torch.float32)
        inv = 1.0 / (ext * spec.theta**exponent)
        factor = sc.get("factor")
        attn = sc.get("attention_factor")
        if attn is None:
            factor = float(factor) if factor is not None else 1.0
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
        return inv, float(attn)
    factor = float(sc["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly in between.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0
