"""Loading a run config: YAML with duplicate-key detection and line numbers, relative paths, messages.

cfg = load_config("examples/demo.yaml")        # RunConfig; relative data/model paths resolved
cfg = parse_config({"base_model": {...}, ...})  # the same from a dict (REST jobs, tests)
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .errors import ConfigError, Loc, explain, fmt_loc, short
from .schema import RunConfig

__all__ = ["load_config", "parse_config"]


def parse_config(data: Any, *, base_dir: str | Path | None = None, source: str | None = None) -> RunConfig:
    """Validate a config given as plain data (a dict, e.g. from YAML or JSON).

    ``base_dir``: relative dataset, model and ``init_from`` paths are resolved against it (None: left as
    given). ``source``: a name for messages (e.g. the YAML file). Raises ``ConfigError``.
    """
    return _parse(data, base_dir=base_dir, source=source, node=None)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; relative data and model paths are taken from the file's folder."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = "it is a folder; give the YAML file inside it" if p.is_dir() else "check the path"
        raise ConfigError([f"{p}: config file not found ({hint})"])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read the config ({e}); save it as UTF-8 text"]) from None
    try:
        loader = _Loader(text)
        loader.name = str(p)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise ConfigError([str(e)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            [f"{where}: not valid YAML ({what}); check the indentation and quoting near that line"]
        ) from None
    return _parse(data, base_dir=p.parent, source=str(p), node=node)

    # ---------------------------------------------------------------------------------------------------------
    # YAML loading with duplicate-key detection and line numbers.

    """A key given twice in one YAML mapping; the message is the whole paragraph."""


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping; the message is the whole paragraph."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(
                    f"{self.name}:{line}: key {key!r} appears twice in one mapping (lines {seen[key]} and "
                    f"{line}); keep one"
                )
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 2e-4 (no dot) as a string; accept it as the float everyone means.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _line_of(node: Any, loc: Loc) -> int | None:
    """1-based line of the YAML node at ``loc`` (the key's line for a mapping entry), or the nearest parent."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if getattr(key_node, "value", None) == part:
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# ---------------------------------------------------------------------------------------------------------
# Validation and messages.


def _parse(data: Any, *, base_dir: str | Path | None, source: str | None, node: Any) -> RunConfig:
    def where(loc: Loc) -> str:
        line = _line_of(node, loc) if node is not None else None
        head = f"{source}:{line}: " if (source and line) else (f"{source}: " if source else "")
        return head + (fmt_loc(loc) if loc else "config")

    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{where(())}: got {type(data).__name__} {short(data)}; a config is a mapping with "
                "base_model, datasets, adapters and tasks (see README, Configuration)"
            ]
        )
    if base_dir is not None:
        data = _resolve_paths(data, Path(base_dir))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        paragraphs: list[str] = []
        for err in e.errors(include_url=False):
            for loc, msg in explain(err, RunConfig):
                paragraphs.append(f"{where(loc)}: {msg}")
        raise ConfigError(list(dict.fromkeys(paragraphs))) from None


def _resolve_paths(data: dict, base: Path) -> dict:
    """A copy of ``data`` with relative data, model, init_from and reference paths joined to ``base``."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value or value.startswith("pkg:"):
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p))

    out = dict(data)
    if isinstance(out.get("base_model"), dict) and "path" in out["base_model"]:
        out["base_model"] = {**out["base_model"], "path": fix(out["base_model"]["path"])}
    keywords = ("base", "init")  # tasks[i].reference values that are not paths
    for section, key in (("datasets", "path"), ("adapters", "init_from"), ("tasks", "reference")):
        if isinstance(out.get(section), list):
            out[section] = [
                {**item, key: fix(item[key])}
                if isinstance(item, dict) and key in item and item[key] not in keywords
                else item
                for item in out[section]
            ]
    return out
