"""Fold an adapter into its base's weights, and write the result as a Hugging Face model folder.

Legend: R rank, I input features, O output features of one adapted projection.

LoRA: ``W' = W + scaling * B A`` (``scaling`` alpha / r, or alpha / sqrt(r) with rsLoRA). DoRA:
``W' = m / ||W + scaling * B A||_row * (W + scaling * B A)``, the weight DoRA's forward applies (its bias is
left alone, as DoRA never scales it). Expert LoRA: every expert's ``W[e] + scaling * B_e A_e``. The products
are formed in float32 and stored in the model's dtype.

``write_hf_folder`` writes what ``transformers.AutoModelForCausalLM.from_pretrained`` and
``lorafleet.load_model`` load: ``config.json``, ``generation_config.json``, safetensors shards (with
``model.safetensors.index.json`` when there is more than one) and the tokenizer (``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``), copied from a Hugging Face base or rebuilt from a
GGUF file's metadata (whose quantised weights ``lorafleet.load_model`` has already dequantised).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..lora.adapters import AdapterSpec, remove_adapter
from ..lora.experts import FusedLoRAExperts, expert_delta
from ..lora.fused import FusedLoRALinear
from ..lora.peft_format import add_peft_state
from ..models.decoder import Decoder
from ..models.families import EXPERT_CHECKPOINT_NAMES, ModelConfig

__all__ = ["hf_config_dict", "hf_state_dict", "merge_adapter", "merged_weight", "write_hf_folder"]

# Tokenizer and generation files copied from a Hugging Face base as they are.
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# Parameters of an MoE layer's ``mlp`` (models/moe.py) that hf_state_dict renames.
_MOE_LEAVES = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")


def merged_weight(
    weight_OI: torch.Tensor,
    a_RI: torch.Tensor,
    b_OR: torch.Tensor,
    spec: AdapterSpec,
    magnitude_O: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dense weight that computes what ``weight_OI`` plus this adapter computes (see the module doc)."""
    f32 = torch.float32
    v = torch.addmm(weight_OI.detach().to(f32), b_OR.to(f32), a_RI.to(f32), alpha=spec.scaling)
    if spec.kind == "dora":
        if magnitude_O is None:
            raise ValueError(f"adapter {spec.name!r} is DoRA but has no magnitude vector")
        v.mul_((magnitude_O.to(f32) / torch.linalg.vector_norm(v, dim=1))[:, None])
    return v.to(weight_OI.dtype)


