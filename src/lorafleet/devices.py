"""The torch device a config names (``base_model.device``)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str) -> torch.device:
    """The torch device of ``base_model.device`` (``auto``: CUDA when available, else the CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "base_model.device is 'cuda' but no CUDA device is available; use device: cpu or auto"
        )
    return torch.device(device)
