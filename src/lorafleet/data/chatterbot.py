"""The chatterbot corpus (the bundled demo data) as prompt/completion rows."""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

__all__ = ["chatterbot_to_prompt_completion"]


def chatterbot_to_prompt_completion(category: str, language: str = "english") -> list[dict[str, str]]:
    """Prompt/completion pairs from the installed ``chatterbot_corpus`` package's ``<language>/<category>.yml``.

    Each conversation ``[t0, t1, t2, ...]`` gives the consecutive pairs ``(t0, t1), (t1, t2), ...`` (the
    corpus' own reading: every statement answers the one before it). Entries that are not lists of at least
    two strings are skipped; the YAML is read with every scalar as text, so an answer such as ``yes`` stays
    the string "yes".
    """
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the chatterbot_corpus package is not installed; pip install --no-deps chatterbot-corpus==1.3.3"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    folder = root / language
    if not folder.is_dir():
        raise ValueError(_unknown("language", language, sorted(p.name for p in root.iterdir() if p.is_dir())))
    path = folder / f"{category}.yml"
    if not path.is_file():
        raise ValueError(
            _unknown(f"{language} category", category, sorted(p.stem for p in folder.glob("*.yml")))
        )
    doc = yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader) or {}
    pairs: list[dict[str, str]] = []
    for conv in doc.get("conversations", []) if isinstance(doc, dict) else []:
        if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(t, str) for t in conv):
            continue
        turns = [t.strip() for t in conv]
        pairs.extend({"prompt": a, "completion": b} for a, b in zip(turns, turns[1:]))
    return pairs


def _unknown(kind: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"chatterbot corpus has no {kind} {name!r}; {hint}available: {', '.join(known)}"
