"""Hugging Face PEFT's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

A folder written by ``save_peft`` loads with ``peft.PeftModel.from_pretrained(<transformers model>, folder)``
with no missing or unexpected adapter keys (LoRA, rsLoRA, DoRA), and ``load_peft`` reads folders PEFT wrote,
so an adapter can move between lorafleet and the PEFT / transformers ecosystem in both directions. Keys are
PEFT's saved keys (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``, ``...lora_B.weight``,
DoRA ``...lora_magnitude_vector``); the config carries every field PEFT 0.21 writes, sorted, indented by 2.

PEFT features that change what an adapter computes and that lorafleet does not implement (per-module rank or
alpha patterns, trained biases, modules_to_save, fan_in_fan_out, layer replication, other LoRA variants) are
refused on reading with a message that names the field, rather than loaded into something different.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

import torch

from ..config.peft import CONFIG_NAME, WEIGHTS_NAME, peft_adapter_config
from ..models.decoder import Decoder
from .adapters import (
    LINEAR_TARGETS,
    TARGET_MODULES,
    AdapterSpec,
    adapter_parameters,
    add_adapter,
    remove_adapter,
)
from .experts import EXPERT_TARGETS, expert_peft_keys

__all__ = [
    "CONFIG_NAME",
    "PEFT_MOE_RENAMED_TARGETS",
    "WEIGHTS_NAME",
    "add_peft_state",
    "check_peft_representable",
    "load_peft",
    "parse_peft_key",
    "read_peft",
    "save_peft",
]

_LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+(?:\.base_layer)*)\."
    r"(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$"
)
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_PARENT |= {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}
_PARENT |= {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# A PEFT key's module path under an MoE block ("experts", "experts.base_layer") names an expert tensor
# only together with the adapter's targets (lora/experts.py: expert_peft_keys).
_EXPERT_PATH = re.compile(r"^experts(?:\.base_layer)*$")
# transformers 4's LoRA keys on one expert's own module: "...block_sparse_moe.experts.3.w1.lora_A.weight".
_PER_EXPERT_KEY = re.compile(r"\.experts\.\d+\.([a-z0-9_]+)\.lora_")
# Config fields whose non-default value would make the adapter compute something lorafleet does not.
_UNSUPPORTED = {
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "fan_in_fan_out": (False, None),
    "layer_replication": (None,),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (None, False),
    "arrow_config": (None,),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
}


# Projections that PEFT 0.21 with transformers 5, on a model of these types, reads as transformers 4's names of
# the per-expert modules and moves onto the fused experts (its MoE target conversion, applied whenever PEFT
# loads or creates an adapter): LoRA on these projections of a dense MLP layer (Qwen3-MoE's mlp_only_layers)
# has no PEFT form, as a PEFT folder would load as a different adapter.
PEFT_MOE_RENAMED_TARGETS: dict[str, tuple[str, ...]] = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def check_peft_representable(spec: AdapterSpec, model_type: str) -> None:
    """Refuse an adapter that HF PEFT would load as another adapter on a base of ``model_type``."""
    renamed = [t for t in spec.target_modules if t in PEFT_MOE_RENAMED_TARGETS.get(model_type, ())]
    if renamed:
        raise ValueError(
            f"adapter {spec.name!r} targets {renamed} (the dense MLP layers of this {model_type} model), which the "
            f"installed PEFT cannot represent: on {model_type} it reads target_modules {renamed} as transformers 4's "
            "per-expert names and puts them on the experts, so the folder would load as a different adapter; "
            "export it merged (--merge), or train without these targets"
        )


def parse_peft_key(key: str, targets: tuple[str, ...] = EXPERT_TARGETS) -> tuple[int, str, str, str] | None:
    """(layer, parent, module, part) of a PEFT key, with part one of lora_A / lora_B / magnitude.

    An expert key's module is its target name (``experts.gate_up_proj``), read through ``targets`` (the
    nesting of PEFT's keys depends on which expert tensors the adapter targets).
    """
    m = _KEY.match(key)
    if not m:
        return None
    part = m.group(4).split(".")[0]
    if m.group(2) == "mlp" and _EXPERT_PATH.match(m.group(3)):
        by_path = {path: f"experts.{p}" for p, path in expert_peft_keys(targets).items()}
        module = by_path.get(m.group(3))
        return (
            None
            if module is None or part != "lora_A" and part != "lora_B"
            else (int(m.group(1)), "mlp", module, part)
        )
    if _PARENT.get(m.group(3)) != m.group(2):
        return None
    return int(m.group(1)), m.group(2), m.group(3), part


def _refuse_per_expert_modules(state: dict[str, torch.Tensor], who: str, folder: Path) -> None:
    """Refuse LoRA on one expert's own module (``...experts.3.w1``): transformers 4's layout of MoE adapters.

    transformers 5 holds the experts as fused 3-D tensors, which PEFT 0.21 (and lorafleet) adapt through
    target_parameters. PEFT's conversion of such an old adapter stacks w1 and w3 (gate_proj and up_proj)
    into gate_up_proj at twice the rank, with rank_pattern / alpha_pattern: a rank per tensor, which
    an lorafleet adapter (one rank) cannot hold, so it is refused rather than loaded into something else.
    """
    for key in state:
        m = _PER_EXPERT_KEY.search(key)
        if m:
            raise ValueError(
                f"{who}: {folder} adapts {m.group(1)} of each expert as its own module (key {key!r}), transformers "
                "4's layout of MoE adapters; transformers 5 fuses the experts into 3-D tensors, onto which PEFT 0.21 "
                "maps such an adapter only by stacking w1 and w3 at twice the rank on gate_up_proj (a rank per "
                "tensor, which lorafleet adapters do not have); train a new adapter with target_modules "
                f"{list(EXPERT_TARGETS)}"
            )


def _canonical(key: str) -> str:
    return key.removesuffix(".weight") if key.endswith("lora_magnitude_vector.weight") else key


def _config_dict(spec: AdapterSpec, base_model_name_or_path: str | None) -> dict:
    return peft_adapter_config(
        spec.kind, spec.rank, spec.alpha, spec.dropout, spec.use_rslora, spec.target_modules,
        base_model_name_or_path,
    )  # fmt: skip


def _check_state(spec: AdapterSpec, state: dict[str, torch.Tensor], where: str) -> None:
    """Every key is a PEFT key of a targeted module with A [r, *], B [*, r] and a magnitude iff DoRA."""
    who = f"adapter {spec.name!r}"
    if not state:
        raise ValueError(f"{who}: no weights {where}")
    modules: dict[tuple[int, str], set[str]] = {}
    for key, t in state.items():
        parsed = parse_peft_key(key, spec.target_modules)
        if parsed is None:
            raise ValueError(
                f"{who}: key {key!r} {where} is not a LoRA key of a decoder projection "
                "(expected base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.<lora_A.weight|...>)"
            )
        layer, _, module, part = parsed
        if module not in spec.target_modules:
            raise ValueError(
                f"{who}: key {key!r} {where} is for {module}, not in target_modules {spec.target_modules}"
            )
        modules.setdefault((layer, module), set()).add(part)
        if module in EXPERT_TARGETS:  # PEFT's expert layout: A [E * r, in], B [out, r * E]
            ok = t.dim() == 2 and (t.shape[0] if part == "lora_A" else t.shape[1]) % spec.rank == 0
            if not ok:
                raise ValueError(
                    f"{who}: {key} {where} has shape {list(t.shape)}; expert LoRA of rank {spec.rank} needs "
                    f"lora_A [experts * {spec.rank}, in] and lora_B [out, {spec.rank} * experts]"
                )
            continue
        if part == "lora_A" and (t.dim() != 2 or t.shape[0] != spec.rank):
            raise ValueError(
                f"{who}: {key} {where} has shape {list(t.shape)}; rank is {spec.rank}, so [{spec.rank}, in]"
            )
        if part == "lora_B" and (t.dim() != 2 or t.shape[1] != spec.rank):
            raise ValueError(
                f"{who}: {key} {where} has shape {list(t.shape)}; rank is {spec.rank}, so [out, {spec.rank}]"
            )
    want = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if spec.kind == "dora" else set())
    for (layer, module), parts in sorted(modules.items()):
        if parts != want:
            raise ValueError(
                f"{who}: layers.{layer}.{module} {where} has {sorted(parts)} but kind {spec.kind!r} needs {sorted(want)}"
            )


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_peft(
    folder: str | Path,
    spec: AdapterSpec,
    state: dict[str, torch.Tensor],
    base_model_name_or_path: str | None = None,
) -> None:
    """Write ``folder`` as PEFT does: adapter_config.json and adapter_model.safetensors.

    ``state`` maps PEFT keys to tensors (``adapter_parameters`` of one model, or of every pipeline stage
    merged). The files are written to a temporary folder next to ``folder`` and renamed into place, so a
    reader sees the old adapter or the new one, never half of one. An existing ``folder`` is replaced as a
    whole; one that holds files but no adapter_config.json is refused rather than deleted.
    """
    from safetensors.torch import save

    folder = Path(folder)
    _check_state(spec, state, "in the state to save")
    if folder.exists():
        if not folder.is_dir():
            raise ValueError(
                f"adapter {spec.name!r}: {folder} exists and is not a folder; choose another path"
            )
        if any(folder.iterdir()) and not (folder / CONFIG_NAME).is_file():
            raise ValueError(
                f"adapter {spec.name!r}: {folder} is not empty and holds no {CONFIG_NAME}; refusing to replace "
                "it: choose an empty or new folder"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
    config = json.dumps(_config_dict(spec, base_model_name_or_path), indent=2, sort_keys=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)
        _write_file(tmp / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
        _write_file(tmp / CONFIG_NAME, config.encode())
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    weights = folder / WEIGHTS_NAME
    try:
        if weights.is_file():
            from safetensors.torch import load_file

            return load_file(str(weights))
        legacy = folder / _LEGACY_WEIGHTS_NAME
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise several types for a damaged file
        raise ValueError(
            f"adapter {name!r}: cannot read the weights in {folder}: {e} (is the file complete?)"
        ) from e
    raise ValueError(f"adapter {name!r}: {folder} has {CONFIG_NAME} but no {WEIGHTS_NAME}")


def read_peft(folder: str | Path, name: str) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """The ``AdapterSpec`` (named ``name``) and the weights (PEFT keys) of a PEFT LoRA folder."""
    folder = Path(folder)
    who = f"adapter {name!r}"
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(f"{who}: {folder} is not a PEFT adapter folder (no {CONFIG_NAME})")
    try:
        cfg = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{who}: {folder / CONFIG_NAME} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else cfg
        raise ValueError(f"{who}: {folder} holds a {got!r} adapter; only peft_type LORA is supported")
    for field, allowed in _UNSUPPORTED.items():
        if cfg.get(field, allowed[0]) not in allowed:
            raise ValueError(
                f"{who}: {folder / CONFIG_NAME} sets {field}={cfg[field]!r}, which lorafleet does not support; "
                f"retrain the adapter without it"
            )
    for field in ("r", "lora_alpha"):
        if field not in cfg:
            raise ValueError(f"{who}: {folder / CONFIG_NAME} has no {field!r}")
    state = {_canonical(k): v for k, v in _read_weights(folder, name).items()}
    _refuse_per_expert_modules(state, who, folder)
    found = {parse_peft_key(k)[2] for k in state if parse_peft_key(k) is not None}
    targets = cfg.get("target_modules")
    params = cfg.get("target_parameters") or []
    if not isinstance(params, list):
        raise ValueError(f"{who}: {folder / CONFIG_NAME} has target_parameters {params!r}; expected a list")

    # PEFT matches target_parameters as suffixes of parameter names: "down_proj", "experts.down_proj" and
    # "mlp.experts.down_proj" all name the experts' down_proj.
    def names(p: str, t: str) -> bool:
        return p == t.split(".")[-1] or p.endswith(t)

    experts = [t for t in EXPERT_TARGETS if any(names(p, t) for p in params)]
    odd = [p for p in params if not any(names(p, t) for t in EXPERT_TARGETS)]
    if odd:
        raise ValueError(
            f"{who}: {folder / CONFIG_NAME} targets parameters {odd}; lorafleet adapts the MoE expert "
            f"tensors {list(EXPERT_TARGETS)} only"
        )
    if targets == [] and experts:
        targets = experts
    elif isinstance(targets, list):
        targets = targets + experts
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown:
            raise ValueError(
                f"{who}: {folder / CONFIG_NAME} targets {unknown}; lorafleet adapts only {list(TARGET_MODULES)}"
            )
        targets = [t for t in TARGET_MODULES if t in targets]
    else:  # a regex or "all-linear": the weights say which projections it reached
        targets = [t for t in LINEAR_TARGETS if t in found] + experts
    try:
        spec = AdapterSpec(
            name=name,
            kind="dora" if cfg.get("use_dora") else "lora",
            rank=cfg["r"],
            alpha=cfg["lora_alpha"],
            dropout=cfg.get("lora_dropout", 0.0),
            use_rslora=bool(cfg.get("use_rslora", False)),
            target_modules=tuple(targets),
        )
    except ValueError as e:
        raise ValueError(f"{e} (read from {folder / CONFIG_NAME})") from e
    _check_state(spec, state, f"in {folder}")
    return spec, state


_COMPARED = ("kind", "rank", "alpha", "use_rslora", "target_modules")


def load_peft(
    model: Decoder, folder: str | Path, name: str, expect: AdapterSpec | None = None
) -> AdapterSpec:
    """Add adapter ``name`` from a PEFT folder to ``model`` (only the layers it holds) and return its spec.

    ``expect`` (e.g. the adapter of a training config that resumes from this folder) must agree with the
    folder on kind, rank, alpha, rsLoRA and target modules; its dropout is used (the folder's is only a
    record of past training).
    """
    folder = Path(folder)
    spec, state = read_peft(folder, name)
    if expect is not None:
        for field in _COMPARED:
            want, got = getattr(expect, field), getattr(spec, field)
            if field == "target_modules":
                want, got = sorted(want), sorted(got)
            if want != got:
                raise ValueError(
                    f"adapter {name!r}: {field} is {want!r} in the configuration but {got!r} in {folder}; "
                    f"set {field} to {got!r} or train a new adapter"
                )
        spec = replace(spec, dropout=expect.dropout)
    add_peft_state(model, spec, state, f"{folder}")
    return spec


def add_peft_state(model: Decoder, spec: AdapterSpec, state: dict[str, torch.Tensor], where: str) -> None:
    """Add adapter ``spec`` to ``model`` with the weights ``state`` (PEFT keys, as ``read_peft`` returns).

    Every weight the model needs must be in ``state`` with the model's shape (``where`` names the source
    in the messages); on any error the adapter is taken off the model again. ``model`` may live on the
    ``meta`` device, which checks that an adapter fits a base without reading the base's weights.
    """
    name = spec.name
    n = model.config.num_hidden_layers
    parsed = [parse_peft_key(k, spec.target_modules) for k in state]
    beyond = sorted({p[0] for p in parsed if p is not None and p[0] >= n})
    if beyond:
        raise ValueError(
            f"adapter {name!r}: {where} has weights for layers {beyond[:5]} but the model has {n} layers; "
            "was it trained on another base model?"
        )
    add_adapter(model, spec)
    try:
        params = adapter_parameters(model, name)
        missing = [k for k in params if k not in state]
        if missing:
            raise ValueError(
                f"adapter {name!r}: {where} lacks {len(missing)} weights this model needs, e.g. {missing[:3]}"
            )
        for key, p in params.items():
            t = state[key]
            if t.shape != p.shape:
                raise ValueError(
                    f"adapter {name!r}: {key} in {where} has shape {list(t.shape)}, the model needs "
                    f"{list(p.shape)}; was it trained on another base model?"
                )
            with torch.no_grad():
                p.copy_(t.to(dtype=p.dtype, device=p.device))
    except BaseException:
        remove_adapter(model, name)
        raise
