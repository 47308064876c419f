"""The LLaMA-family base model: decoder, loading, tokenizer and generation."""

from .decoder import Decoder
from .families import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .loading import ModelLoadError, load_model, read_model_config

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Decoder",
    "ModelConfig",
    "ModelLoadError",
    "UnsupportedModelError",
    "load_model",
    "read_model_config",
]
