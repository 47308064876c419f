"""Write llama.cpp files with the ``gguf`` package's writer: a LoRA adapter, or a whole (merged) model.

Legend: R rank, I input features, O output features of one adapted projection; N heads, P = head_dim / 2.

A LoRA adapter follows llama.cpp's adapter conventions (what its ``convert_lora_to_gguf.py`` writes and
``llama_adapter_lora_init`` reads): ``general.type = adapter``, ``general.architecture`` of the base,
``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted projection ``blk.N.<tensor>.weight.lora_a``
holding A [R, I] and ``...lora_b`` holding B [O, R] (PyTorch order; GGUF lists dimensions reversed, so
llama.cpp sees a->ne = [I, R] and b->ne = [R, O]). llama.cpp scales the update by alpha / R, so an rsLoRA
adapter (alpha / sqrt(R)) is written with alpha * sqrt(R). For ``llama``-architecture bases llama.cpp stores
the rows of q and k interleaved per head (its rope pairs dimensions 2i and 2i+1); the rows of B for q and
k are reordered the same way, A is unchanged. DoRA cannot be written: llama.cpp's adapters have no
magnitude vector (merge it instead). Adapters of every supported family are written (Gemma 2/3 as
``gemma2``/``gemma3``, Phi-3 as ``phi3`` with ``attn_qkv`` and the fused ``ffn_up``, Mixtral as ``llama`` and
Qwen3-MoE as ``qwen3moe``); expert LoRA is llama.cpp's 3-D form (``_expert_tensors``), and a tensor the
gguf package does not list for the architecture is refused.

A model file (llama, Mistral, Qwen2 and Qwen3 families only: ``check_gguf_model_family``) carries the hyper-parameters of ``ModelConfig`` under llama.cpp's keys, the tokenizer (copied
from a GGUF base, or built from a Hugging Face ``tokenizer.json`` byte-level BPE), and F32 or F16 tensors
(norms and biases always F32, as llama.cpp wants).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..lora.adapters import AdapterSpec
from ..lora.peft_format import parse_peft_key
from ..models.decoder import Decoder
from ..models.families import ModelConfig
from ..models.gguf import GGUF_LAYER_TENSORS

__all__ = [
    "GGUF_DTYPES",
    "check_gguf_model_family",
    "gguf_architecture",
    "write_gguf_adapter",
    "write_gguf_model",
]

GGUF_DTYPES = ("float32", "float16")
# Our module names inside layers.N -> llama.cpp's tensor names inside blk.N.
_TO_GGUF = {ours: theirs for theirs, ours in GGUF_LAYER_TENSORS.items()}
# model_type -> (llama.cpp architecture, whether llama.cpp interleaves the q/k rows)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_ARCHITECTURES |= {"qwen3": ("qwen3", False), "gemma2": ("gemma2", False), "gemma3_text": ("gemma3", False)}
_ARCHITECTURES |= {"phi3": ("phi3", False), "mixtral": ("llama", True), "qwen3_moe": ("qwen3moe", False)}
# The families whose whole (merged) model lorafleet writes as GGUF; the others get adapters only.
_MODEL_FILE_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
_GEMMA_FILE = "norm weights stored plus 1, soft-cap and sliding-window keys"
_MODEL_FILE_REASONS = {"gemma2": _GEMMA_FILE, "gemma3_text": _GEMMA_FILE}
_MODEL_FILE_REASONS["phi3"] = "LongRoPE factors as rope_factors_long and rope_factors_short tensors"
# Adapted projections of the new families -> llama.cpp's tensor (Phi-3's fused qkv and gate_up, as its
# converter names them: ffn_up holds gate and up, gate first, as ours).
_FUSED_TO_GGUF = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}
# An MoE layer's parameters (models/moe.py), written by _moe_tensors.
_MOE_TO_GGUF = ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Metadata a model file gets from its writer, never copied from the source.
_NOT_COPIED = ("general.architecture", "general.type", "general.file_type", "general.quantization_version",
               "general.alignment")  # fmt: skip


def gguf_architecture(cfg: ModelConfig) -> tuple[str, bool]:
    """llama.cpp's architecture name for ``cfg`` and whether it reorders the rows of q and k."""
    if cfg.model_type not in _ARCHITECTURES:
        raise ValueError(f"no llama.cpp architecture for model_type {cfg.model_type!r}")
    return _ARCHITECTURES[cfg.model_type]


