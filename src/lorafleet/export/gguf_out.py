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
magnitude vector (merge it instead).

A model file carries the hyper-parameters of ``ModelConfig`` under llama.cpp's keys, the tokenizer (copied
from a GGUF base, or built from a Hugging Face ``tokenizer.json`` byte-level BPE), and F32 or F16 tensors
(norms and biases always F32, as llama.cpp wants).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..lora.adapters import PEFT_PREFIX, AdapterSpec
from ..models.decoder import Decoder
from ..models.families import ModelConfig
from ..models.gguf import GGUF_LAYER_TENSORS

__all__ = ["GGUF_DTYPES", "gguf_architecture", "write_gguf_adapter", "write_gguf_model"]

GGUF_DTYPES = ("float32", "float16")
# Our module names inside layers.N -> llama.cpp's tensor names inside blk.N.
_TO_GGUF = {ours: theirs for theirs, ours in GGUF_LAYER_TENSORS.items()}
# model_type -> (llama.cpp architecture, whether llama.cpp interleaves the q/k rows)
_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
_ARCHITECTURES |= {"qwen3": ("qwen3", False)}
# Metadata a model file gets from its writer, never copied from the source.
_NOT_COPIED = ("general.architecture", "general.type", "general.file_type", "general.quantization_version",
               "general.alignment")  # fmt: skip


def gguf_architecture(cfg: ModelConfig) -> tuple[str, bool]:
    """llama.cpp's architecture name for ``cfg`` and whether it reorders the rows of q and k."""
    if cfg.model_type not in _ARCHITECTURES:
        raise ValueError(f"no llama.cpp architecture for model_type {cfg.model_type!r}")
    return _ARCHITECTURES[cfg.model_type]


def _permute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face's row h * P + i of each head goes to llama.cpp's row 2 * i + h (the inverse of the reader's)."""
    rows = w.shape[0]
    return w.reshape(num_heads, 2, rows // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(module: str) -> str:
    """``layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``."""
    _, layer, rest = module.split(".", 2)
    return f"blk.{layer}.{_TO_GGUF[rest + '.weight'].removesuffix('.weight')}"


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
    modules = sorted(
        {k.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0] for k in state},
        key=lambda m: (int(m.split(".")[1]), m),
    )
    for module in modules:
        key = PEFT_PREFIX + module
        a_RI = _np(state[key + ".lora_A.weight"], dtype)
        b_OR = _np(state[key + ".lora_B.weight"], dtype)
        heads = _qk_heads(cfg, module) if permuted else None
        if heads is not None:
            b_OR = np.ascontiguousarray(_permute_rows(b_OR, heads))
        name = _gguf_name(module)
        writer.add_tensor(f"{name}.weight.lora_a", a_RI)
        writer.add_tensor(f"{name}.weight.lora_b", b_OR)
    _finish(writer)
    return 2 * len(modules)


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
