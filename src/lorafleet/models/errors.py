"""The errors of model loading, shared by the Hugging Face and GGUF loaders (neither imports the other)."""

from __future__ import annotations

from ..model_paths import ModelLoadError  # torch-free, for launchers that check a path only

__all__ = ["ModelLoadError", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model lorafleet cannot run."""