def check_gguf_model_family(cfg: ModelConfig) -> None:
    """Refuse a merged GGUF model of a family (or MoE routing) whose llama.cpp form lorafleet does not write."""
    arch, _ = gguf_architecture(cfg)
    if cfg.model_type not in _MODEL_FILE_TYPES:
        raise ValueError(
            f"lorafleet writes merged GGUF models of the {', '.join(_MODEL_FILE_TYPES)} families only, not "
            f"{cfg.model_type}: llama.cpp's {arch} model files have conventions of their own "
            f"({_MODEL_FILE_REASONS[cfg.model_type]}) that lorafleet's writer does not reproduce; export the "
            "merged Hugging Face folder (--merge without --gguf) and convert it with llama.cpp's "
            "convert_hf_to_gguf.py, or export the adapter alone for llama.cpp (--gguf)"
        )
    if cfg.model_type != "qwen3_moe":
        return
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    why = None
    if dense:
        why = (
            f"its layers {dense} are dense MLP layers (mlp_only_layers / decoder_sparse_step), which it lacks"
        )
    elif not cfg.norm_topk_prob:
        why = "this model has norm_topk_prob false, and llama.cpp's qwen3moe always renormalises the top-k weights"
    if why:
        raise ValueError(
            f"llama.cpp's qwen3moe architecture cannot compute this model: {why}; export the merged Hugging Face "
            "folder instead (--merge without --gguf)"
        )


def _permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face's row h * P + i of each head goes to llama.cpp's row 2 * i + h (the inverse of the reader's)."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(module: str) -> str:
    """``layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``."""
    _, layer, rest = module.split(".", 2)
    theirs = _FUSED_TO_GGUF.get(rest) or _TO_GGUF[rest + ".weight"].removesuffix(".weight")
    return f"blk.{layer}.{theirs}"


def _check_in_architecture(name: str, arch: str, module: str) -> None:
    """Refuse a tensor llama.cpp's ``arch`` does not have (the gguf package's list of its tensors)."""
    import gguf

    kind = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[kind]}
    if "blk.{bid}." + name.split(".", 2)[2] not in known:
        raise ValueError(
            f"the adapter adapts {module}, which would be llama.cpp's tensor {name}; llama.cpp's {arch} "
            "architecture has no such tensor (e.g. qwen3moe has routed experts in every layer, no dense MLP), so "
            "it cannot load this adapter; export the merged model instead (--merge)"
        )


def _expert_tensors(module: str, a_XI: torch.Tensor, b_OX: torch.Tensor, rank: int, num_experts: int):
    """llama.cpp's per-expert LoRA of one fused expert tensor: (name, A [E, R, in], B [E, out, R]) pairs.

    llama.cpp applies expert LoRA with ``mul_mat_id`` on 3-D A and B (ne [in, R, E] and [R, out, E]), and
    holds gate and up as separate tensors, so a gate_up_proj adapter becomes ffn_gate_exps and ffn_up_exps,
    sharing expert e's A and splitting its B rows (gate first).
    """
    layer = module.split(".")[1]
    a_ERI = a_XI.reshape(num_experts, rank, a_XI.shape[1])
    b_EOR = b_OX.reshape(b_OX.shape[0], rank, num_experts).permute(2, 0, 1)
    if module.endswith("experts.down_proj"):
        return [(f"blk.{layer}.ffn_down_exps", module, a_ERI, b_EOR)]
    gate, up = b_EOR.chunk(2, dim=1)
    return [
        (f"blk.{layer}.ffn_gate_exps", module, a_ERI, gate),
        (f"blk.{layer}.ffn_up_exps", module, a_ERI, up),
    ]


