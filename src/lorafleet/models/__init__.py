"""The frozen base model of every supported family: decoder, loading, tokenizer and generation.

Generation lives in ``lorafleet.models.generate`` (``from lorafleet.models.generate import generate``); it is
not re-exported here, so that the name keeps meaning the module.
"""

from .decoder import Decoder
from .errors import ModelLoadError, UnsupportedModelError
from .families import SUPPORTED_ARCHITECTURES, ModelConfig
from .loading import base_dtype, load_model, read_model_config
from .tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "base_dtype",
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
