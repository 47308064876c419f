"""Tokenizers from Hugging Face folders against ``transformers.AutoTokenizer`` on the same files."""

from __future__ import annotations

import json

import pytest

import lorafleet
from helpers import assert_same_tokenizer, make_tiny_tokenizer
from lorafleet.models.tokenizer import Tokenizer

_TEXTS = [
    "What is the capital of France? The capital of France is Paris.",
    " leading space and  double  spaces ",
    "Hello, World!\n\ndef add(a, b):\n    return a + b\n",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642 12345",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "it's they'll I'M",
    "",
]
_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  Hi  "},
        {"role": "assistant", "content": "Hello!", "tool_calls": None},
        {"role": "user", "content": "Bye"},
    ],
]


def _assert_same(ours: Tokenizer, ref) -> None:
    assert_same_tokenizer(ours, ref, _TEXTS)
    if ref.chat_template:
        for chat in _CHATS:
            for gen in (True, False):
                want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"add_bos_token": True},
        {"add_bos_token": True, "add_eos_token": True},
        {
            "bos_token": {
                "__type": "AddedToken",
                "content": "<|im_start|>",
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
                "special": True,
            },
            "add_eos_token": True,
        },
    ],
    ids=["plain", "bos", "bos-eos", "addedtoken-dict"],
)
def test_hf_folder_equals_transformers(tmp_path, overrides):
    from transformers import AutoTokenizer

    make_tiny_tokenizer(tmp_path, **overrides)
    ours = lorafleet.load_tokenizer(tmp_path)
    _assert_same(ours, AutoTokenizer.from_pretrained(tmp_path))
    # transformers 5 lets tokenizer.json's post-processor decide, whatever add_bos_token says; so do we.
    assert ours.bos_token_id not in ours.encode("hi")


def test_post_processor_of_tokenizer_json_is_kept(tmp_path):
    """Without add_bos_token in the config, the post-processor stored in tokenizer.json decides (LLaMA 3 style)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors
    from transformers import AutoTokenizer

    make_tiny_tokenizer(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    backend = Backend.from_file(str(tmp_path / "tokenizer.json"))
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A",
        pair="<|im_start|> $A <|im_start|> $B",
        special_tokens=[("<|im_start|>", bos)],
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    ours = lorafleet.load_tokenizer(tmp_path)
    assert ours.encode("hi")[0] == bos
    _assert_same(ours, AutoTokenizer.from_pretrained(tmp_path))


def test_wordlevel_folder_with_cleanup(tmp_path):
    """A non-BPE model: decode joins words with spaces, and clean_up_tokenization_spaces applies."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers
    from transformers import AutoTokenizer

    words = ["[UNK]", "[BOS]", "[EOS]", "hello", "world", ",", "!", "it", "'s", "n't", "."]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "[BOS]",
        "eos_token": "[EOS]",
        "unk_token": "[UNK]",
        "add_bos_token": True,
        "clean_up_tokenization_spaces": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = lorafleet.load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for text in ["hello , world !", "hello world.", "unknown words here", "it 's"]:
        ids = ref.encode(text)
        assert ours.encode(text) == ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ours.encode("hello , world !")) == "hello, world!"


def test_chat_template_file_features_and_errors(tmp_path):
    """chat_template.jinja wins over the config; namespace, loop controls, tojson, bos_token and raise_exception."""
    from transformers import AutoTokenizer

    make_tiny_tokenizer(tmp_path)
    template = (
        "{{ bos_token }}{% set ns = namespace(n=0) %}"
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% if m['role'] not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "{% set ns.n = ns.n + 1 %}"
        "{{ ns.n }}:{{ m['role'] }}={{ m['content'] | tojson }}\n"
        "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}"
        "{% if add_generation_prompt %}{% generation %}A:{% endgeneration %}{% endif %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)
    ours, ref = lorafleet.load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    chat = [
        {"role": "user", "content": 'caf\u00e9 <b> "x"'},
        {"role": "skip", "content": "-"},
        {"role": "assistant", "content": "ok"},
    ]
    for gen in (True, False):
        want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
    assert ours.apply_chat_template(chat).startswith("<|im_start|>1:user=")
    with pytest.raises(ValueError, match="unknown role robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        lorafleet.load_tokenizer(tmp_path).apply_chat_template(chat)


def test_missing_files_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        lorafleet.load_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        lorafleet.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        lorafleet.load_tokenizer(tmp_path)
