"""Exporting trained adapters for other tools: PEFT folders, merged Hugging Face models, llama.cpp GGUF files.

``export_adapter`` is what ``lorafleet export`` runs; ``base_model_reference`` is the one rule for the base a
saved adapter names (``lorafleet train`` uses it too).
"""

from .base_ref import base_model_reference, check_hf_id, hf_id_of, resolve_base
from .gguf_out import write_gguf_adapter, write_gguf_model
from .merge import merge_adapter, merged_weight, write_hf_folder
from .run import ExportResult, export_adapter, parse_size

__all__ = [
    "ExportResult",
    "base_model_reference",
    "check_hf_id",
    "export_adapter",
    "hf_id_of",
    "merge_adapter",
    "merged_weight",
    "parse_size",
    "resolve_base",
    "write_gguf_adapter",
    "write_gguf_model",
    "write_hf_folder",
]