def _modules(
    spec: AdapterSpec, state: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapted module (``layers.N.self_attn.q_proj``, ``layers.N.mlp.experts.gate_up_proj``) -> (A, B), by layer."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        layer, parent, module, part = parse_peft_key(key, spec.target_modules)
        parts.setdefault(f"layers.{layer}.{parent}.{module}", {})[part] = t.detach().cpu().float()
    order = sorted(parts, key=lambda m: (int(m.split(".")[1]), m))
    return {m: (parts[m]["lora_A"], parts[m]["lora_B"]) for m in order}


def _qk_heads(cfg: ModelConfig, module: str) -> int | None:
    if module.endswith("q_proj"):
        return cfg.num_attention_heads
    if module.endswith("k_proj"):
        return cfg.num_key_value_heads
    return None


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    a = t.detach().to(torch.float32).cpu().numpy()
    return a.astype(np.float16) if dtype == "float16" and a.ndim >= 2 else a


def write_gguf_adapter(
    path: Path, cfg: ModelConfig, spec: AdapterSpec, state: dict[str, torch.Tensor], dtype: str = "float32"
) -> int:
    """Write adapter ``spec`` (PEFT keys -> tensors) for a base of config ``cfg``; returns the tensor count."""
    import gguf

    if spec.kind == "dora":
        raise ValueError(
            f"adapter {spec.name!r} is DoRA, which llama.cpp's LoRA adapters cannot represent (they have no "
            "magnitude vector); export the merged model instead: lorafleet export --merge --gguf"
        )
    arch, permuted = gguf_architecture(cfg)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(spec.name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    # llama.cpp multiplies by alpha / rank; this alpha gives the adapter's own scaling (rsLoRA included).
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(spec.scaling * spec.rank))
    tensors = []
    for module, (a, b) in _modules(spec, state).items():
        if ".experts." in module:
            tensors += _expert_tensors(module, a, b, spec.rank, cfg.num_experts)
            continue
        heads = _qk_heads(cfg, module) if permuted else None
        if heads is not None:
            b = torch.from_numpy(np.ascontiguousarray(_permute_rows(b.numpy(), heads)))
        tensors.append((_gguf_name(module), module, a, b))
    for name, module, _, _ in tensors:
        _check_in_architecture(name, arch, module)
    for name, _, a, b in tensors:
        writer.add_tensor(f"{name}.weight.lora_a", np.ascontiguousarray(_np(a, dtype)))
        writer.add_tensor(f"{name}.weight.lora_b", np.ascontiguousarray(_np(b, dtype)))
    _finish(writer)
    return 2 * len(tensors)


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hparams(writer, cfg: ModelConfig) -> None:
    import gguf

    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.num_experts_per_tok)
        if cfg.moe_intermediate_size is not None:
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    sc = cfg.rope_scaling
    if sc:
        if sc.get("rope_type", sc.get("type")) != "linear":
            raise ValueError(
                f"rope scaling {sc.get('rope_type')!r} cannot be written to a GGUF file by lorafleet (linear "
                "only); export the merged model as a Hugging Face folder (without --gguf)"
            )
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(sc["factor"]))
    if cfg.sliding_window is not None:
        if cfg.layer_types and len(set(cfg.layer_types)) > 1:
            raise ValueError(
                "this model mixes sliding-window and full-attention layers, which lorafleet cannot write to "
                "GGUF; export the merged model as a Hugging Face folder (without --gguf)"
            )
        writer.add_sliding_window(cfg.sliding_window)


