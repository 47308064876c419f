"""Dataset rows -> token ids and a supervision mask, one rule per format.

    rows = read_rows("data/tech.jsonl")
    examples = tokenize_rows(rows, "prompt_completion", tokenizer, max_seq_len=512)

An ``Example`` is ``tokens`` and ``mask``: ``mask[i]`` is True when token i is supervised, i.e. the loss
includes predicting ``tokens[i]`` from ``tokens[:i]``. ``mask[0]`` is always False (nothing predicts the
first token), so the packer's next-token label for position j is ``tokens[j + 1]`` where ``mask[j + 1]``
and ignored elsewhere. Every example is cut from the right at ``max_seq_len`` tokens (mask cut with it).

Rules (``enc(s, special)`` is ``tokenizer.encode(s, add_special_tokens=special)``, ``eos`` its eos id):

- ``prompt_completion`` ``{"prompt", "completion"}``: ``enc(prompt, True) + enc(completion, False) + [eos]``;
  the completion's tokens and the eos are supervised.
- ``alpaca`` ``{"instruction", "input" (optional), "output"}``: the Stanford Alpaca prompt (the variant
  with an Input section when ``input`` is non-empty) as the prompt and ``output`` as the completion, then
  exactly as ``prompt_completion``.
- ``text`` ``{"text"}``: ``enc(text, True) + [eos]``, everything supervised.
- ``chat`` ``{"messages": [{"role", "content"}, ...]}``: the conversation rendered by the tokenizer's chat
  template and tokenized with ``add_special_tokens=False`` (the template writes its own special tokens).
  Each assistant message k supervises the tokens it adds: from the end of ``render(messages[:k],
  add_generation_prompt=True)`` (so the assistant header is context, not target) to the end of
  ``render(messages[:k + 1])`` (so the template's end-of-turn marker, e.g. ``<|im_end|>``, is learnt and
  generation knows when to stop). Both renderings must be prefixes of the whole conversation, as text and
  as tokens; a template that breaks this (one that rewrites earlier turns) is refused with the row's
  location. No extra eos is appended: the end-of-turn marker plays that role.
- ``preference`` ``{"prompt", "chosen", "rejected"}`` (strings, or chat messages: a list for the prompt
  and a list of assistant messages for each answer): a ``PreferenceExample`` of prompt tokens
  (``enc(prompt, True)``) and each answer's tokens (``enc(answer, False) + [eos]``); with messages, the
  prompt is the rendered conversation with the generation prompt and each answer is the tokens its
  messages add. The prompt is cut at ``max_seq_len`` and each answer at ``max_seq_len - len(prompt)``.

An example left with no supervised token (a prompt of ``max_seq_len`` tokens or more) teaches nothing:
``tokenize_rows`` skips it with one warning that counts them and names the first; if none is left it raises.
Every missing or mistyped field raises ``DataError`` naming ``file:line`` and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .fields import check_max_seq_len, messages_field, report_unsupervised, text_field
from .sources import DataError, Row, read_rows

if TYPE_CHECKING:
    from ..config import DatasetConfig

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "SFT_FORMATS",
    "Example",
    "PreferenceExample",
    "Tokenizer",
    "alpaca_example",
    "chat_example",
    "load_examples",
    "preference_example",
    "prompt_completion_example",
    "text_example",
    "tokenize_preference_rows",
    "tokenize_rows",
]

SFT_FORMATS = ("prompt_completion", "chat", "alpaca", "text")

# The prompts of Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class Tokenizer(Protocol):
    """What the formats need from a tokenizer (lorafleet's own, or a thin wrapper around a HF one)."""

    eos_token_id: int | None
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = ...
    ) -> str: ...


@dataclass(frozen=True)
class Example:
    """Token ids and which of them are supervised (``mask[i]``: predict ``tokens[i]`` from ``tokens[:i]``).

    ``source`` (``file:line``) is for messages only and takes no part in equality.
    """

    tokens: tuple[int, ...]
    mask: tuple[bool, ...]
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.mask):
            raise ValueError(
                f"Example: {len(self.tokens)} tokens but {len(self.mask)} mask entries; give one per token"
            )
        if self.mask and self.mask[0]:
            raise ValueError("Example: mask[0] is True, but nothing predicts the first token; set it False")

    @property
    def num_supervised(self) -> int:
        return sum(self.mask)


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt and two answers, as token ids; the answers continue the prompt (all of their tokens are targets)."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]
    source: str = field(default="", compare=False)


# ---------------------------------------------------------------------------------------------------------
# One example from plain values. These raise ValueError on bad values; tokenize_rows adds file:line.


