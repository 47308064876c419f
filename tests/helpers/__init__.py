"""Shared test helpers: tiny random Hugging Face models of every supported family, and a tiny tokenizer.

``make_tiny_model(family, path, **overrides)`` builds a random ``transformers`` model (every weight, bias and
norm scale random, so no parameter silently stays at its default), saves it with ``save_pretrained`` (pass
``max_shard_size="60KB"`` for several shards), writes a tiny byte-level BPE tokenizer with a ChatML chat
template next to it, and returns the model. ``tests/conftest.py`` turns them into session fixtures.

Families: llama2, llama3 (llama3 rope scaling), mistral (sliding window 4), qwen2 (q/k/v bias),
qwen3 (q/k norm, head_dim != hidden / heads), smollm2 (tied embeddings); and ``TINY_NEW_FAMILIES``
(gemma2, gemma3, phi3, mixtral, qwen3_moe; see ``_tiny_new_family``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = [
    "CHATML_TEMPLATE",
    "REPO",
    "SMOLLM2_GGUF",
    "TINY_FAMILIES",
    "TINY_NEW_FAMILIES",
    "TINY_VOCAB",
    "assert_same_tokenizer",
    "make_tiny_model",
    "make_tiny_tokenizer",
    "tiny_config",
]

REPO = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3", "smollm2")
# The families of issue 16 (Gemma 2/3, Phi-3/4, MoE); kept apart so older loops over TINY_FAMILIES stay fast.
TINY_NEW_FAMILIES = ("gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe")
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
    elif family in TINY_NEW_FAMILIES:
        cfg = _tiny_new_family(tf, family, overrides)
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES + TINY_NEW_FAMILIES}")
    return cfg


def _tiny_new_family(tf, family: str, overrides: dict):
    """gemma2: soft-capped attention and logits, local/global layers; gemma3: local/global layers with
    their own rope (linear scaling on global), q/k norms, query_pre_attn_scalar, final soft-cap; phi3:
    LongRoPE (original context 8, so 13-token inputs take the long factors) on half of each head; mixtral:
    4 experts, top 2; qwen3_moe: 6 experts, top 2, norm_topk_prob off, a dense layer among MoE ones."""
    gemma = dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                 hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)  # fmt: skip
    if family == "gemma2":
        kw = _common(**{**gemma, "attn_logit_softcapping": 2.0, **overrides})
        return tf.Gemma2Config(**kw)
    if family == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}}  # fmt: skip
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        kw = _common(**{**gemma, "rope_parameters": rope, "layer_types": layer_types, **overrides})
        return tf.Gemma3TextConfig(**kw)
    if family == "phi3":
        g = torch.Generator().manual_seed(3)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                "short_factor": (1 + torch.rand(4, generator=g)).tolist(),
                "long_factor": (2 + 4 * torch.rand(4, generator=g)).tolist()}  # fmt: skip
        kw = _common(**{"rope_parameters": rope, "original_max_position_embeddings": 8, **overrides})
        return tf.Phi3Config(**kw)
    if family == "mixtral":
        return tf.MixtralConfig(**_common(**{"num_local_experts": 4, "num_experts_per_tok": 2, **overrides}))
    moe = {"num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": False,
           "mlp_only_layers": [1], "head_dim": 16, "use_sliding_window": False}  # fmt: skip
    return tf.Qwen3MoeConfig(**_common(**{**moe, **overrides}))


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
