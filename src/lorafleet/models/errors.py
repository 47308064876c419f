"""The errors of model loading, shared by the Hugging Face and GGUF loaders (neither imports the other)."""

from __future__ import annotations

__all__ = ["ModelLoadError", "UnsupportedModelError"]


class ModelLoadError(ValueError):
    """The model path cannot be loaded; the message says why and what to do."""


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model lorafleet cannot run."""
