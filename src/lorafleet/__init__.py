"""lorafleet: fine-tune many LoRA adapters at once on one shared, frozen base LLM."""

from .batch import FusedBatch
from .models import load_model

__all__ = ["FusedBatch", "load_model"]
__version__ = "0.1.0"
