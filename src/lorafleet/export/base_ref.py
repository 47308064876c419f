"""What an exported or trained adapter names as its base: something other tools resolve.

``base_model_reference`` is the one place that decides the ``base_model_name_or_path`` an adapter folder
records (``lorafleet train`` and ``lorafleet export`` both call it): the base's Hugging Face id when one is
known, else the base's absolute path. The id comes, in order, from the ``base_model.hf_id`` setting, from a
GGUF file's ``general.source.*`` metadata (the repository llama.cpp converted it from), or from a Hugging
Face folder's ``config.json`` ``_name_or_path`` when that is a hub id rather than a local path.

``resolve_base`` goes the other way for ``lorafleet export``: from what an adapter recorded (or an explicit
``--base``) to a local model file or folder, with an error that says what to pass when the record is a hub
id that is not on this machine.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from ..models.loading import ModelLoadError, resolve_model_path

__all__ = ["BaseModelLike", "adapter_base", "base_model_reference", "check_hf_id", "hf_id_of", "resolve_base"]

# A hub id: "name" or "owner/name"; letters, digits, '-', '_', '.'; no leading '.' or '-' and no "..".
_HF_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)/?$")
# GGUF keys that name the repository a file was converted from (general.url / general.repo_url name the
# GGUF's own repository, which transformers cannot load as a model, so they are not used).
_GGUF_SOURCE_KEYS = ("general.source.huggingface.repository", "general.source.repo_url", "general.source.url")


def check_hf_id(value: str) -> str:
    """``value`` if it is a well-formed Hugging Face model id (``owner/name`` or ``name``), else ``ValueError``."""
    if not isinstance(value, str) or not _HF_ID.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a Hugging Face model id; write it as owner/name, e.g. "
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        )
    return value


def _id_from_text(text: object, near: Path | None = None) -> str | None:
    """The hub id ``owner/name`` in ``text`` (an id or a huggingface.co URL); None for anything else.

    A relative path that exists (from the working folder, or from ``near``) is a path, not an id.
    """
    if not isinstance(text, str) or not text:
        return None
    m = _HF_URL.match(text.strip())
    text = m.group(1) if m else text.strip()
    if "/" not in text or not _HF_ID.match(text) or ".." in text:
        return None
    if Path(text).expanduser().exists() or (near is not None and (near / text).exists()):
        return None
    return text


@lru_cache(maxsize=32)
def _hf_id_cached(path: str, mtime_ns: int) -> str | None:
    p = Path(path)
    if p.is_file():
        from ..models.gguf import GGUFFile

        meta = GGUFFile(p).metadata
        for key in _GGUF_SOURCE_KEYS:
            found = _id_from_text(meta.get(key))
            if found:
                return found
        return None
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return _id_from_text(cfg.get("_name_or_path"), p.parent) if isinstance(cfg, dict) else None


def hf_id_of(path: str | Path) -> str | None:
    """The Hugging Face id recorded in a model's own metadata (GGUF ``general.source.*``, HF ``_name_or_path``)."""
    p = resolve_model_path(path).resolve()
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist; give a Hugging Face folder or a .gguf file"
        )
    return _hf_id_cached(str(p), p.stat().st_mtime_ns)


def base_model_reference(path: str | Path, hf_id: str | None = None) -> str:
    """The ``base_model_name_or_path`` to record for an adapter of the base at ``path``.

    ``hf_id`` (the ``base_model.hf_id`` setting) wins; then the id in the model's metadata; else the
    absolute path of the model file or folder (``pkg:`` paths resolved), which every tool on this machine
    can open.
    """
    if hf_id:
        return check_hf_id(hf_id)
    p = resolve_model_path(path).resolve()
    found = hf_id_of(p) if p.exists() else None
    return found or str(p)


class BaseModelLike(Protocol):
    """What ``adapter_base`` reads of a run's ``base_model`` section (``lorafleet.config.BaseModelConfig``)."""

    path: str
    hf_id: str | None


def adapter_base(base_model: BaseModelLike) -> str:
    """``base_model_reference`` of a config's ``base_model`` section: what a trained adapter records."""
    return base_model_reference(base_model.path, base_model.hf_id)


def resolve_base(recorded: str | None, base: str | Path | None = None) -> Path:
    """The local model (folder or .gguf file) an export merges into or describes.

    ``base`` (``--base``) wins; else ``recorded`` (the adapter's ``base_model_name_or_path``) when it is a
    local path or a ``pkg:`` path. A hub id that is not a local path is refused with the fix.
    """
    text = str(base) if base is not None else recorded
    where = "--base" if base is not None else "the adapter's base_model_name_or_path"
    if not text:
        raise ValueError(
            "the adapter records no base model (base_model_name_or_path is empty); pass --base PATH "
            "(the model folder or .gguf file it was trained on)"
        )
    p = resolve_model_path(text).expanduser()
    if p.exists():
        return p.resolve()
    if base is None and _HF_ID.match(text):
        raise ValueError(
            f"the adapter's base is the Hugging Face id {text!r}, which is not a local path and cannot be "
            "downloaded here; pass --base PATH (the model folder or .gguf file it was trained on)"
        )
    raise ValueError(f"base model {text!r} ({where}) does not exist; pass --base PATH to an existing model")
