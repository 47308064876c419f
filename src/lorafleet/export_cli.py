"""``lorafleet export``'s command line (torch-free: the API process builds the whole CLI parser).

    lorafleet export --adapter runs/demo/adapters/science --output exported/science        # PEFT folder
    lorafleet export --adapter runs/demo/adapters/science --output merged --merge          # merged HF model
    lorafleet export --adapter runs/demo/adapters/science --output science.gguf --gguf     # llama.cpp adapter

The work is ``lorafleet.export.export_adapter``.
"""

from __future__ import annotations

import argparse

__all__ = ["add_export_command"]


def _cli_export(args: argparse.Namespace) -> int:
    from .export.run import export_adapter

    result = export_adapter(
        args.adapter,
        args.output,
        merge=args.merge,
        gguf=args.gguf,
        base=args.base,
        hf_id=args.hf_id,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
    )
    what = {
        "peft": f"PEFT adapter folder (base_model_name_or_path: {result.base})",
        "hf": f"merged Hugging Face model folder ({len(result.files)} safetensors file(s); base {result.base})",
        "gguf-adapter": f"llama.cpp LoRA adapter (base {result.base}; llama-cli -m BASE.gguf --lora FILE)",
        "gguf-model": f"merged GGUF model (base {result.base})",
    }[result.kind]
    print(f"wrote {result.path}: {what}")
    return 0


def add_export_command(sub) -> None:
    """The ``lorafleet export`` subcommand."""
    p = sub.add_parser(
        "export",
        help="export a trained adapter: PEFT folder, merged HF model, llama.cpp adapter or merged GGUF",
        description="Export a trained adapter: a PEFT folder naming a resolvable base, the merged model "
        "(Hugging Face safetensors, or GGUF with --gguf), or a llama.cpp LoRA adapter (--gguf).",
    )
    p.add_argument(
        "--adapter",
        required=True,
        metavar="DIR",
        help="a PEFT adapter folder (e.g. OUTPUT_DIR/adapters/NAME)",
    )
    p.add_argument(
        "--output", required=True, metavar="PATH", help="the folder (or .gguf file with --gguf) to write"
    )
    p.add_argument(
        "--merge", action="store_true", help="merge the adapter into the base and write the whole model"
    )
    p.add_argument(
        "--gguf", action="store_true", help="write llama.cpp's GGUF (an adapter, or with --merge a model)"
    )
    p.add_argument(
        "--base", default=None, metavar="PATH", help="the base model (default: the one the adapter records)"
    )
    p.add_argument(
        "--hf-id",
        default=None,
        metavar="OWNER/NAME",
        help="Hugging Face id to record as the PEFT export's base (default: from the base's metadata, else its path)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        help="dtype of merged weights: float32, float16 or bfloat16 (GGUF: float32 or float16; norms stay "
        "float32)",
    )
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard of a merged HF folder")
    p.set_defaults(func=_cli_export)
