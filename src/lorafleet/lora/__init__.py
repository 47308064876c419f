"""Adapters on the frozen base: the fused multi-adapter linear, adapter kinds and HF PEFT's format."""

from .adapters import (
    ADAPTER_KINDS,
    TARGET_MODULES,
    AdapterSpec,
    adapter_names,
    adapter_parameters,
    adapter_spec,
    add_adapter,
    lora_plus_param_groups,
    remove_adapter,
)
from .backend import LoraBackend
from .experts import FusedLoRAExperts, reference_expert_lora
from .fused import FusedLoRALinear, reference_fused_lora
from .peft_format import load_peft, read_peft, save_peft

__all__ = [
    "ADAPTER_KINDS",
    "TARGET_MODULES",
    "AdapterSpec",
    "FusedLoRAExperts",
    "FusedLoRALinear",
    "LoraBackend",
    "adapter_names",
    "adapter_parameters",
    "adapter_spec",
    "add_adapter",
    "load_peft",
    "lora_plus_param_groups",
    "read_peft",
    "reference_expert_lora",
    "reference_fused_lora",
    "remove_adapter",
    "save_peft",
]
