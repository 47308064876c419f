"""Read a GGUF file (llama.cpp's format): its config, its tokenizer metadata and its weights, tensor by tensor.

Legend: N heads of a projection, P rows per head and half (head_dim / 2), E input features.

``GGUFFile`` parses the header itself (a few hundred milliseconds even with a 50k-token vocabulary) and maps
the tensor data without reading it; ``GGUFFile.read`` dequantises one tensor with ``gguf.quants.dequantize``
(every type the ``gguf`` package supports: F32, F16, BF16, Q4_0, Q4_1, Q8_0, the K-quants, ...). Loading a
model copies one tensor at a time into the ``Decoder``'s parameters, and only the tensors of the model's
layer range, so peak memory is the model plus one dequantised tensor (and its reordered copy for q/k).

llama.cpp's converter reorders the rows of q and k for ``llama``-architecture files (its rope pairs
dimensions (2i, 2i+1) of each head, Hugging Face's pairs i and i + head_dim/2); ``_unpermute`` undoes that.
``qwen2`` and ``qwen3`` files keep Hugging Face's order. LLaMA 3's rope scaling travels as a ``rope_freqs``
tensor (one divisor per frequency) rather than as metadata; it is applied to the decoder's ``inv_freq``.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelLoadError, UnsupportedModelError
from .families import SUPPORTED_ARCHITECTURES, ModelConfig

__all__ = ["GGUF_LAYER_TENSORS", "GGUFFile", "GGUFTensorInfo", "load_gguf_weights", "read_gguf_config"]

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF value type -> struct format of one scalar (8 string, 9 array are handled apart).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}  # fmt: skip

# GGUF architecture -> (HF architecture name, whether llama.cpp permuted the q/k rows).
_GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_SUPPORTED_TEXT = "llama (LLaMA 2/3, Mistral, SmolLM), qwen2, qwen3"

# llama.cpp tensor suffix inside block N -> our parameter name inside ``layers.N``.
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
# Public for writers of GGUF files (lorafleet export), so both directions use one table.
GGUF_LAYER_TENSORS = _LAYER_TENSORS
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's header entry. ``shape`` is in PyTorch order (llama.cpp lists dimensions reversed)."""

    name: str
    type: int  # a gguf.GGMLQuantizationType value
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    num_bytes: int


class _Cursor:
    """Little-endian reads from a buffer, with a clear error when the file ends early."""

    def __init__(self, buf, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise ModelLoadError(
                f"{self.path} ends inside its header: the file is truncated or not a GGUF file"
            )
        out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.take("Q")
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path} ends inside its header: the file is truncated")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.take("I"), self.take("Q")
            if etype == 8:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY_DTYPES:
                dt = np.dtype(_NUMPY_DTYPES[etype]).newbyteorder("<")
                end = self.pos + count * dt.itemsize
                if end > len(self.buf):
                    raise ModelLoadError(f"{self.path} ends inside its header: the file is truncated")
                arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos).copy()
                self.pos = end
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        if vtype not in _SCALAR_FORMATS:
            raise ModelLoadError(
                f"{self.path}: unknown GGUF value type {vtype}; the file is damaged or of a newer format"
            )
        return self.take(_SCALAR_FORMATS[vtype])


