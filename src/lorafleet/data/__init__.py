"""Datasets: read rows from files (``sources``) and turn them into token ids and supervision (``formats``)."""

from .chatterbot import chatterbot_to_prompt_completion
from .formats import (
    SFT_FORMATS,
    Example,
    PreferenceExample,
    Tokenizer,
    alpaca_example,
    chat_example,
    load_examples,
    preference_example,
    prompt_completion_example,
    text_example,
    tokenize_preference_rows,
    tokenize_rows,
)
from .sources import DataError, Row, read_rows

__all__ = [
    "SFT_FORMATS",
    "DataError",
    "Example",
    "PreferenceExample",
    "Row",
    "Tokenizer",
    "alpaca_example",
    "chat_example",
    "chatterbot_to_prompt_completion",
    "load_examples",
    "preference_example",
    "prompt_completion_example",
    "read_rows",
    "text_example",
    "tokenize_preference_rows",
    "tokenize_rows",
]
