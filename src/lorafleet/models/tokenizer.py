"""Tokenizers from a Hugging Face folder (``tokenizer.json``) or a GGUF file's metadata, and chat templates.

``load_tokenizer(path)`` returns a ``Tokenizer`` that behaves like ``transformers.AutoTokenizer`` on the same
files (the tests compare them):

- HF folder: the ``tokenizers`` serialisation in ``tokenizer.json`` as is, plus ``tokenizer_config.json`` for
  the special tokens and the chat template (or ``chat_template.jinja``, which wins). Whether BOS/EOS are added
  is decided by ``tokenizer.json``'s post-processor; like transformers 5, ``add_bos_token`` in the config is
  ignored when ``tokenizer.json`` exists.
- GGUF: rebuilt from llama.cpp's metadata. ``tokenizer.ggml.model == "gpt2"`` is byte-level BPE with the
  stored merges (SmolLM2, LLaMA 3, Qwen2); the pre-tokenizer regex follows ``tokenizer.ggml.pre``.
  ``"llama"`` is SentencePiece BPE (LLaMA 2, Mistral): byte fallback, a "\u2581" prefix on the first word,
  merges recovered from the token scores when the file has none. Tokens typed CONTROL become special tokens,
  USER_DEFINED ones plain added tokens.

Chat templates are rendered as transformers does: a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML, the
``{% generation %}`` tag, and the special tokens (``bos_token``, ``eos_token``, ...) as variables.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = ["Tokenizer", "load_tokenizer"]

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# Pre-tokenizer split regexes of the common byte-level vocabularies, by llama.cpp's ``tokenizer.ggml.pre``.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


class Tokenizer:
    """Text <-> token ids and chat templates for one model.

    Args:
        backend: the ``tokenizers.Tokenizer`` doing the work (with its post-processor already set).
        special_tokens: ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` strings (or None).
        chat_template: the Jinja chat template, or None when the model has none.
        clean_up_tokenization_spaces: remove spaces before punctuation on decode (ignored for BPE, as in
            transformers, because it corrupts byte-level text).
    """

    def __init__(
        self,
        backend,
        special_tokens: dict[str, str | None],
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        self.backend = backend
        self.special_tokens = {k: special_tokens.get(k) for k in _SPECIAL_NAMES}
        self.chat_template = chat_template
        self._clean_up = clean_up_tokenization_spaces and type(backend.model).__name__ != "BPE"
        self._compiled: Any = None

    def _id(self, name: str) -> int | None:
        tok = self.special_tokens[name]
        return None if tok is None else self.backend.token_to_id(tok)

    @property
    def bos_token_id(self) -> int | None:
        return self._id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        return self._id("unk_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the model wants around it (e.g. BOS)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens (e.g. ``<|im_end|>``) are left out unless asked for."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
                text = text.replace(a, b)
        return text

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with the model's chat template.

        ``add_generation_prompt`` appends the header of the assistant's turn; ``kwargs`` become template
        variables (e.g. ``tools``). Raises ``ValueError`` when the model has no chat template, or when the
        template itself refuses the conversation (its ``raise_exception`` message is kept).
        """
        import jinja2

        if not self.chat_template:
            raise ValueError(
                "this tokenizer has no chat template; format the prompt yourself "
                "(or use `lorafleet generate --no-chat-template`)"
            )
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template)
        chat = []
        for m in messages:
            if not isinstance(m, dict):
                raise ValueError(
                    f"chat messages must be dicts like {{'role': 'user', 'content': '...'}}, got {m!r}"
                )
            # None-valued keys (content=None from OpenAI-style APIs) are dropped, as transformers does.
            chat.append({k: v for k, v in m.items() if v is not None})
        variables = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables.update(kwargs)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        try:
            return self._compiled.render(
                messages=chat, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused these messages: {e}") from e


def _compile_template(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; render it as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Callable[[], str]) -> str:
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace()`` that refuses underscore names, so templates cannot reach Python internals."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes ({name!r})"
                )

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialised AddedToken ({"content": ...})."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _add_special(backend, tokens: list[str]) -> None:
    """Make ``tokens`` whole, special added tokens unless they already are added tokens (as transformers does)."""
    from tokenizers import AddedToken

    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new = [
        AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens) if t and t not in added
    ]
    if new:
        backend.add_special_tokens(new)


def _set_bos_eos(backend, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """The post-processor ``[BOS] $A [EOS]`` of a GGUF tokenizer, per llama.cpp's add_bos / add_eos flags."""
    from tokenizers import processors

    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    special = ([(bos, backend.token_to_id(bos))] if add_bos else []) + (
        [(eos, backend.token_to_id(eos))] if add_eos else []
    )
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _load_hf_folder(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ValueError(
            f"{folder} has no tokenizer.json; lorafleet reads the `tokenizers` format (save the tokenizer with "
            "transformers' save_pretrained, which writes it)"
        )
    try:
        backend = Backend.from_file(str(tj))
    except Exception as e:  # the Rust parser raises a bare Exception with the JSON position
        raise ValueError(f"cannot read {tj}: {e}") from e
    cfg_path = folder / "tokenizer_config.json"
    try:
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    special = {name: _token_text(cfg.get(name)) for name in _SPECIAL_NAMES}
    extra = [_token_text(t) for key in ("additional_special_tokens", "extra_special_tokens")
             for t in (cfg.get(key) or []) if isinstance(cfg.get(key), list)]  # fmt: skip
    for entry in (cfg.get("added_tokens_decoder") or {}).values():
        if entry.get("special", False):
            extra.append(entry.get("content"))
    _add_special(backend, [t for t in (*special.values(), *extra) if t])
    template = cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text()
    return Tokenizer(backend, special, template, bool(cfg.get("clean_up_tokenization_spaces", False)))


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best score first.

    Ties keep the order transformers uses (longer left piece first, then the pieces' ids).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:k], token[k:], score)
            for k in range(1, len(token))
            if token[:k] in vocab and token[k:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _load_gguf(path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from .gguf import GGUFFile

    meta = GGUFFile(path).metadata
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise ValueError(
            f"{path} holds no tokenizer (no tokenizer.ggml.tokens); use a GGUF file with its vocabulary"
        )
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges_raw = meta.get("tokenizer.ggml.merges")
    if kind == "gpt2":
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        to_unicode = dict(zip(range(256), _byte_alphabet()))
        # A token written outside the byte alphabet is respelled byte by byte, as the vocabulary means it.
        vocab = {
            (t if set(t) <= alphabet else "".join(to_unicode[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        merges = [tuple(m.split(" ")) for m in merges_raw or []]
        backend = Backend(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))  # fmt: skip
        split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
        if split is None:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        else:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]  # fmt: skip
            )
        backend.decoder = decoders.ByteLevel()
        default_add_bos = False
    elif kind == "llama":
        vocab = {t: i for i, t in enumerate(tokens)}
        if merges_raw:
            merges = [tuple(m.split(" ")) for m in merges_raw]
        else:
            merges = _spm_merges(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
        backend = Backend(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first", split=False
        )
        backend.decoder = decoders.Sequence(
            [
                decoders.Replace("\u2581", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(" ", 1, 0),
            ]
        )
        default_add_bos = (
            True  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise
        )
    else:
        raise ValueError(
            f"{path} has a tokenizer of kind {kind!r}; lorafleet builds 'gpt2' (byte-level BPE) and 'llama' "
            "(SentencePiece) tokenizers from GGUF files"
        )
    byte_level = kind == "gpt2"
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        # In a byte-level vocabulary a CONTROL token outside the byte alphabet is a llama.cpp mislabel.
        if ty == _CONTROL and (not byte_level or set(t) <= alphabet)
    ]
    if control:
        backend.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED
    ]
    if user:
        backend.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    _add_special(backend, [t for t in special.values() if t])
    _set_bos_eos(
        backend,
        special["bos_token"],
        special["eos_token"],
        bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)),
        bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )
    return Tokenizer(backend, special, meta.get("tokenizer.chat_template"))


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (byte-level BPE spells tokens with these)."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder or a ``.gguf`` file (see the module docstring).

    ``path`` may also be ``pkg:PACKAGE/FILE`` (a file inside an installed package, as ``load_model`` accepts).
    """
    from .loading import resolve_model_path

    p = resolve_model_path(path)
    if not p.exists():
        raise ValueError(
            f"tokenizer path {str(p)!r} does not exist; give a Hugging Face folder or a .gguf file"
        )
    if p.is_dir():
        return _load_hf_folder(p)
    if p.suffix != ".gguf":
        raise ValueError(
            f"{p} is neither a folder nor a .gguf file; give a Hugging Face folder or a GGUF file"
        )
    return _load_gguf(p)