def prompt_completion_example(
    prompt: str, completion: str, tokenizer: Tokenizer, max_seq_len: int
) -> Example:
    """``enc(prompt, True) + enc(completion, False) + [eos]``, cut at ``max_seq_len``; completion + eos supervised."""
    head = list(tokenizer.encode(prompt, add_special_tokens=True))
    tail = list(tokenizer.encode(completion, add_special_tokens=False)) + [_eos(tokenizer)]
    return _example(head + tail, [False] * len(head) + [True] * len(tail), max_seq_len)


def alpaca_example(
    instruction: str, input: str, output: str, tokenizer: Tokenizer, max_seq_len: int
) -> Example:
    """The Alpaca prompt (with an Input section when ``input`` is non-empty) + ``output``, as prompt_completion."""
    if input.strip():
        prompt = ALPACA_PROMPT.format(instruction=instruction, input=input)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return prompt_completion_example(prompt, output, tokenizer, max_seq_len)


def text_example(text: str, tokenizer: Tokenizer, max_seq_len: int) -> Example:
    """``enc(text, True) + [eos]``, cut at ``max_seq_len``; every token after the first supervised."""
    tokens = list(tokenizer.encode(text, add_special_tokens=True)) + [_eos(tokenizer)]
    return _example(tokens, [True] * len(tokens), max_seq_len)


def chat_example(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, max_seq_len: int) -> Example:
    """The rendered conversation; each assistant message's own tokens supervised (see the module docstring)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant message, so nothing to learn; add one")
    if messages[0]["role"] == "assistant":
        raise ValueError(
            "the conversation starts with an assistant message, which has no context to answer; "
            "start with a user (or system) message"
        )
    full_text = _render(tokenizer, messages, add_generation_prompt=False)
    tokens = list(tokenizer.encode(full_text, add_special_tokens=False))
    mask = [False] * len(tokens)
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _prefix_tokens(tokenizer, messages[:k], True, full_text, tokens, k)
        end = _prefix_tokens(tokenizer, messages[: k + 1], False, full_text, tokens, k + 1)
        mask[start:end] = [True] * (end - start)
    return _example(tokens, mask, max_seq_len)


def preference_example(
    prompt: str | Sequence[dict[str, str]],
    chosen: str | Sequence[dict[str, str]],
    rejected: str | Sequence[dict[str, str]],
    tokenizer: Tokenizer,
    max_seq_len: int,
) -> PreferenceExample:
    """Prompt tokens and the two answers' tokens (strings, or chat messages; see the module docstring)."""
    answers: list[list[int]] = []
    if isinstance(prompt, str):
        p = list(tokenizer.encode(prompt, add_special_tokens=True))
        for answer in (chosen, rejected):
            if not isinstance(answer, str):
                raise ValueError(
                    "the prompt is a string but an answer is not; give both as strings or as messages"
                )
            answers.append(list(tokenizer.encode(answer, add_special_tokens=False)) + [_eos(tokenizer)])
    else:
        prompt_text = _render(tokenizer, prompt, add_generation_prompt=True)
        p = list(tokenizer.encode(prompt_text, add_special_tokens=False))
        for answer in (chosen, rejected):
            if isinstance(answer, str):
                raise ValueError(
                    "the prompt is a list of messages but an answer is a string; give both as messages"
                )
            full_text = _render(tokenizer, [*prompt, *answer], add_generation_prompt=False)
            full = list(tokenizer.encode(full_text, add_special_tokens=False))
            n = _prefix_tokens(tokenizer, prompt, True, full_text, full, len(prompt))
            answers.append(full[n:])
    p = p[:max_seq_len]
    room = max_seq_len - len(p)
    return PreferenceExample(tuple(p), tuple(answers[0][:room]), tuple(answers[1][:room]))


# ---------------------------------------------------------------------------------------------------------
# Rows -> examples, with file:line errors.


def tokenize_rows(rows: Sequence[Row], fmt: str, tokenizer: Tokenizer, max_seq_len: int) -> list[Example]:
    """Examples of an SFT format (prompt_completion, chat, alpaca, text), in row order.

    Rows whose example has no supervised token after cutting at ``max_seq_len`` are skipped with a warning;
    if every row is skipped this raises ``DataError``.
    """
    if fmt not in SFT_FORMATS:
        hint = "; preference rows go through tokenize_preference_rows" if fmt == "preference" else ""
        raise ValueError(f"format {fmt!r} is not one of {', '.join(SFT_FORMATS)}{hint}")
    check_max_seq_len(max_seq_len)
    build = {"prompt_completion": _pc_row, "chat": _chat_row, "alpaca": _alpaca_row, "text": _text_row}[fmt]
    examples: list[Example] = []
    empty: list[Row] = []
    for row in rows:
        try:
            ex = build(row, tokenizer, max_seq_len)
        except DataError:
            raise
        except ValueError as e:
            raise DataError(row.file, row.line, str(e)) from None
        if ex.num_supervised:
            examples.append(Example(ex.tokens, ex.mask, row.where))
        else:
            empty.append(row)
    report_unsupervised(empty, len(rows), examples, max_seq_len)
    return examples


