"""``lorafleet demo`` (what ``make demo`` runs): four adapters at once on the bundled SmolLM2-135M.

    lorafleet demo

1. writes four chatterbot-corpus categories (installed from PyPI) as prompt/completion JSONL files, each
   prompt in the model's chat format, to ``runs/demo-data/``;
2. trains ``examples/demo.yaml``: four adapters (LoRA, rsLoRA, DoRA, all-module LoRA) on one frozen base;
3. answers one held-in question per category with the base model and with each adapter, side by side,
   in one mixed-adapter generation batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["cli_demo", "write_demo_data"]

_DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "demo.yaml"


def write_demo_data(cfg, tokenizer) -> dict[str, str]:
    """Write each dataset of the demo config from its chatterbot category; returns one question per dataset."""
    from .data.chatterbot import chatterbot_to_prompt_completion

    questions = {}
    for ds in cfg.datasets:
        pairs = chatterbot_to_prompt_completion(ds.name)
        path = Path(ds.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for pair in pairs:
                prompt = tokenizer.apply_chat_template(
                    [{"role": "user", "content": pair["prompt"]}], add_generation_prompt=True
                )
                f.write(json.dumps({"prompt": prompt, "completion": pair["completion"]}) + "\n")
        tmp.replace(path)
        questions[ds.name] = pairs[0]["prompt"]
    return questions


def cli_demo(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from .config import load_config
    from .lora import load_peft
    from .models import base_dtype, load_model
    from .models.generate import generate
    from .models.tokenizer import load_tokenizer
    from .train.engine import Engine, resolve_device
    from .train.run import print_summary

    config_path = Path(args.config) if args.config else _DEFAULT_CONFIG
    if not config_path.is_file():
        raise ValueError(f"demo config {config_path} not found; pass --config PATH")
    cfg = load_config(config_path)
    if args.output_dir:
        cfg = cfg.model_copy(update={"output_dir": Path(args.output_dir)})
    console = Console()
    tokenizer = load_tokenizer(cfg.base_model.path)
    questions = write_demo_data(cfg, tokenizer)
    device = resolve_device(cfg.base_model.device)
    dtype = base_dtype(cfg.base_model.dtype)
    console.print(
        f"[bold]lorafleet demo[/bold]: {len(cfg.tasks)} adapters on one {cfg.base_model.path} ({device})"
    )
    model = load_model(cfg.base_model.path, dtype, device)
    engine = Engine(cfg, model=model, tokenizer=tokenizer)
    states = engine.run(progress=True)
    print_summary(states, Path(cfg.output_dir))

    # Side by side: every question answered by the base and by every adapter, in one mixed batch.
    names = [a.name for a in cfg.adapters if states[a.name].status == "succeeded"] if cfg.adapters else []
    for name in names:
        load_peft(model, Path(cfg.output_dir) / "adapters" / name, name)
    prompts, rows, keys = [], [], []
    for ds_name, q in questions.items():
        ids = tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
            add_special_tokens=False,
        )
        for adapter in [None, *names]:
            prompts.append(ids)
            rows.append(adapter)
            keys.append((ds_name, adapter))
    with torch.no_grad():
        outs = generate(model, tokenizer, prompts, max_new_tokens=40, adapters=rows)
    answers = {k: tokenizer.decode(o).strip().replace("\n", " ") for k, o in zip(keys, outs)}
    for ds_name, q in questions.items():
        table = Table(title=f"Q ({ds_name}): {q}", show_lines=True)
        table.add_column("model", style="bold")
        table.add_column("answer")
        for adapter in [None, *names]:
            table.add_row(adapter or "base", answers[(ds_name, adapter)])
        console.print(table)
    return 0
