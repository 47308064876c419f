"""``lorafleet generate``: the command line of ``models.generate.generate`` (base model and PEFT adapters).

It lives outside ``models`` because it loads adapters (``lorafleet.lora``), which the models package must
not import.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .models.generate import generate

__all__ = ["cli_generate"]


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device {name} asked for, but this machine has no CUDA GPU visible to torch; use --device cpu"
        )
    return dev


def cli_generate(args: argparse.Namespace) -> int:
    """``lorafleet generate``: load the model and tokenizer, apply the chat template, print each answer."""
    from .models.loading import base_dtype, load_model
    from .models.tokenizer import load_tokenizer

    dtype = base_dtype(args.dtype)
    device = _device(args.device)
    model = load_model(args.model, dtype=dtype, device=device)
    tok = load_tokenizer(args.model)
    use_template = bool(tok.chat_template) and not args.no_chat_template
    system = getattr(args, "system", None)
    if system is not None and not use_template:
        why = "--no-chat-template is set" if tok.chat_template else f"{args.model} has no chat template"
        raise ValueError(f"--system needs the chat template, but {why}; put the instructions in --prompt")
    head = [{"role": "system", "content": system}] if system is not None else []
    prompts = []
    for text in args.prompt:
        if use_template:
            rendered = tok.apply_chat_template(
                [*head, {"role": "user", "content": text}], add_generation_prompt=True
            )
            prompts.append(tok.encode(rendered, add_special_tokens=False))
        else:
            prompts.append(tok.encode(text, add_special_tokens=True))
    columns = _cli_adapters(model, getattr(args, "adapter", None) or [])
    if columns:
        return _print_side_by_side(model, tok, args, prompts, columns)
    outs = generate(model, tok, prompts, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    for i, (text, ids) in enumerate(zip(args.prompt, outs)):
        if len(outs) > 1:
            print(f"--- [{i}] {text}")
        print(tok.decode(ids, skip_special_tokens=True).strip())
    sys.stdout.flush()
    return 0


def _cli_adapters(model, values: list[str]) -> list[tuple[str, str | None]]:
    """``--adapter`` values (``base``, ``PATH`` or ``LABEL=PATH``) loaded onto ``model``: [(label, adapter)]."""
    from .lora import load_peft

    columns: list[tuple[str, str | None]] = []
    for i, value in enumerate(values):
        label, sep, path = value.partition("=")
        if not sep:
            label, path = (value, "") if value == "base" else (Path(value).name or value, value)
        if any(label == c[0] for c in columns):
            raise ValueError(
                f"--adapter {value!r}: the label {label!r} is used twice; name them --adapter LABEL=PATH"
            )
        if not path:
            columns.append((label, None))
            continue
        if not (Path(path) / "adapter_config.json").is_file():
            raise ValueError(
                f"--adapter {value!r}: {path} is not a PEFT adapter folder (no adapter_config.json); give the "
                "folder lorafleet train wrote (OUTPUT_DIR/adapters/NAME), or base for the base model"
            )
        name = f"cli{i}"  # labels may hold any character; adapter names may not
        load_peft(model, path, name)
        columns.append((label, name))
    return columns


def _print_side_by_side(
    model, tok, args, prompts: list[list[int]], columns: list[tuple[str, str | None]]
) -> int:
    """Every prompt answered by every adapter in ONE batch (each row its own adapter), printed together."""
    rows = [(p, name) for p in range(len(prompts)) for _, name in columns]
    outs = generate(
        model,
        tok,
        [prompts[p] for p, _ in rows],
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        adapters=[name for _, name in rows],
    )
    width = max(len(label) for label, _ in columns) + 2
    k = 0
    for i, text in enumerate(args.prompt):
        print(f"--- [{i}] {text}")
        for label, _ in columns:
            answer = tok.decode(outs[k], skip_special_tokens=True).strip().replace("\n", " ")
            print(f"{f'[{label}]':<{width}} {answer}")
            k += 1
    sys.stdout.flush()
    return 0
