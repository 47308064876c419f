"""Data: rows from every file type with file:line, and the exact tokens and supervision of every format.

Oracles: hand-computed token lists for a word-level toy tokenizer; for real tokenizers (a Hugging Face
``transformers`` tokenizer with its own chat-template engine, and the bundled SmolLM2), decoding the
supervised tokens must give back exactly each assistant message (or completion) and its end marker.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import yaml

from helpers import make_tiny_tokenizer
from lorafleet.config import DatasetConfig
from lorafleet.data import (
    DataError,
    Example,
    PreferenceExample,
    Row,
    alpaca_example,
    chatterbot_to_prompt_completion,
    load_examples,
    read_rows,
    tokenize_preference_rows,
    tokenize_rows,
)

# ---------------------------------------------------------------------------------------------------------
# A toy tokenizer whose output is easy to write by hand: one id per word, newline or special token.

BOS, EOS, START, END, NL = 1, 2, 3, 4, 5
_SPECIAL = {"<s>": BOS, "</s>": EOS, "<|im_start|>": START, "<|im_end|>": END, "\n": NL}


def wid(word: str) -> int:
    return _SPECIAL.get(word) or 100 + zlib.crc32(word.encode()) % 100_000


class WordTokenizer:
    bos_token_id = BOS
    eos_token_id = EOS

    def __init__(self, add_bos: bool = True, default_system: str | None = "Default"):
        self.add_bos = add_bos
        self.default_system = default_system

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        pieces = re.findall(r"<\|im_start\|>|<\|im_end\|>|\n|[^\s]+?(?=<\|im_|\s|$)", text)
        return ([BOS] if add_special_tokens and self.add_bos else []) + [wid(p) for p in pieces]

    def apply_chat_template(self, messages, add_generation_prompt=False) -> str:
        # ChatML, with a default system prompt like SmolLM2's template.
        out = ""
        if self.default_system and messages and messages[0]["role"] != "system":
            out += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
        for m in messages:
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def ids(text: str) -> list[int]:
    return [wid(w) for w in text.split()]


def supervised(ex: Example) -> list[int]:
    return [t for t, m in zip(ex.tokens, ex.mask) if m]


def rows_of(*dicts, file="d.jsonl") -> list[Row]:
    return [Row(d, file, i + 1) for i, d in enumerate(dicts)]


# ---------------------------------------------------------------------------------------------------------
# Sources.


def test_jsonl_rows_remember_their_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "completion": "b"}\n\n   \n{"prompt": "c\u2028d", "completion": "e"}\n')
    rows = read_rows(p)
    assert [(r.line, r.data["prompt"]) for r in rows] == [(1, "a"), (4, "c\u2028d")]
    assert rows[1].where == f"{p}:4"
    assert len(read_rows(p, limit=1)) == 1


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ('{"prompt": "a"}\n{"prompt": "b",}\n', 2, "not valid JSON"),
        ('{"prompt": "a"}\n\n["a", "b"]\n', 3, "must be a JSON object, got list"),
        ('{"prompt": "a"}\n{"prompt": "b"\n', 2, "not valid JSON"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, text, line, needle):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_rows(p)
    assert str(e.value).startswith(f"{p}:{line}: ") and needle in str(e.value)
    assert (e.value.file, e.value.line) == (str(p), line)


def test_json_array_rows_start_lines(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"text": "a"},\n  {\n    "text": "b"\n  }, {"text": "c"}\n]\n')
    assert [(r.line, r.data["text"]) for r in read_rows(p)] == [(2, "a"), (3, "b"), (5, "c")]
    p.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: not valid JSON"):
        read_rows(p)
    p.write_text('{"text": "a"}')
    with pytest.raises(DataError, match="one array of objects"):
        read_rows(p)
    p.write_text('[{"text": "a"}, 3]')
    with pytest.raises(DataError, match=r":1: each row must be a JSON object, got int"):
        read_rows(p)


def test_csv_rows_with_multiline_fields(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('prompt,completion\nhi,"hello, you"\n"two\nlines",x\n\nlast,y\n')
    rows = read_rows(p)
    assert [(r.line, r.data) for r in rows] == [
        (2, {"prompt": "hi", "completion": "hello, you"}),
        (3, {"prompt": "two\nlines", "completion": "x"}),
        (6, {"prompt": "last", "completion": "y"}),
    ]
    p.write_text("prompt,completion\na,b\nc,d,e\n")
    with pytest.raises(DataError, match=r":3: 3 values for 2 columns"):
        read_rows(p)


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"]}), p)
    rows = read_rows(p)
    assert [(r.line, r.data) for r in rows] == [
        (1, {"prompt": "a", "completion": "x"}),
        (2, {"prompt": "b", "completion": "y"}),
        (3, {"prompt": "c", "completion": "z"}),
    ]
    assert len(read_rows(p, limit=2)) == 2


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs the pyarrow package.*pip install pyarrow"):
        read_rows(p)


@pytest.mark.parametrize(
    ("name", "text"), [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "prompt,completion\n")]
)
def test_empty_dataset_is_an_error(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: the dataset is empty"):
        read_rows(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(
        DataError, match=r"unsupported file type '.txt'; use one of .jsonl, .json, .csv, .parquet"
    ):
        read_rows(tmp_path / "d.txt")
    (tmp_path / "bad.jsonl").write_bytes(b'{"a": "x"}\n{"a": "\xff"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not UTF-8"):
        read_rows(tmp_path / "bad.jsonl")


# ---------------------------------------------------------------------------------------------------------
# Formats with the toy tokenizer: exact tokens and masks.


def test_prompt_completion_tokens_and_mask():
    tok = WordTokenizer()
    (ex,) = tokenize_rows(
        rows_of({"prompt": "what is up", "completion": "the sky"}), "prompt_completion", tok, 64
    )
    assert ex.tokens == tuple([BOS, *ids("what is up"), *ids("the sky"), EOS])
    assert ex.mask == (False, False, False, False, True, True, True)
    assert ex.source == "d.jsonl:1"
    # Cut from the right: the eos goes first.
    (cut,) = tokenize_rows(
        rows_of({"prompt": "what is up", "completion": "the sky"}), "prompt_completion", tok, 5
    )
    assert cut.tokens == ex.tokens[:5] and cut.mask == ex.mask[:5]


def test_first_token_is_never_supervised():
    tok = WordTokenizer(add_bos=False)
    (ex,) = tokenize_rows(rows_of({"prompt": "", "completion": "just this"}), "prompt_completion", tok, 64)
    assert ex.tokens == tuple([*ids("just this"), EOS]) and ex.mask == (False, True, True)
    (ex,) = tokenize_rows(rows_of({"text": "all of it"}), "text", tok, 64)
    assert ex.tokens == tuple([*ids("all of it"), EOS]) and ex.mask == (False, True, True, True)
    with pytest.raises(ValueError, match="mask\\[0\\]"):
        Example((1, 2), (True, True))


def test_text_supervises_everything():
    (ex,) = tokenize_rows(rows_of({"text": "one two three"}), "text", WordTokenizer(), 64)
    assert ex.tokens == tuple([BOS, *ids("one two three"), EOS])
    assert ex.mask == (False, True, True, True, True)


def test_alpaca_prompts_are_stanford_alpaca():
    # The two prompts of github.com/tatsu-lab/stanford_alpaca, written out independently here.
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum\n\n### Input:\n2 3"
        "\n\n### Response:\n"
    )
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nSay hi\n\n### Response:\n"
    )

    class Recorder(WordTokenizer):
        def __init__(self):
            super().__init__()
            self.seen = []

        def encode(self, text, add_special_tokens=True):
            self.seen.append((text, add_special_tokens))
            return super().encode(text, add_special_tokens)

    tok = Recorder()
    rows = rows_of(
        {"instruction": "Sum", "input": "2 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say hi", "output": "hi"},
    )
    a, b, c = tokenize_rows(rows, "alpaca", tok, 512)
    assert tok.seen[:2] == [(with_input, True), ("5", False)]
    assert tok.seen[2:4] == [(no_input, True), ("hi", False)]
    assert b == c and supervised(a) == [wid("5"), EOS] and supervised(b) == [wid("hi"), EOS]
    assert alpaca_example("Say hi", "", "hi", WordTokenizer(), 512) == b


def test_chat_supervises_exactly_the_assistant_turns():
    tok = WordTokenizer()
    messages = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello you"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "see ya"},
    ]
    (ex,) = tokenize_rows(rows_of({"messages": messages}), "chat", tok, 512)
    # Rendered by hand: the default system turn, then each turn as <|im_start|>role \n content <|im_end|> \n.
    expected = [START, wid("system"), NL, wid("Default"), END, NL]
    expected += [START, wid("user"), NL, *ids("hi there"), END, NL, START, wid("assistant"), NL]
    expected += [*ids("hello you"), END, NL]  # positions 16..19: supervised
    expected += [START, wid("user"), NL, wid("bye"), END, NL, START, wid("assistant"), NL]
    expected += [*ids("see ya"), END, NL]  # positions 29..32: supervised
    assert ex.tokens == tuple(expected)
    assert [i for i, m in enumerate(ex.mask) if m] == [16, 17, 18, 19, 29, 30, 31, 32]
    (cut,) = tokenize_rows(rows_of({"messages": messages}), "chat", tok, 18)
    assert cut.tokens == ex.tokens[:18] and cut.mask == ex.mask[:18]


def test_chat_with_system_prompt_and_consecutive_assistant_turns():
    tok = WordTokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a1"},
        {"role": "assistant", "content": "a2"},
    ]
    (ex,) = tokenize_rows(rows_of({"messages": messages}), "chat", tok, 512)
    # The second assistant turn's header is context too (it is what add_generation_prompt adds).
    assert supervised(ex) == [wid("a1"), END, NL, wid("a2"), END, NL]


def test_chat_refusals_name_the_row():
    tok = WordTokenizer()
    bad = [
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant message"),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            "starts with an assistant",
        ),
        ({"messages": []}, "non-empty list of messages"),
        ({"messages": "hi"}, "non-empty list of messages"),
        ({"messages": [{"role": "user"}]}, "messages[0].content is missing"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content is int 3"),
        ({"messages": ["hi"]}, "messages[0] is 'hi'"),
        ({"msgs": []}, "missing field 'messages'"),
    ]
    for data, needle in bad:
        with pytest.raises(DataError) as e:
            tokenize_rows(
                rows_of(
                    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                    data,
                ),
                "chat",
                tok,
                64,
            )
        assert str(e.value).startswith("d.jsonl:2: ") and needle in str(e.value), (needle, str(e.value))


def test_chat_template_that_rewrites_earlier_turns_is_refused():
    class Numbered(WordTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=False):
            return f"turns {len(messages)}\n" + super().apply_chat_template(messages, add_generation_prompt)

    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(
        DataError, match=r"d.jsonl:1: the chat template renders the first 1 messages as text that"
    ):
        tokenize_rows(rows_of({"messages": messages}), "chat", Numbered(), 64)


@pytest.mark.parametrize(
    ("fmt", "data", "needle"),
    [
        ("prompt_completion", {"prompt": "a"}, "missing field 'completion' (fields present: 'prompt')"),
        ("prompt_completion", {"prompt": "a", "completon": "b"}, "is 'completon' meant to be 'completion'?"),
        ("prompt_completion", {"prompt": 5, "completion": "b"}, "field 'prompt' is int 5, expected a string"),
        ("prompt_completion", {"prompt": None, "completion": "b"}, "missing field 'prompt'"),
        ("alpaca", {"instruction": "a"}, "missing field 'output'"),
        ("alpaca", {"instruction": "a", "input": ["x"], "output": "b"}, "field 'input' is list"),
        ("text", {"content": "a"}, "missing field 'text'"),
    ],
)
def test_missing_or_mistyped_fields(fmt, data, needle):
    good = {
        "prompt_completion": {"prompt": "a", "completion": "b"},
        "alpaca": {"instruction": "i", "output": "o"},
    }
    good["text"] = {"text": "t"}
    rows = rows_of(good[fmt], good[fmt], data, file="data/x.jsonl")
    with pytest.raises(DataError) as e:
        tokenize_rows(rows, fmt, WordTokenizer(), 64)
    assert str(e.value).startswith("data/x.jsonl:3: ") and needle in str(e.value), str(e.value)


def test_rows_without_supervised_tokens_are_skipped_with_a_warning():
    tok = WordTokenizer()
    rows = rows_of({"prompt": "a b c d e f", "completion": "x"}, {"prompt": "a", "completion": "x"})
    with pytest.warns(
        UserWarning, match=r"d.jsonl: 1 of 2 rows have no supervised token .* max_seq_len = 4 .*line 1"
    ):
        out = tokenize_rows(rows, "prompt_completion", tok, 4)
    assert [e.source for e in out] == ["d.jsonl:2"]
    with pytest.raises(DataError, match=r"d.jsonl:1: no row has a token left to learn from"):
        tokenize_rows(rows[:1], "prompt_completion", tok, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(tokenize_rows(rows, "prompt_completion", tok, 64)) == 2


def test_unknown_format_and_tokenizer_without_eos():
    with pytest.raises(ValueError, match="tokenize_preference_rows"):
        tokenize_rows(rows_of({"prompt": "a"}), "preference", WordTokenizer(), 64)
    tok = WordTokenizer()
    tok.eos_token_id = None
    with pytest.raises(DataError, match="no eos token"):
        tokenize_rows(rows_of({"text": "a"}), "text", tok, 64)


def test_preference_rows():
    tok = WordTokenizer()
    rows = rows_of({"prompt": "which one", "chosen": "this one", "rejected": "that other one"})
    (ex,) = tokenize_preference_rows(rows, tok, 64)
    assert ex == PreferenceExample(
        tuple([BOS, *ids("which one")]), tuple([*ids("this one"), EOS]), tuple([*ids("that other one"), EOS])
    )
    (cut,) = tokenize_preference_rows(rows, tok, 5)
    assert (cut.prompt, cut.chosen, cut.rejected) == (ex.prompt, ex.chosen[:2], ex.rejected[:2])
    chat = {
        "prompt": [{"role": "user", "content": "which one"}],
        "chosen": [{"role": "assistant", "content": "this"}],
        "rejected": [{"role": "assistant", "content": "that"}],
    }
    (ex,) = tokenize_preference_rows(rows_of(chat), tok, 64)
    assert ex.prompt[-3:] == (START, wid("assistant"), NL)
    assert (ex.chosen, ex.rejected) == ((wid("this"), END, NL), (wid("that"), END, NL))


def test_preference_missing_rejected_names_file_line_and_field():
    rows = rows_of(
        {"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}, file="prefs.jsonl"
    )
    with pytest.raises(
        DataError, match=r"^prefs.jsonl:2: missing field 'rejected' \(fields present: 'prompt', 'chosen'\)"
    ):
        tokenize_preference_rows(rows, WordTokenizer(), 64)
    bad = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "user", "content": "c"}],
        "rejected": [],
    }
    with pytest.raises(
        DataError, match=r"prefs.jsonl:1: chosen\[0\].role is 'user', but an answer holds assistant"
    ):
        tokenize_preference_rows(rows_of(bad, file="prefs.jsonl"), WordTokenizer(), 64)


def test_load_examples_uses_format_and_max_examples(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    ds = DatasetConfig(name="d", path=str(p), format="text", max_examples=3)
    out = load_examples(ds, WordTokenizer(), 64)
    assert [e.tokens for e in out] == [tuple([BOS, *ids(f"row {i}"), EOS]) for i in range(3)]


# ---------------------------------------------------------------------------------------------------------
# Real tokenizers: decoding what is supervised gives back the assistant turns / completions exactly.


class HFTokenizer:
    """transformers' tokenizer behind the formats' interface (its own jinja engine renders the template)."""

    def __init__(self, hf):
        self.hf = hf
        self.eos_token_id, self.bos_token_id = hf.eos_token_id, hf.bos_token_id

    def encode(self, text, add_special_tokens=True):
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=False):
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def spans(ex: Example) -> list[list[int]]:
    out, cur = [], []
    for t, m in zip(ex.tokens, ex.mask):
        if m:
            cur.append(t)
        elif cur:
            out, cur = [*out, cur], []
    return out + ([cur] if cur else [])


def test_chat_with_a_transformers_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    make_tiny_tokenizer(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [
        {"role": "system", "content": "You answer."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And the quick brown fox?"},
        {"role": "assistant", "content": " It jumps over the lazy dog, 12345 times! "},
    ]
    (ex,) = tokenize_rows(rows_of({"messages": messages}), "chat", HFTokenizer(hf), 512)
    full = hf.apply_chat_template(messages, tokenize=False)
    assert list(ex.tokens) == hf.encode(full, add_special_tokens=False)
    got = [hf.decode(s, skip_special_tokens=False) for s in spans(ex)]
    # The template trims contents; the end-of-turn marker and its newline belong to the turn.
    assert got == [m["content"].strip() + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    unsupervised = hf.decode([t for t, m in zip(ex.tokens, ex.mask) if not m], skip_special_tokens=False)
    assert unsupervised.count("<|im_start|>assistant\n") == 2 and "Paris" not in unsupervised


@pytest.mark.slow
def test_chatterbot_demo_data_with_the_bundled_smollm2(smollm2_gguf):
    from lorafleet.models.tokenizer import load_tokenizer

    pairs = chatterbot_to_prompt_completion("computers")
    tok = load_tokenizer(smollm2_gguf)
    rows = rows_of(*pairs[:20])
    for ex, pair in zip(tokenize_rows(rows, "prompt_completion", tok, 512), pairs):
        assert tok.decode(supervised(ex), skip_special_tokens=False) == pair["completion"] + "<|im_end|>"
        assert (
            tok.decode(ex.tokens, skip_special_tokens=False)
            == pair["prompt"] + pair["completion"] + "<|im_end|>"
        )
    chat = [
        {"role": "user", "content": pairs[0]["prompt"]},
        {"role": "assistant", "content": pairs[0]["completion"]},
    ]
    (ex,) = tokenize_rows(rows_of({"messages": chat}), "chat", tok, 512)
    assert (
        spans(ex)
        and tok.decode(spans(ex)[0], skip_special_tokens=False) == pairs[0]["completion"] + "<|im_end|>\n"
    )


def test_chatterbot_pairs_follow_the_corpus_yaml():
    import chatterbot_corpus

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    doc = yaml.load((folder / "conversations.yml").read_text(), Loader=yaml.BaseLoader)
    expected = [
        {"prompt": c[i].strip(), "completion": c[i + 1].strip()}
        for c in doc["conversations"]
        if isinstance(c, list)
        for i in range(len(c) - 1)
    ]
    pairs = chatterbot_to_prompt_completion("conversations")
    assert pairs == expected and len(pairs) > 50
    # Multi-turn: every statement answers the one before it.
    assert {"prompt": "I am doing well.", "completion": "That is good to hear"} in pairs
    assert all(isinstance(p["prompt"], str) and isinstance(p["completion"], str) for p in pairs)
    # trivia.yml holds one entry that is a bare string, not a conversation: it is skipped.
    trivia = chatterbot_to_prompt_completion("trivia")
    assert len(trivia) > 100 and all(p["completion"] for p in trivia)
    with pytest.raises(ValueError, match="no english category 'greeting'; did you mean 'greetings'?"):
        chatterbot_to_prompt_completion("greeting")
    with pytest.raises(ValueError, match="no language 'englsh'; did you mean 'english'?"):
        chatterbot_to_prompt_completion("greetings", language="englsh")


def test_unpaired_rows_and_their_errors():
    from lorafleet.data.unpaired import UnpairedExample, tokenize_unpaired_rows

    tok = WordTokenizer()
    (ex,) = tokenize_unpaired_rows(rows_of({"prompt": "a b", "completion": "c", "label": False}), tok, 64)
    assert isinstance(ex, UnpairedExample) and ex.label is False and ex.completion[-1] == tok.eos_token_id
    # the same tokens as a preference row's prompt and answer
    (pair,) = tokenize_preference_rows(rows_of({"prompt": "a b", "chosen": "c", "rejected": "d"}), tok, 64)
    assert (ex.prompt, ex.completion) == (pair.prompt, pair.chosen)
    for bad, needle in (
        (
            {"prompt": "a", "completion": "b", "label": "yes"},
            "field 'label' is str 'yes', expected true or false",
        ),
        ({"prompt": "a", "completion": "b"}, "missing field 'label'"),
        ({"prompt": "a", "label": True}, "missing field 'completion'"),
    ):
        with pytest.raises(DataError) as e:
            tokenize_unpaired_rows(
                rows_of({"prompt": "x", "completion": "y", "label": True}, bad, file="u.jsonl"), tok, 64
            )
        assert "u.jsonl:2" in str(e.value) and needle in str(e.value), str(e.value)