def _copy_gguf_metadata(writer, source: Path) -> None:
    """Every metadata field of a GGUF base (tokenizer, names, licence) except the writer's own."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(str(source))
    arch = str(reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in _NOT_COPIED or name.startswith(f"{arch}."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def _add_hf_tokenizer(writer, source: Path) -> None:
    """llama.cpp's ``gpt2`` tokenizer metadata from a Hugging Face byte-level BPE ``tokenizer.json``."""
    from ..models.tokenizer import load_tokenizer

    tj = json.loads((source / "tokenizer.json").read_text())
    model = tj.get("model", {})
    pre = tj.get("pre_tokenizer") or {}
    # llama.cpp's "default" pre-tokenizer is GPT-2's regex, which is what a plain ByteLevel step splits with;
    # other splits (digit groups, Split regexes) would tokenize differently under llama.cpp.
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise ValueError(
            f"{source / 'tokenizer.json'} is not a plain byte-level BPE tokenizer (GPT-2 pre-tokenizer), the only "
            "kind lorafleet writes to GGUF from a Hugging Face base; export the merged model as a Hugging Face "
            "folder (--merge without --gguf) and convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    tok = load_tokenizer(source)
    size = tok.backend.get_vocab_size(with_added_tokens=True)
    tokens, types = [f"[PAD{i}]" for i in range(size)], [5] * size  # 5: UNUSED
    for text, i in tok.backend.get_vocab(with_added_tokens=True).items():
        tokens[i], types[i] = text, 1  # NORMAL
    for i, added in tok.backend.get_added_tokens_decoder().items():
        types[i] = 3 if added.special else 4  # CONTROL, USER_DEFINED
    merges = model.get("merges") or []
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    for kind, i in ids.items():
        if i is not None:
            getattr(writer, f"add_{kind}_token_id")(int(i))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def write_gguf_model(path: Path, model: Decoder, source: Path, name: str, dtype: str = "float16") -> int:
    """Write the whole ``model`` (loaded from ``source``) as a GGUF model file; returns the tensor count."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype {dtype!r} is not supported; use one of {GGUF_DTYPES}")
    cfg = model.config
    arch, permuted = gguf_architecture(cfg)
    check_gguf_model_family(cfg)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    ftype = gguf.LlamaFileType.ALL_F32 if dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16
    writer.add_file_type(int(ftype))
    if source.is_file():
        _copy_gguf_metadata(writer, source)
    else:
        writer.add_name(name)
        _add_hf_tokenizer(writer, source)
    _add_hparams(writer, cfg)
    count = 0
    for param, p in model.named_parameters():
        if param == "embed_tokens.weight":
            gname = "token_embd.weight"
        elif param == "norm.weight":
            gname = "output_norm.weight"
        elif param == "lm_head.weight":
            gname = "output.weight"
        else:
            _, layer, rest = param.split(".", 2)
            if rest in _MOE_TO_GGUF:
                for gname, data in _moe_tensors(layer, rest, p, dtype):
                    writer.add_tensor(gname, data)
                    count += 1
                continue
            gname = f"blk.{layer}.{_TO_GGUF[rest]}"
        data = _np(p, dtype)
        module = param.rsplit(".", 1)[0]
        heads = _qk_heads(cfg, module) if permuted and ".self_attn." in param else None
        if heads is not None:
            data = np.ascontiguousarray(_permute_rows(data, heads))
        writer.add_tensor(gname, data)
        count += 1
    _finish(writer)
    return count


def _moe_tensors(layer: str, rest: str, p: torch.Tensor, dtype: str) -> list[tuple[str, np.ndarray]]:
    """llama.cpp's tensors of one MoE parameter: the router (F32, as llama.cpp's converter keeps it) and the
    experts, with ``gate_up_proj`` [E, 2I, H] split into ``ffn_gate_exps`` and ``ffn_up_exps`` [E, I, H]."""
    if rest == "mlp.gate.weight":
        return [(f"blk.{layer}.ffn_gate_inp.weight", _np(p, "float32"))]
    if rest == "mlp.experts.down_proj":
        return [(f"blk.{layer}.ffn_down_exps.weight", _np(p, dtype))]
    gate, up = p.chunk(2, dim=1)
    return [
        (f"blk.{layer}.ffn_gate_exps.weight", np.ascontiguousarray(_np(gate, dtype))),
        (f"blk.{layer}.ffn_up_exps.weight", np.ascontiguousarray(_np(up, dtype))),
    ]