class GGUFFile:
    """The header of a GGUF file (metadata and tensor directory); tensor data is read on demand.

    ``metadata`` maps keys such as ``"llama.block_count"`` to Python values (arrays become lists);
    ``tensors`` maps tensor names to ``GGUFTensorInfo``. ``read(name)`` returns the dequantised tensor as a
    float32 numpy array in PyTorch's [out, in] layout.
    """

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"cannot read GGUF file {str(self.path)!r}: {e}") from e
        cur = _Cursor(self._map, self.path)
        if len(self._map) < 4 or self._map[:4] != _MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with 'GGUF')")
        cur.pos = 4
        version = cur.take("I")
        if version not in (2, 3):
            raise ModelLoadError(
                f"{self.path} is GGUF version {version}; lorafleet reads versions 2 and 3 (little-endian)"
            )
        num_tensors, num_kv = cur.take("Q"), cur.take("Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.take("I"))
        raw = []
        for _ in range(num_tensors):
            name = cur.string()
            dims = [cur.take("Q") for _ in range(cur.take("I"))]
            raw.append((name, dims, cur.take("I"), cur.take("Q")))
        align = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, dims, ttype, offset in raw:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError) as e:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name} has GGML type {ttype}, which the installed gguf package does not "
                    "know; upgrade it with `pip install -U gguf`"
                ) from e
            num_elements = int(np.prod(dims)) if dims else 1
            info = GGUFTensorInfo(
                name=name,
                type=ttype,
                shape=tuple(int(d) for d in reversed(dims)),
                offset=data_start + offset,
                num_bytes=num_elements // block * type_size,
            )
            if info.offset + info.num_bytes > len(self._map):
                raise ModelLoadError(
                    f"{self.path} is truncated: tensor {name} needs bytes up to {info.offset + info.num_bytes}, "
                    f"the file has {len(self._map)}; download it again"
                )
            self.tensors[name] = info

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """The metadata value ``{architecture}.{key}``, e.g. ``arch_value("block_count")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def read(self, name: str) -> np.ndarray:
        """Dequantise tensor ``name`` to a float32 array of its PyTorch shape (reads only its bytes)."""
        from gguf import quants
        from gguf.constants import GGMLQuantizationType

        info = self.tensors[name]
        qtype = GGMLQuantizationType(info.type)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        data = np.frombuffer(self._map, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        try:
            out = quants.dequantize(data.reshape(rows, info.num_bytes // rows), qtype)
        except NotImplementedError as e:
            raise UnsupportedModelError(
                f"{self.path}: tensor {name} is stored as {qtype.name}, which the gguf package cannot dequantise; "
                "use a file quantised as F16, BF16, Q8_0, Q4_0/Q4_1 or a K-quant"
            ) from e
        out = np.asarray(out, dtype=np.float32).reshape(info.shape)
        # F32 tensors come back as a view of the read-only file mapping; torch wants memory it may write.
        return out if out.flags.writeable else out.copy()


def _hf_architecture(f: GGUFFile) -> tuple[str, bool]:
    arch = f.architecture
    if arch not in _GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} in {f.path}; lorafleet reads GGUF files of architecture "
            f"{_SUPPORTED_TEXT} (Hugging Face folders: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if int(f.arch_value("expert_count", 0) or 0) > 0:
        raise UnsupportedModelError(
            f"{f.path} is a mixture-of-experts {arch!r} model ({f.arch_value('expert_count')} experts); lorafleet "
            f"supports dense models only: {_SUPPORTED_TEXT}"
        )
    hf_arch, permuted = _GGUF_ARCHITECTURES[arch]
    # llama.cpp writes Mistral models as "llama"; like transformers, tell them apart by name.
    if arch == "llama" and "mistral" in str(f.metadata.get("general.name", "")).lower():
        hf_arch = "MistralForCausalLM"
    return hf_arch, permuted


def _config_from(f: GGUFFile) -> ModelConfig:
    hf_arch, _ = _hf_architecture(f)
    for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
        if f.arch_value(key) is None:
            raise UnsupportedModelError(
                f"{f.path} lacks the metadata {f.architecture}.{key}: not a complete model"
            )
    if "token_embd.weight" not in f.tensors:
        raise UnsupportedModelError(f"{f.path} has no token_embd.weight tensor: not a complete model")
    hidden, heads = int(f.arch_value("embedding_length")), int(f.arch_value("attention.head_count"))
    head_dim = int(f.arch_value("attention.key_length") or hidden // heads)
    rope_dim = f.arch_value("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise UnsupportedModelError(
            f"{f.path} rotates {rope_dim} of {head_dim} head dimensions (partial rope); lorafleet supports full rope"
        )
    scaling = str(f.arch_value("rope.scaling.type", "none") or "none")
    if scaling == "linear":
        rope_scaling: dict[str, Any] | None = {
            "rope_type": "linear",
            "factor": float(f.arch_value("rope.scaling.factor", 1.0)),
        }
    elif scaling == "none":
        rope_scaling = None
    else:
        raise UnsupportedModelError(
            f"{f.path} uses rope scaling {scaling!r}; supported: none, linear, llama3"
        )
    window = f.arch_value("attention.sliding_window")
    eos = f.metadata.get("tokenizer.ggml.eos_token_id")
    bos = f.metadata.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=hf_arch,
        vocab_size=f.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(f.arch_value("feed_forward_length")),
        num_hidden_layers=int(f.arch_value("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(f.arch_value("attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(f.arch_value("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(f.arch_value("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in f.tensors,
        qkv_bias="blk.0.attn_q.bias" in f.tensors,
        o_bias="blk.0.attn_output.bias" in f.tensors,
        mlp_bias="blk.0.ffn_gate.bias" in f.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        sliding_window=None if window is None else int(window),
        max_position_embeddings=int(f.arch_value("context_length", 4096)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )


def read_gguf_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` described by a GGUF file's metadata; refuses unsupported architectures."""
    return _config_from(GGUFFile(path))


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (i, half) interleaved back to (half, i).

    llama.cpp stores row ``2 * i + h`` of each head where Hugging Face has row ``h * P + i`` (h in {0, 1}).
    Works for weights [N * 2P, E] and biases [N * 2P].
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _target(name: str, model) -> str | None:
    """Our parameter name for GGUF tensor ``name`` in this model's layer range, or None when not held."""
    m = _BLOCK.match(name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        if not model.first_layer <= i < model.last_layer or suffix not in _LAYER_TENSORS:
            return None
        return f"layers.{i}.{_LAYER_TENSORS[suffix]}"
    if name == "token_embd.weight":
        if model.has_embed:
            return "embed_tokens.weight"
        return "lm_head.weight" if model.has_head and model.config.tie_word_embeddings else None
    if name == "output.weight":
        return "lm_head.weight" if model.has_head else None
    if name == "output_norm.weight":
        return "norm.weight" if model.has_head else None
    return None


def load_gguf_weights(path: str | Path, model) -> None:
    """Copy the tensors of ``model``'s layer range (a ``Decoder``) from a GGUF file, dequantising one at a time."""
    f = GGUFFile(path)
    _, permuted = _hf_architecture(f)
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for name in f.tensors:
        target = _target(name, model)
        if target is None or target not in params or target in loaded:
            continue
        p = params[target]
        w = f.read(name)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            w = _unpermute(w, heads)
        if tuple(w.shape) != tuple(p.shape):
            raise ModelLoadError(
                f"{f.path}: tensor {name} has shape {tuple(w.shape)}, expected {tuple(p.shape)} for {target}"
            )
        with torch.no_grad():
            p.copy_(torch.from_numpy(w))
        loaded.add(target)
        if target == "embed_tokens.weight" and model.lm_head is not None and model.lm_head.weight is p:
            loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ModelLoadError(f"{f.path}: weights missing for {len(missing)} parameters, e.g. {missing[:3]}")
    if "rope_freqs.weight" in f.tensors:
        # LLaMA 3 rope scaling: llama.cpp divides each frequency by its factor, so do we.
        factors = torch.from_numpy(f.read("rope_freqs.weight")).to(model.inv_freq.device)
        if factors.shape != model.inv_freq.shape:
            raise ModelLoadError(
                f"{f.path}: rope_freqs has {factors.numel()} factors, expected {model.inv_freq.numel()}"
            )
        model.inv_freq.copy_(model.inv_freq / factors)
