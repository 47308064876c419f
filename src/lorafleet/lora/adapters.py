"""Adapter configuration and weights: add, remove and list adapters of a (possibly partial) decoder.

Legend: R rank, I input features, O output features of one adapted projection.

An adapter is an ``AdapterSpec`` (kind, rank, alpha, dropout, rsLoRA, target projections) plus, in every
targeted projection of the layers the model holds, A [R, I], B [O, R] and for DoRA a magnitude [O]. The
parameters live in the ``FusedLoRALinear`` that replaces each targeted ``Linear``; ``adapter_parameters``
names them with HF PEFT's state-dict keys, so saving, loading and optimizer groups need no other mapping.

Each adapted projection knows its ``MaskSite`` (layer index, index of its name in ``TARGET_MODULES``),
where its keyed dropout masks are drawn (``lorafleet.masks``).

Initialisation is PEFT's: A ``kaiming_uniform_(a=sqrt(5))``, B zeros, DoRA magnitude = the row norms of
W + scaling * B A (= ||W|| row-wise at init). Each projection draws A from its own generator, seeded from
one number drawn from ``generator`` and the projection's name, so a pipeline stage that holds layers
[a, b) gets exactly the weights the full model would have there.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from ..masks import MaskSite
from ..models.decoder import Decoder, Linear
from ..models.moe import Experts
from .backend import LoraBackend
from .experts import EXPERT_TARGETS, FusedLoRAExperts, expert_peft_keys, init_expert_factors
from .fused import FusedLoRALinear, dora_weight_norm

__all__ = [
    "ADAPTER_KINDS",
    "TARGET_MODULES",
    "AdapterSpec",
    "adapter_names",
    "adapter_parameters",
    "adapter_spec",
    "add_adapter",
    "lora_plus_param_groups",
    "peft_key",
    "remove_adapter",
]

ADAPTER_KINDS = ("lora", "dora")
# Every target name of every family, in PEFT's names: the projections (PEFT's target_modules; Phi-3's
# fused qkv_proj and gate_up_proj) and the MoE expert tensors (PEFT's target_parameters). Which of them a
# model has is the family's: add_adapter names the ones it lacks.
LINEAR_TARGETS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
)  # fmt: skip
TARGET_MODULES = LINEAR_TARGETS + EXPERT_TARGETS
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MODULE = re.compile(r"^layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)$")
PEFT_PREFIX = "base_model.model.model."


@cache
def _reserved_names() -> frozenset[str]:
    """Attribute names of a ParameterDict, which cannot be adapter (parameter) names."""
    return frozenset(dir(nn.ParameterDict()))


@dataclass(frozen=True)
class AdapterSpec:
    """What one adapter is; validated on construction (``ValueError`` naming the adapter and the field).

    Attributes:
        name: unique per model; letters, digits, ``_`` and ``-`` (it becomes a parameter and folder name).
        kind: "lora" or "dora" (weight-decomposed LoRA: a trained magnitude per output row).
        rank: r of A [r, in] and B [out, r], >= 1.
        alpha: lora_alpha; the update is scaled by ``scaling``.
        dropout: dropout on the adapter's input in training mode, in [0, 1).
        use_rslora: rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.
        target_modules: projection names among ``TARGET_MODULES``.
    """

    name: str
    kind: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        who = f"adapter {self.name!r}"
        if not isinstance(self.name, str) or not _NAME.match(self.name) or self.name in _reserved_names():
            raise ValueError(
                f"{who}: name must be letters, digits, '_' or '-' and not a reserved word; rename the adapter"
            )
        if self.kind not in ADAPTER_KINDS:
            raise ValueError(f"{who}: kind {self.kind!r} is not supported; use one of {ADAPTER_KINDS}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{who}: rank must be an integer >= 1, got {self.rank!r}; e.g. rank=8")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"{who}: alpha must be a positive number, got {self.alpha!r}; e.g. alpha=16")
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"{who}: dropout must be in [0, 1), got {self.dropout!r}")
        targets = (
            (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
        )
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown or not targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"{who}: target_modules {list(targets)} must be distinct names among {list(TARGET_MODULES)}"
                + (f"; unknown: {unknown}" if unknown else "")
            )
        if any(t in EXPERT_TARGETS for t in targets) and (self.kind != "lora" or self.dropout > 0):
            raise ValueError(
                f"{who}: LoRA on experts ({', '.join(EXPERT_TARGETS)}) is plain LoRA without dropout, as in PEFT "
                f"(target_parameters); set dropout: 0 and kind: lora, or drop the expert targets"
            )
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        """alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def peft_key(module_name: str, part: str) -> str:
    """PEFT's saved key for a decoder module and part ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")."""
    return f"{PEFT_PREFIX}{module_name}.{part}"


