"""The LLaMA-family base model: decoder, loading, tokenizer and generation."""

from .decoder import Decoder
from .families import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .generate import generate
from .loading import ModelLoadError, load_model, read_model_config
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Decoder",
    "ModelConfig",
    "ModelLoadError",
    "Tokenizer",
    "UnsupportedModelError",
    "generate",
    "load_model",
    "load_tokenizer",
    "read_model_config",
]
