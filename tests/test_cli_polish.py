"""The command line's manners: --version, defaults in every --help, generate --system, an 80-column eval table."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import yaml

import lorafleet
from lorafleet.cli import build_parser, main


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """Every (sub)command path of the CLI with its parser."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"lorafleet {lorafleet.__version__}"


def test_every_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one option per line, so each line can be checked
    paths = [p for p, _ in _commands(build_parser())]
    assert ("export",) in paths and ("jobs", "create") in paths and ("tokens", "create") in paths
    for path, parser in _commands(build_parser()):
        text = _help(list(path), capsys)
        entries = re.split(r"\n(?=  -)", text)  # one entry per option: its line and its wrapped help
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS):
                continue
            entry = next(
                e for e in entries if action.option_strings[-1] in e.split("\n")[0].replace(",", " ").split()
            )
            assert f"default: {action.default}" in " ".join(entry.split()), (
                path,
                action.option_strings,
                entry,
            )
    assert "default: 64" in _help(["generate"], capsys)
    assert "default: 2GB" in _help(["export"], capsys)


def test_generate_system_message(tiny_model_dir, capsys):
    from lorafleet.models import load_model, load_tokenizer
    from lorafleet.models.generate import generate

    args = ["generate", "--model", str(tiny_model_dir), "--prompt", "Hello world", "--max-new-tokens", "6"]
    assert main([*args, "--system", "Answer in French."]) == 0
    got = capsys.readouterr().out.strip()
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello world"}]
    prompt = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False)
    assert "Answer in French." in tok.decode(prompt, skip_special_tokens=False)
    (ids,) = generate(model, tok, [prompt], 6)
    assert got == tok.decode(ids, skip_special_tokens=True).strip()
    assert main([*args]) == 0  # without --system the template's default system message is used
    assert main([*args, "--system", "x", "--no-chat-template"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_table_fits_80_columns(tiny_model_dir, tmp_path, monkeypatch, capsys):
    rows = [{"prompt": f"Question number {i}?", "completion": f" Answer {i}."} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    name = "a-rather-long-task-name-for-the-table"
    cfg = {
        "base_model": {"path": str(tiny_model_dir)},
        "output_dir": str(tmp_path / "a-long-output-folder-name" / "with-more-depth" / "run"),
        "datasets": [{"name": "held-out-evaluation-set", "path": str(tmp_path / "d.jsonl"), "format": "prompt_completion"}],
        "adapters": [{"name": name, "rank": 2, "alpha": 4}],
        "tasks": [{"name": name, "adapter": name, "dataset": "held-out-evaluation-set", "batch_size": 2,
                   "max_steps": 1, "eval_dataset": "held-out-evaluation-set"}],
    }  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    last = [json.loads(x) for x in (tmp_path / cfg["output_dir"] / "metrics.jsonl").read_text().splitlines()]
    loss = [r for r in last if r.get("kind") == "eval"][-1]["eval_loss"]
    monkeypatch.setenv("COLUMNS", "80")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c.yaml"), "--with-base"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert f"{loss:.4f}" in out, out
    assert re.search(r"\b4\b", out) and "perplexity" in out and "reward acc" in out, out
