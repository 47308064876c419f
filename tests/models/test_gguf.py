"""GGUF files: tiny ones written here the way llama.cpp's converter writes them, and the real SmolLM2.

Oracles: the Hugging Face model the tiny file was converted from (F32 files must give the same logits), and
transformers' own GGUF loading of the same file (``from_pretrained(dir, gguf_file=...)``), for weights,
logits and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorafleet
from helpers import CHATML_TEMPLATE, TINY_FAMILIES, TINY_VOCAB, assert_same_tokenizer, make_tiny_model
from lorafleet.models import UnsupportedModelError, load_model, load_tokenizer
from lorafleet.models.generate import generate
from lorafleet.models.gguf import GGUFFile, read_gguf_config

_GGUF_ARCH = {"llama2": "llama", "llama3": "llama", "mistral": "llama", "smollm2": "llama", "qwen2": "qwen2",
              "qwen3": "qwen3"}  # fmt: skip


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf reorders q/k rows of llama-architecture models like this."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(writer, folder: Path) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for t in tj["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_gguf(hf_model, folder: Path, out: Path, family: str, qtype: str = "F32") -> Path:
    """Convert a tiny HF model to GGUF as llama.cpp does: gguf's own name map, q/k permutation for llama."""
    import gguf

    arch = _GGUF_ARCH[family]
    cfg = hf_model.config
    n_layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(f"tiny-{family}")
    writer.add_block_count(n_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if getattr(cfg, "sliding_window", None) and family == "mistral":
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_vocab_size(cfg.vocab_size)
    _add_tokenizer(writer, folder)

    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)
    qt = gguf.GGMLQuantizationType[qtype]
    for hf_name, t in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = hf_name.rsplit(".", 1)
        name = name_map.get_name(base) + "." + suffix
        w = t.detach().float().numpy()
        if arch == "llama" and ".attn_q." in name:
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        if w.ndim == 2 and qt != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(w, qt), raw_dtype=qt)
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    if family == "llama3":
        # llama.cpp stores LLaMA 3 rope scaling as one divisor per frequency; derive it from transformers.
        inv = hf_model.model.rotary_emb.inv_freq.float()
        base = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
        writer.add_tensor("rope_freqs.weight", (base / inv).numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (HF folder, HF model)."""
    out = {}
    for i, fam in enumerate(TINY_FAMILIES):
        path = tmp_path_factory.mktemp(f"gguf-{fam}")
        out[fam] = (path, make_tiny_model(fam, path, seed=10 + i))
    return out


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_f32_gguf_equals_hf_model(tiny, family, tmp_path):
    folder, hf = tiny[family]
    path = write_gguf(hf, folder, tmp_path / f"{family}.gguf", family)
    cfg = read_gguf_config(path)
    # llama.cpp writes Mistral as "llama"; the name tells it apart (as transformers does).
    assert cfg.architecture == hf.config.architectures[0]
    assert cfg.tie_word_embeddings == (family == "smollm2")
    model = load_model(path)
    ids = _ids(12, seed=1)  # longer than mistral's window of 4
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("family", ["llama2", "qwen2", "smollm2"])
def test_q8_gguf_equals_transformers_gguf_loading(tiny, family, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, hf = tiny[family]
    path = write_gguf(hf, folder, tmp_path / f"{family}-q8.gguf", family, qtype="Q8_0")
    ours = load_model(path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ref_params = ref.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, ref_params[name if name.startswith("lm_head") else f"model.{name}"]), name
    ids = _ids(9, seed=2)
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
        # Quantisation moved the weights, so the logits differ from the F32 model, but not by much.
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 0.1


def test_tiny_gguf_tokenizer_equals_transformers(tiny, tmp_path):
    from transformers import AutoTokenizer

    folder, hf = tiny["smollm2"]
    path = write_gguf(hf, folder, tmp_path / "tok.gguf", "smollm2")
    ours, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    _assert_same_tokenizer(ours, ref)


def _spm_gguf(path: Path) -> Path:
    """A tiny SentencePiece vocabulary (no merges stored: they come from the scores) as LLaMA 2 GGUFs have."""
    import gguf

    words = ["hello", "world", "the", "capital", "of", "france", "is", "paris", "Hello", "low", "or"]
    pieces: list[str] = []
    for w in ["\u2581" + w for w in words]:
        for ch in w:
            if ch not in pieces:
                pieces.append(ch)
    for w in ["\u2581" + w for w in words]:
        for k in range(2, len(w) + 1):
            if w[:k] not in pieces:
                pieces.append(w[:k])
    pieces += [p for p in ("ll", "llo", "or", "ld", "\u2581\u2581") if p not in pieces]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(64)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = _spm_gguf(tmp_path / "spm.gguf")
    ours, ref = load_tokenizer(path), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.encode("hello")[0] == 1  # SentencePiece vocabularies get BOS by default
    _assert_same_tokenizer(ours, ref, chat=False)


_TEXTS = [
    "hello world",
    " hello  world ",
    "Hello, World!\nthe capital of france is paris.",
    "What is the capital of France? 12345",
    "\u00dcn\u00efc\u00f6d\u00e9 caf\u00e9 \u65e5\u672c\u8a9e \U0001f642 \u2713",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>hello</s> world",
    "it's they'll I'M\t\ttabs\n\n\nlines",
    "",
]


def _assert_same_tokenizer(ours, ref, chat: bool = True) -> None:
    assert_same_tokenizer(ours, ref, _TEXTS)
    if chat:
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        long = [
            {"role": "system", "content": "Be brief."},
            *msgs,
            {"role": "assistant", "content": " Paris. "},
        ]
        for m in (msgs, long):
            for gen in (True, False):
                assert ours.apply_chat_template(m, add_generation_prompt=gen) == ref.apply_chat_template(
                    m, tokenize=False, add_generation_prompt=gen
                )


def test_unsupported_gguf_architecture_names_supported_ones(tmp_path):
    import gguf

    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match=r"'falcon'.*llama.*qwen2.*qwen3"):
        load_model(path)


def test_truncated_or_bogus_gguf_is_a_clear_error(tiny, tmp_path):
    folder, hf = tiny["llama2"]
    path = write_gguf(hf, folder, tmp_path / "full.gguf", "llama2")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_model(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_model(head)
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(bogus)


# ---- the real SmolLM2-135M-Instruct (Q4_1 weights, Q8_0 embedding) ----


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_model(smollm2_gguf), load_tokenizer(smollm2_gguf)


def test_smollm2_config_and_greedy_answer(smollm2, smollm2_gguf):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        30,
        576,
        9,
        3,
    )
    assert (
        cfg.vocab_size == 49152
        and cfg.tie_word_embeddings
        and model.lm_head.weight is model.embed_tokens.weight
    )
    assert tok.chat_template and tok.eos_token_id == 2
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    prompt = tok.encode(text, add_special_tokens=False)
    (out,) = generate(model, tok, [prompt], max_new_tokens=16)
    assert "Paris" in tok.decode(out)


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers(smollm2, smollm2_gguf):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    _assert_same_tokenizer(smollm2[1], ref)


@pytest.mark.slow
def test_smollm2_logits_close_to_transformers_gguf_loading(smollm2, smollm2_transformers):
    """transformers takes ~20 s to parse this file (once per session: ``smollm2_transformers``), hence ``slow``.

    Both sides dequantise with the gguf package, so the weights are bit-identical (checked) and the logits
    differ only by float32 rounding in a different order of operations: measured max abs difference 0.0 on
    CPU (same SDPA kernels). The tolerance 1e-3 (logits span about +-35) leaves room for other kernels.
    """
    model, tok = smollm2
    ref = smollm2_transformers
    ref_params = ref.state_dict()
    for name, p in model.named_parameters():
        assert torch.equal(p, ref_params[name if name.startswith("lm_head") else f"model.{name}"]), name
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-3, diff


def test_smollm2_layer_range_reads_only_its_tensors(smollm2_gguf, monkeypatch):
    read: list[str] = []
    original = GGUFFile.read

    def spy(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(GGUFFile, "read", spy)
    stage = lorafleet.load_model(smollm2_gguf, first_layer=10, last_layer=12)
    assert not stage.has_embed and not stage.has_head and list(stage.layers) == ["10", "11"]
    assert read and all(n.startswith(("blk.10.", "blk.11.")) for n in read), sorted(set(read))
    assert len(read) == 2 * 9  # 9 tensors per LLaMA block
    read.clear()
    last = lorafleet.load_model(smollm2_gguf, first_layer=29)
    # The last stage of a tied model reads the embedding matrix for its head, and the final norm.
    assert sorted(n for n in read if not n.startswith("blk.")) == ["output_norm.weight", "token_embd.weight"]
    assert all(n.startswith("blk.29.") for n in read if n.startswith("blk."))
    assert last.lm_head.weight.shape == (49152, 576)