def tokenize_preference_rows(
    rows: Sequence[Row], tokenizer: Tokenizer, max_seq_len: int
) -> list[PreferenceExample]:
    """``PreferenceExample``s of ``preference`` rows; rows left without answer tokens are skipped (warning)."""
    check_max_seq_len(max_seq_len)
    examples: list[PreferenceExample] = []
    empty: list[Row] = []
    for row in rows:
        chat = isinstance(row.data.get("prompt"), list)
        values = []
        for name in ("prompt", "chosen", "rejected"):
            if chat:
                values.append(messages_field(row, name, only_assistant=name != "prompt"))
            else:
                values.append(text_field(row, name))
        try:
            ex = preference_example(*values, tokenizer=tokenizer, max_seq_len=max_seq_len)
        except ValueError as e:
            raise DataError(row.file, row.line, str(e)) from None
        if ex.chosen and ex.rejected:
            examples.append(PreferenceExample(ex.prompt, ex.chosen, ex.rejected, row.where))
        else:
            empty.append(row)
    report_unsupervised(empty, len(rows), examples, max_seq_len)
    return examples


def load_examples(
    dataset: DatasetConfig, tokenizer: Tokenizer, max_seq_len: int
) -> list[Example] | list[PreferenceExample]:
    """Read a configured dataset (its first ``max_examples`` rows) and tokenize it by its format."""
    rows = read_rows(dataset.path, limit=dataset.max_examples)
    if dataset.format == "preference":
        return tokenize_preference_rows(rows, tokenizer, max_seq_len)
    if dataset.format == "unpaired_preference":
        from .unpaired import tokenize_unpaired_rows

        return tokenize_unpaired_rows(rows, tokenizer, max_seq_len)
    return tokenize_rows(rows, dataset.format, tokenizer, max_seq_len)


def _pc_row(row: Row, tokenizer: Tokenizer, max_seq_len: int) -> Example:
    return prompt_completion_example(
        text_field(row, "prompt"), text_field(row, "completion"), tokenizer, max_seq_len
    )


def _alpaca_row(row: Row, tokenizer: Tokenizer, max_seq_len: int) -> Example:
    instruction, output = text_field(row, "instruction"), text_field(row, "output")
    inp = text_field(row, "input", required=False)
    return alpaca_example(instruction, inp, output, tokenizer, max_seq_len)


def _text_row(row: Row, tokenizer: Tokenizer, max_seq_len: int) -> Example:
    return text_example(text_field(row, "text"), tokenizer, max_seq_len)


def _chat_row(row: Row, tokenizer: Tokenizer, max_seq_len: int) -> Example:
    return chat_example(messages_field(row, "messages"), tokenizer, max_seq_len)


# ---------------------------------------------------------------------------------------------------------
# Helpers.


def _example(tokens: list[int], mask: list[bool], max_seq_len: int) -> Example:
    tokens, mask = tokens[:max_seq_len], mask[:max_seq_len]
    if mask:
        mask[0] = False
    return Example(tuple(int(t) for t in tokens), tuple(mask))


def _eos(tokenizer: Tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            "the tokenizer has no eos token, which ends every example; use a tokenizer that has one"
        )
    return int(eos)


def _render(tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    except Exception as e:  # template engines raise anything (jinja2 errors, raise_exception in templates)
        raise ValueError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None
    if not isinstance(text, str):
        raise ValueError(
            f"apply_chat_template returned {type(text).__name__}, not the rendered text; wrap the tokenizer so it "
            "returns a string (for a Hugging Face tokenizer: tokenize=False)"
        )
    return text


def _prefix_tokens(
    tokenizer: Tokenizer,
    head: Sequence[dict[str, str]],
    add_generation_prompt: bool,
    full_text: str,
    full_tokens: list[int],
    count: int,
) -> int:
    """Number of tokens of the rendering of ``head``, checked to be a prefix of the whole conversation."""
    text = _render(tokenizer, head, add_generation_prompt)
    if not full_text.startswith(text):
        raise ValueError(
            f"the chat template renders the first {count} messages as text that does not start the whole "
            "conversation (it rewrites earlier turns), so assistant turns cannot be located; use a template that "
            "renders each turn independently, or the prompt_completion format"
        )
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if full_tokens[: len(ids)] != ids:
        raise ValueError(
            f"the tokens of the first {count} messages are not a prefix of the whole conversation's tokens (the "
            "tokenizer merges text across the turn boundary), so assistant turns cannot be located; end turns "
            "with a special token in the template, or use the prompt_completion format"
        )
    return len(ids)