def _fused_layers(model: nn.Module) -> list[tuple[str, FusedLoRALinear | FusedLoRAExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FusedLoRALinear | FusedLoRAExperts)]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    names: dict[str, None] = {}
    for _, layer in _fused_layers(model):
        names.update(dict.fromkeys(layer.specs))
    return list(names)


def adapter_spec(model: nn.Module, name: str) -> AdapterSpec:
    """The ``AdapterSpec`` of adapter ``name`` on ``model``."""
    for _, layer in _fused_layers(model):
        if name in layer.specs:
            return layer.specs[name]
    raise ValueError(f"adapter {name!r} is not on this model; adapters: {adapter_names(model)}")


def _module_seed(seed: int, module_name: str) -> int:
    return (seed + zlib.crc32(module_name.encode())) % (2**63)


def _model_backend(model: nn.Module, backend: LoraBackend | str | None) -> LoraBackend:
    """The backend for new fused layers of ``model``: its layers' one backend, checked against ``backend``."""
    have = {m.backend for m in model.modules() if isinstance(m, FusedLoRALinear)}
    want = LoraBackend.parse(backend) if backend is not None else None
    if want is not None and have and have != {want}:
        names = ", ".join(sorted(b.value for b in have))
        raise ValueError(
            f"LoRA backend {want.value!r}: this model's fused layers were built with {names}; a model's "
            "layers share one backend, chosen by its first add_adapter (build the model again to change it)"
        )
    return want or next(iter(have), LoraBackend.AUTO)


def add_adapter(
    model: Decoder,
    spec: AdapterSpec,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    backend: LoraBackend | str | None = None,
) -> None:
    """Add adapter ``spec`` to every targeted projection of the layers ``model`` holds.

    Targeted ``Linear`` modules are swapped for ``FusedLoRALinear`` once (later adapters reuse it). The new
    parameters are trainable, in ``dtype`` (float32 by default, as PEFT keeps adapters on a bfloat16 base)
    on the model's device, initialised as PEFT does. ``generator`` (CPU) seeds A; None uses torch's RNG.
    ``backend`` (``LoraBackend``; None: the one the model's fused layers already have, else ``auto``) is
    the implementation of the layers swapped in; all fused layers of a model have one backend, so a
    different one than theirs is refused.
    """
    if not isinstance(spec, AdapterSpec):
        raise ValueError(f"add_adapter needs an AdapterSpec, got {type(spec).__name__}")
    if spec.name in adapter_names(model):
        raise ValueError(
            f"adapter {spec.name!r}: name is already used on this model; remove it or pick another name"
        )
    targets: list[tuple[nn.Module, int, str, str, Linear]] = []
    expert_targets: list[tuple[nn.Module, str, Experts]] = []
    found: set[str] = set()
    available: set[str] = set()
    wanted_params = tuple(p for p in ("gate_up_proj", "down_proj") if f"experts.{p}" in spec.target_modules)
    for mod_name, mod in model.named_modules():
        if isinstance(mod, Experts):
            available.update(EXPERT_TARGETS)
            if wanted_params:
                expert_targets.append((model.get_submodule(mod_name.rsplit(".", 1)[0]), mod_name, mod))
                found.update(f"experts.{p}" for p in wanted_params)
            continue
        m = _MODULE.match(mod_name)
        if m and isinstance(mod, Linear):
            available.add(m.group(3))
            if m.group(3) in spec.target_modules:
                parent = model.get_submodule(mod_name.rsplit(".", 1)[0])
                targets.append((parent, int(m.group(1)), m.group(3), mod_name, mod))
                found.add(m.group(3))
    missing = [t for t in spec.target_modules if t not in found]
    if missing:
        raise ValueError(
            f"adapter {spec.name!r}: target_modules {missing} are not projections of this model "
            f"({model.config.architecture}; it has {sorted(available)})"
        )
    chosen = _model_backend(model, backend)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    for parent, mod_name, mod in expert_targets:
        layer = mod if isinstance(mod, FusedLoRAExperts) else FusedLoRAExperts(mod)
        if layer is not mod:
            parent.experts = layer
        g = torch.Generator().manual_seed(_module_seed(seed, mod_name))
        layer.add(spec, init_expert_factors(layer, spec, wanted_params, g, dtype))
    for parent, layer_index, leaf, mod_name, mod in targets:
        # The dropout masks' site: the layer's index in the full model and the projection's fixed id.
        site = MaskSite(layer_index, TARGET_MODULES.index(leaf))
        layer = mod if isinstance(mod, FusedLoRALinear) else FusedLoRALinear(mod, site, chosen)
        if layer is not mod:
            setattr(parent, leaf, layer)
        g = torch.Generator().manual_seed(_module_seed(seed, mod_name))
        a_RI = torch.empty(spec.rank, layer.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a_RI, a=math.sqrt(5), generator=g)
        a_RI = a_RI.to(device=layer.weight.device, dtype=dtype)
        b_OR = torch.zeros(layer.out_features, spec.rank, device=layer.weight.device, dtype=dtype)
        magnitude_O = None
        if spec.kind == "dora":
            magnitude_O = dora_weight_norm(layer.weight, a_RI, b_OR, spec.scaling, torch.float32).to(dtype)
        layer.add(spec, a_RI, b_OR, magnitude_O)