def merge_adapter(model: Decoder, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> int:
    """Fold adapter ``spec`` (PEFT keys -> tensors, as ``read_peft`` returns) into ``model``; the tensors merged.

    The adapter is first attached as ``init_from`` attaches it (``add_peft_state``: every weight checked
    against the model's shapes), then each adapted projection's weight, and each adapted expert tensor
    (every expert's ``W[e] + scaling * B_e A_e``), is replaced by the merged one and the adapter removed.
    """
    try:
        add_peft_state(model, spec, state, "the adapter")
    except ValueError as e:
        raise ValueError(f"{e}; pass --base PATH to the model it was trained on") from e
    merged = 0
    with torch.no_grad():
        for _, layer in model.named_modules():
            if isinstance(layer, FusedLoRALinear) and spec.name in layer.specs:
                magnitude = layer.lora_magnitude_vector[spec.name] if spec.kind == "dora" else None
                a, b = layer.lora_A[spec.name], layer.lora_B[spec.name]
                layer.weight.copy_(merged_weight(layer.weight, a, b, spec, magnitude))
                merged += 1
            elif isinstance(layer, FusedLoRAExperts) and spec.name in layer.specs:
                for param, (a, b) in layer.parameters_of(spec.name).items():
                    w = getattr(layer, param)
                    delta = expert_delta(a, b, spec.rank, layer.num_experts)
                    w.copy_((w.to(torch.float32) + spec.scaling * delta).to(w.dtype))
                    merged += 1
    remove_adapter(model, spec.name)
    return merged


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The model's weights under the names transformers' ``save_pretrained`` writes.

    ``model.layers.0...``, ``lm_head.weight`` unless tied; an MoE layer's fused expert tensors are split
    into one matrix per expert and its router renamed as the family's checkpoints name them
    (``families.EXPERT_CHECKPOINT_NAMES``: Mixtral's ``block_sparse_moe.experts.N.w1``, Qwen3-MoE's
    ``mlp.experts.N.gate_proj``).
    """
    out: dict[str, torch.Tensor] = {}
    layout = model.config.expert_layout
    for name, p in model.named_parameters():  # a tied lm_head is the embedding and is listed once
        t = p.detach().cpu()
        if name == "lm_head.weight":
            out[name] = t.contiguous()
            continue
        layer, sep, leaf = name.partition(".mlp.")
        if layout is not None and sep and leaf in _MOE_LEAVES:
            block, names = EXPERT_CHECKPOINT_NAMES[layout]
            prefix = f"model.{layer}.{block}"
            if leaf == "gate.weight":
                out[f"{prefix}.gate.weight"] = t.contiguous()
            elif leaf == "experts.down_proj":
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.{names['down']}.weight"] = t[e].contiguous()
            else:
                gate, up = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{prefix}.experts.{e}.{names['gate']}.weight"] = gate[e].contiguous()
                    out[f"{prefix}.experts.{e}.{names['up']}.weight"] = up[e].contiguous()
            continue
        out[f"model.{name}"] = t.contiguous()
    return out


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """A ``config.json`` for ``cfg`` that transformers and ``ModelConfig.from_hf`` read back to the same model."""
    if cfg.architecture in ("LlamaForCausalLM", "MistralForCausalLM"):
        if cfg.qkv_bias != cfg.o_bias:
            raise ValueError(
                f"{cfg.architecture} has one attention_bias for q, k, v and o; this model has q/k/v bias "
                f"{cfg.qkv_bias} and o bias {cfg.o_bias}, which its config.json cannot express"
            )
    out = {
        "architectures": [cfg.architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "mlp_bias": cfg.mlp_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }
    if cfg.model_type in ("llama", "mistral"):
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "qwen3":
        out["attention_bias"] = cfg.qkv_bias
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    elif cfg.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["sliding_window"] = cfg.sliding_window
        if cfg.layer_types:
            out["layer_types"] = list(cfg.layer_types)
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def _write_tokenizer_from(source: Path, folder: Path, cfg: ModelConfig) -> None:
    """Tokenizer and generation files: copied from a HF folder, rebuilt from a GGUF file's metadata."""
    if source.is_dir():
        for name in _COPIED:
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
    else:
        from ..models.tokenizer import load_tokenizer

        tok = load_tokenizer(source)
        tok.backend.save(str(folder / "tokenizer.json"))
        special = {k: v for k, v in tok.special_tokens.items() if v is not None}
        tok_cfg = {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_position_embeddings,
        }
        if tok.chat_template:
            tok_cfg["chat_template"] = tok.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    if not (folder / "generation_config.json").is_file():
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id}
        (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_hf_folder(model: Decoder, source: Path, folder: Path, max_shard_bytes: int) -> list[str]:
    """Write ``model`` (with its tokenizer from ``source``, the base it was loaded from) into ``folder``.

    Returns the weight file names. ``folder`` must not exist or be empty.
    """
    if model.has_embed is False or model.has_head is False:
        raise ValueError("write_hf_folder needs the whole model, not a pipeline stage")
    cfg_dict = hf_config_dict(model.config, model.dtype)
    if source.is_dir():
        # Keep the base's own config fields (e.g. pad_token_id, rope details), with what we changed on top.
        raw = json.loads((source / "config.json").read_text())
        raw.pop("quantization_config", None)
        raw.pop("_name_or_path", None)
        cfg_dict = {**raw, "torch_dtype": cfg_dict["torch_dtype"]}
        cfg_dict.pop("dtype", None)
    folder.mkdir(parents=True, exist_ok=True)
    files = _write_weights(folder, hf_state_dict(model), max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    _write_tokenizer_from(source, folder, model.config)
    return files
