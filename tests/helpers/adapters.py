"""A random, non-zero LoRA / rsLoRA / DoRA adapter saved as a PEFT folder (for export and loading tests)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorafleet.export import base_model_reference
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, save_peft
from lorafleet.models import load_model

__all__ = ["random_adapter"]


def random_adapter(base: Path, folder: Path, seed: int = 0, **spec_kw) -> AdapterSpec:
    """A PEFT folder of a random adapter whose B (and DoRA magnitude) are far from their zero init."""
    spec = AdapterSpec(name="a", **spec_kw)
    model = load_model(base)
    add_adapter(model, spec, generator=torch.Generator().manual_seed(seed))
    params = adapter_parameters(model, "a")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in params.items():
            if ".lora_B." in key:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "magnitude" in key:
                p.mul_(1.0 + 0.2 * torch.rand(p.shape, generator=g))
    save_peft(folder, spec, {k: p.detach() for k, p in params.items()}, base_model_reference(base))
    return spec
