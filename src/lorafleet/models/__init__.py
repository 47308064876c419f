"""The LLaMA-family base model: decoder, loading, tokenizer and generation.

Generation lives in ``lorafleet.models.generate`` (``from lorafleet.models.generate import generate``); it is
not re-exported here, so that the name keeps meaning the module.
"""

from .decoder import Decoder
from .families import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .loading import ModelLoadError, load_model, read_model_config
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "Decoder",
    "ModelConfig",
    "ModelLoadError",
    "Tokenizer",
    "UnsupportedModelError",
    "load_model",
    "load_tokenizer",
    "read_model_config",
]
