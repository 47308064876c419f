"""``lorafleet export``: an adapter folder as a PEFT folder, a merged model (HF or GGUF), or a llama.cpp adapter.

    lorafleet export --adapter DIR --output OUT               # PEFT folder naming a resolvable base
    lorafleet export --adapter DIR --output OUT --merge       # base + adapter as a HF safetensors folder
    lorafleet export --adapter DIR --output OUT.gguf --gguf   # llama.cpp LoRA adapter
    lorafleet export --adapter DIR --output OUT.gguf --merge --gguf   # merged GGUF model

The base is the one the adapter records (``base_model_name_or_path``) or ``--base PATH``. Every output is
written next to its destination and renamed into place, so a failed export leaves nothing half-written; an
existing non-empty destination is refused.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..lora.adapters import AdapterSpec
from ..lora.peft_format import CONFIG_NAME, check_peft_representable, read_peft, save_peft
from ..models.families import ModelConfig
from .base_ref import base_model_reference, check_hf_id, resolve_base

__all__ = ["EXPORT_DTYPES", "ExportResult", "export_adapter", "parse_size"]

EXPORT_DTYPES = ("float32", "float16", "bfloat16")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``kind`` peft | hf | gguf-adapter | gguf-model, its path, its files and base."""

    kind: str
    path: Path
    files: tuple[str, ...]
    base: str


def parse_size(text: str | int) -> int:
    """Bytes in ``"2GB"``, ``"500MB"``, ``"64KiB"`` or a plain number (decimal units as Hugging Face's)."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max shard size {text!r} is not a size; write it as e.g. 2GB, 500MB or 64KiB")
    return max(1, int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()]))


def _check_fits(cfg: ModelConfig, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> None:
    """Refuse an adapter that does not fit a base of config ``cfg`` (checked on a weightless meta model)."""
    from ..lora.peft_format import add_peft_state
    from ..models.decoder import Decoder

    try:
        add_peft_state(Decoder(cfg, device="meta"), spec, state, "the adapter")
    except ValueError as e:
        raise ValueError(f"{e}; pass --base PATH to the model it was trained on") from e


def _check_destination(output: Path) -> None:
    if output.is_dir() and any(output.iterdir()):
        raise ValueError(f"{output} exists and is not empty; remove it or choose another --output")
    if output.is_file():
        raise ValueError(f"{output} exists; remove it or choose another --output")


def _install(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` (file or folder) to ``output`` (an empty folder there is replaced)."""
    if output.is_dir():
        output.rmdir()
    tmp.replace(output)


def _adapter_name(folder: Path) -> str:
    """The folder's name as an adapter name (used in messages), or "adapter" when it cannot be one."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", folder.resolve().name)
    try:
        return AdapterSpec(name=name).name
    except ValueError:  # empty, or a reserved word such as "items"
        return "adapter"


def _recorded_base(adapter: Path) -> str | None:
    cfg = json.loads((adapter / CONFIG_NAME).read_text())
    value = cfg.get("base_model_name_or_path")
    return value if isinstance(value, str) and value else None


def _load_merged(adapter: Path, base: Path, name: str):
    """The base at ``base`` loaded in float32 with the adapter folded into its weights."""
    from ..models.gguf import GGUFFile
    from ..models.loading import load_model
    from .merge import merge_adapter

    spec, state = read_peft(adapter, name)
    model = load_model(base, dtype=torch.float32, device="cpu")
    if base.is_file() and "rope_freqs.weight" in GGUFFile(base).tensors:
        raise ValueError(
            f"{base} carries LLaMA 3 rope scaling as a rope_freqs tensor, which a merged export cannot describe "
            "in config.json; merge into the Hugging Face folder of the same model instead (--base FOLDER)"
        )
    merge_adapter(model, spec, state)
    return model


def export_adapter(
    adapter: str | Path,
    output: str | Path,
    *,
    merge: bool = False,
    gguf: bool = False,
    base: str | Path | None = None,
    hf_id: str | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "2GB",
) -> ExportResult:
    """Export the PEFT adapter folder ``adapter`` to ``output`` (see the module docstring for the four kinds).

    ``base`` overrides the base the adapter records; ``hf_id`` the Hugging Face id written into a PEFT
    export; ``dtype`` is the stored dtype of merged weights (GGUF: float32 or float16, norms stay float32);
    ``max_shard_size`` bounds each safetensors shard of a merged HF folder.
    """
    from .gguf_out import GGUF_DTYPES, write_gguf_adapter, write_gguf_model
    from .merge import write_hf_folder

    adapter, output = Path(adapter).expanduser(), Path(output).expanduser()
    if not adapter.is_dir():
        raise ValueError(
            f"adapter folder {str(adapter)!r} does not exist; give a PEFT adapter folder (--adapter)"
        )
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {EXPORT_DTYPES}")
    if gguf and dtype not in GGUF_DTYPES:
        raise ValueError(
            f"a GGUF export stores {' or '.join(GGUF_DTYPES)}, not {dtype}; pass --dtype float16"
        )
    if hf_id is not None:
        check_hf_id(hf_id)
    name = _adapter_name(adapter)
    spec, state = read_peft(adapter, name)  # validates the folder before anything is loaded
    recorded = _recorded_base(adapter)
    _check_destination(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        if not merge and not gguf:
            local = resolve_base(recorded, base) if base is not None else _local_base(recorded)
            if hf_id is not None:
                ref = hf_id
            elif local is not None:
                ref = base_model_reference(local)
            elif recorded is not None:
                ref = recorded  # a hub id (or a path of another machine): kept as recorded
            else:
                raise ValueError("the adapter records no base model; pass --base PATH or --hf-id OWNER/NAME")
            if local is not None:  # what PEFT would read differently on this base
                from ..models.loading import read_model_config

                check_peft_representable(spec, read_model_config(local).model_type)
            save_peft(tmp_dir / "out", spec, state, ref)
            result = ExportResult(
                "peft", output, tuple(sorted(p.name for p in (tmp_dir / "out").iterdir())), ref
            )
            _install(tmp_dir / "out", output)
            return result
        base_path = resolve_base(recorded, base)
        if gguf and not merge:
            from ..models.loading import read_model_config

            cfg = read_model_config(base_path)
            _check_fits(cfg, spec, state)
            write_gguf_adapter(tmp_dir / "out.gguf", cfg, spec, state, dtype)
            _install(tmp_dir / "out.gguf", output)
            return ExportResult("gguf-adapter", output, (output.name,), str(base_path))
        if gguf:  # before the merge: a family lorafleet cannot write as a GGUF model is refused at once
            from ..models.loading import read_model_config
            from .gguf_out import check_gguf_model_family

            check_gguf_model_family(read_model_config(base_path))
        model = _load_merged(adapter, base_path, name)
        if gguf:
            write_gguf_model(tmp_dir / "out.gguf", model, base_path, f"{base_path.stem}-{name}", dtype)
            _install(tmp_dir / "out.gguf", output)
            return ExportResult("gguf-model", output, (output.name,), str(base_path))
        model = model.to(getattr(torch, dtype))
        files = write_hf_folder(model, base_path, tmp_dir / "out", parse_size(max_shard_size))
        _install(tmp_dir / "out", output)
        return ExportResult("hf", output, tuple(files), str(base_path))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _local_base(recorded: str | None) -> Path | None:
    """``resolve_base(recorded)``, or None when ``recorded`` is not a local model."""
    if recorded is None:
        return None
    try:
        return resolve_base(recorded)
    except ValueError:
        return None