def remove_adapter(model: Decoder, name: str) -> None:
    """Remove adapter ``name`` and its parameters from every layer (the fused layers stay in place)."""
    if name not in adapter_names(model):
        raise ValueError(f"adapter {name!r} is not on this model; adapters: {adapter_names(model)}")
    for _, layer in _fused_layers(model):
        layer.remove(name)


def adapter_parameters(model: Decoder, name: str) -> dict[str, nn.Parameter]:
    """Adapter ``name``'s trainable parameters keyed by PEFT's saved keys (layers this model holds only).

    e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, ``...lora_B.weight`` and for
    DoRA ``...lora_magnitude_vector``.
    """
    out: dict[str, nn.Parameter] = {}
    for mod_name, layer in _fused_layers(model):
        if name in layer.specs and isinstance(layer, FusedLoRAExperts):
            parent = mod_name.rsplit(".", 1)[0]
            paths = expert_peft_keys(layer.specs[name].target_modules)
            for param, (a, b) in layer.parameters_of(name).items():
                out[peft_key(f"{parent}.{paths[param]}", "lora_A.weight")] = a
                out[peft_key(f"{parent}.{paths[param]}", "lora_B.weight")] = b
        elif name in layer.specs:
            out[peft_key(mod_name, "lora_A.weight")] = layer.lora_A[name]
            out[peft_key(mod_name, "lora_B.weight")] = layer.lora_B[name]
            if name in layer.lora_magnitude_vector:
                out[peft_key(mod_name, "lora_magnitude_vector")] = layer.lora_magnitude_vector[name]
    if not out:
        raise ValueError(f"adapter {name!r} is not on this model; adapters: {adapter_names(model)}")
    return out


def lora_plus_param_groups(params: dict[str, nn.Parameter], lr: float, ratio: float | None) -> list[dict]:
    """Optimizer parameter groups; with LoRA+ (``ratio``) B matrices train at ``lr * ratio``.

    As PEFT's ``create_loraplus_optimizer`` does, 1-D parameters (DoRA's magnitude) join B's group; A
    matrices keep ``lr``. ``ratio`` None gives one group at ``lr``. Empty groups are left out.
    """
    if ratio is None:
        return [{"params": list(params.values()), "lr": lr}]
    if not ratio > 0:
        raise ValueError(f"LoRA+ ratio must be positive, got {ratio!r}; typical values are 2 to 16")
    fast = [p for k, p in params.items() if ".lora_B." in k or p.ndim == 1]
    slow = [p for k, p in params.items() if not (".lora_B." in k or p.ndim == 1)]
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]
    return [g for g in groups if g["params"]]
