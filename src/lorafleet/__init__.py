"""lorafleet: fine-tune many LoRA adapters at once on one shared, frozen base LLM.

``FusedBatch``, ``load_model`` and ``load_tokenizer`` are imported on first use (module ``__getattr__``), so
that ``import lorafleet.service`` and other torch-free parts (the REST API, the dispatcher) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import FusedBatch
    from .models import load_model, load_tokenizer

__all__ = ["FusedBatch", "load_model", "load_tokenizer"]
__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {"FusedBatch": ".batch", "load_model": ".models", "load_tokenizer": ".models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
