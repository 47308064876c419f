"""The ``unpaired_preference`` format (TRL's KTO format): one completion per row, labelled desirable or not.

    {"prompt": "What is 2 + 2?", "completion": "4", "label": true}
    {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Go away"}], "label": false}

``prompt`` and ``completion`` are strings or chat messages (a list for the prompt, a list of assistant
messages for the completion), tokenized exactly as a ``preference`` row's prompt and answer are (string
completions end with the eos token). ``label`` is a JSON boolean: true for a desirable completion, false for
an undesirable one. A missing or mistyped field raises ``DataError`` naming ``file:line`` and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .fields import (
    check_max_seq_len,
    messages_field,
    missing_field,
    report_unsupervised,
    short_repr,
    text_field,
)
from .formats import Tokenizer, preference_example
from .sources import DataError, Row

__all__ = ["UnpairedExample", "tokenize_unpaired_rows"]


@dataclass(frozen=True)
class UnpairedExample:
    """A prompt and one completion (token ids, every completion token a target) with its label."""

    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    label: bool
    source: str = field(default="", compare=False)


def tokenize_unpaired_rows(
    rows: Sequence[Row], tokenizer: Tokenizer, max_seq_len: int
) -> list[UnpairedExample]:
    """``UnpairedExample``s of ``unpaired_preference`` rows; rows left without completion tokens are skipped."""
    check_max_seq_len(max_seq_len)
    examples: list[UnpairedExample] = []
    empty: list[Row] = []
    for row in rows:
        chat = isinstance(row.data.get("prompt"), list)
        if chat:
            prompt, completion = (
                messages_field(row, "prompt"),
                messages_field(row, "completion", only_assistant=True),
            )
        else:
            prompt, completion = text_field(row, "prompt"), text_field(row, "completion")
        label = row.data.get("label")
        if label is None:
            raise missing_field(row, "label")
        if not isinstance(label, bool):
            raise DataError(
                row.file,
                row.line,
                f"field 'label' is {type(label).__name__} {short_repr(label)}, expected true or false",
                "write label as a JSON boolean: true (desirable) or false (undesirable)",
            )
        try:
            # The same tokenization as a preference row's prompt and answer (one answer given twice).
            ex = preference_example(
                prompt, completion, completion, tokenizer=tokenizer, max_seq_len=max_seq_len
            )
        except ValueError as e:
            raise DataError(row.file, row.line, str(e)) from None
        if ex.chosen:
            examples.append(UnpairedExample(ex.prompt, ex.chosen, label, row.where))
        else:
            empty.append(row)
    report_unsupervised(empty, len(rows), examples, max_seq_len)
    return examples
