"""Load a base model: a Hugging Face folder (config.json + safetensors shards) or a single GGUF file.

Only the tensors of the requested layer range are read, so a pipeline stage never holds the whole model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..model_paths import check_model_path, resolve_model_path
from .decoder import Decoder
from .errors import ModelLoadError
from .families import EXPERT_CHECKPOINT_NAMES, ModelConfig

__all__ = [
    "BASE_DTYPES",
    "ModelLoadError",
    "base_dtype",
    "load_model",
    "read_model_config",
    "resolve_model_path",
]

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")
# Per-expert tensors of a checkpoint (families.EXPERT_CHECKPOINT_NAMES) -> (part of the fused 3-D parameter):
# "gate" and "up" are the two halves of experts.gate_up_proj[e], "down" is experts.down_proj[e].
_EXPERT_KEYS = {
    layout: (
        re.compile(rf"^layers\.(\d+)\.{block}\.experts\.(\d+)\.({'|'.join(names.values())})\.weight$"),
        {name: part for part, name in names.items()},
    )
    for layout, (block, names) in EXPERT_CHECKPOINT_NAMES.items()
}
_ROUTER_KEY = re.compile(r"^layers\.(\d+)\.block_sparse_moe\.gate\.weight$")


def read_model_config(path: str | Path) -> ModelConfig:
    """The ``ModelConfig`` of a HF folder or GGUF file, without reading any weights."""
    p = check_model_path(path)
    if p.is_file():
        from .gguf import read_gguf_config

        return read_gguf_config(p)
    try:
        raw = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{p / 'config.json'} is not valid JSON: {e}") from e
    return ModelConfig.from_hf(raw)


def _expert_part(name: str, model: Decoder) -> tuple[str, int, str] | None:
    """A checkpoint's per-expert tensor name -> (fused parameter name, expert, part), else None."""
    layout = model.config.expert_layout
    if layout is None:
        return None
    pattern, parts = _EXPERT_KEYS[layout]
    m = pattern.match(name)
    if m is None:
        return None
    part = parts[m.group(3)]
    param = "gate_up_proj" if part in ("gate", "up") else "down_proj"
    return f"layers.{m.group(1)}.mlp.experts.{param}", int(m.group(2)), part


def _wanted(key: str, model: Decoder) -> str | None:
    """Map a HF tensor name to this stage's parameter name, or None when the stage does not hold it."""
    m = _LAYER_KEY.match(key)
    if m:
        i = int(m.group(1))
        if not model.first_layer <= i < model.last_layer:
            return None
        name = key[len("model.") :]
        if _ROUTER_KEY.match(name):  # Mixtral's checkpoint name of the router
            return f"layers.{i}.mlp.gate.weight"
        return name
    if key == "model.embed_tokens.weight":
        if model.has_embed:
            return "embed_tokens.weight"
        if model.has_head and model.config.tie_word_embeddings:
            return "lm_head.weight"
        return None
    if key in ("model.norm.weight", "lm_head.weight"):
        return key.removeprefix("model.") if model.has_head else None
    return None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{folder} lacks safetensors shards named in its index: {', '.join(missing)}")
    if not files:
        raise ModelLoadError(f"{folder} has config.json but no *.safetensors weights")
    return files


def _load_hf_weights(folder: Path, model: Decoder) -> None:
    from safetensors import SafetensorError, safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    pieces: dict[str, set[tuple[int, str]]] = {}  # fused expert parameter -> (expert, part) loaded
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    name = _wanted(key, model)
                    if name is None:
                        continue
                    expert = _expert_part(name, model)
                    if expert is not None:
                        _load_expert_part(params, expert, sf.get_tensor(key), f.name, key, pieces)
                        continue
                    if name not in params:
                        continue
                    t = sf.get_tensor(key)
                    p = params[name]
                    if t.shape != p.shape:
                        raise ModelLoadError(
                            f"{f.name}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                        )
                    with torch.no_grad():
                        p.copy_(t.to(p.dtype))
                    loaded.add(name)
        except ModelLoadError:
            raise
        except (OSError, RuntimeError, ValueError, SafetensorError) as e:  # SafetensorError: a bad header
            raise ModelLoadError(
                f"cannot read {f}: {e} (is the file complete? a truncated download fails here)"
            ) from e
    for name, got in pieces.items():
        n = params[name].shape[0]
        want = {
            (e, p) for e in range(n) for p in (("gate", "up") if name.endswith("gate_up_proj") else ("down",))
        }
        if got == want:
            loaded.add(name)
    missing = sorted(set(params) - loaded)
    if "lm_head.weight" in missing and model.config.tie_word_embeddings and model.embed_tokens is not None:
        missing.remove("lm_head.weight")  # shares embed_tokens.weight
    if missing:
        raise ModelLoadError(f"{folder}: weights missing for {len(missing)} parameters, e.g. {missing[:3]}")


def _load_expert_part(
    params: dict, expert: tuple[str, int, str], t: torch.Tensor, file: str, key: str, pieces: dict
) -> None:
    """Copy one expert's gate, up or down matrix into its slice of the fused 3-D parameter."""
    name, e, part = expert
    if name not in params:
        return
    p = params[name]
    inter = p.shape[1] // 2 if part != "down" else p.shape[2]
    if e >= p.shape[0]:
        raise ModelLoadError(
            f"{file}: tensor {key} names expert {e}, but the config has {p.shape[0]} experts"
        )
    dst = p[e, :inter] if part == "gate" else p[e, inter:] if part == "up" else p[e]
    if t.shape != dst.shape:
        raise ModelLoadError(f"{file}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(t.to(p.dtype))
    pieces.setdefault(name, set()).add((e, part))


# The dtypes a base model is loaded in, by the names configs and flags use (``base_model.dtype``, ``--dtype``).
BASE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def base_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``base_model.dtype`` / ``--dtype`` name (``float32`` or ``bfloat16``)."""
    if name not in BASE_DTYPES:
        raise ValueError(
            f"dtype {name!r} is not supported for the base model; use one of {sorted(BASE_DTYPES)}"
        )
    return BASE_DTYPES[name]


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    first_layer: int = 0,
    last_layer: int | None = None,
) -> Decoder:
    """Load layers ``[first_layer, last_layer)`` of a model (all by default) as a frozen ``Decoder``.

    ``path`` is a Hugging Face folder (config.json, one or several safetensors shards) or a ``.gguf`` file.
    """
    if dtype not in BASE_DTYPES.values():
        raise ModelLoadError(f"dtype {dtype} is not supported; use torch.float32 or torch.bfloat16")
    p = check_model_path(path)
    cfg = read_model_config(p)
    model = Decoder(cfg, first_layer, last_layer, dtype=dtype, device=device)
    if p.is_file():
        from .gguf import load_gguf_weights

        load_gguf_weights(p, model)
    else:
        _load_hf_weights(p, model)
    model.eval()
    return model
