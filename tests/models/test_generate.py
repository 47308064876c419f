"""KV-cache generation against a plain loop (full model on the growing sequence) and transformers' generate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TINY_VOCAB, make_tiny_model
from lorafleet.batch import FusedBatch
from lorafleet.models import load_model, load_tokenizer
from lorafleet.models.generate import _sampling_probs, generate


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> (our model, transformers model, folder) for the families whose attention differs most."""
    out = {}
    for i, fam in enumerate(("mistral", "qwen3", "smollm2")):
        path = tmp_path_factory.mktemp(f"gen-{fam}")
        hf = make_tiny_model(fam, path, seed=20 + i)
        out[fam] = (load_model(path), hf, path)
    return out


def _prompts(seed: int = 0, lens=(3, 9, 1, 6)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in lens]


def _reference_greedy(model, prompt, max_new, adapter=None, stops=()):
    """The plain loop: run the whole growing sequence through the model, take the argmax of the last logits."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            batch = FusedBatch.from_sequences([seq], [adapter])
            tok = int(model.forward_packed(batch.input_ids, batch)[-1].argmax())
            if tok in stops:
                break
            out.append(tok)
            seq.append(tok)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["mistral", "qwen3", "smollm2"])
def test_greedy_equals_full_model_loop(tiny, family):
    model = tiny[family][0]
    prompts = _prompts(1)
    # 12 new tokens on top of prompts of up to 9: mistral's window of 4 is crossed in prefill and decode.
    got = generate(model, None, prompts, max_new_tokens=12, stop_ids=[])
    assert got == [_reference_greedy(model, p, 12) for p in prompts]


@pytest.mark.parametrize("family", ["mistral", "qwen3"])
def test_greedy_equals_transformers_generate(tiny, family):
    model, hf, _ = tiny[family]
    prompts = _prompts(2, lens=(5, 2, 8))
    got = generate(model, None, prompts, max_new_tokens=10, stop_ids=[])
    for p, ours in zip(prompts, got):
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False, eos_token_id=None,
            pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long),
        )  # fmt: skip
        assert ours == ref[0, len(p) :].tolist()


@pytest.mark.slow
def test_stop_tokens_end_each_row_on_its_own(tiny):
    model = tiny["smollm2"][0]
    prompts = _prompts(3)
    free = [_reference_greedy(model, p, 10) for p in prompts]
    stop = free[0][3]  # row 0 stops after 3 tokens; other rows stop wherever this token shows up, if at all
    got = generate(model, None, prompts, max_new_tokens=10, stop_ids=[stop])
    assert got == [_reference_greedy(model, p, 10, stops={stop}) for p in prompts]
    assert got[0] == free[0][:3]
    # Default stops: the model config's EOS id.
    model.config.eos_token_id, old = stop, model.config.eos_token_id
    try:
        assert generate(model, None, prompts, max_new_tokens=10) == got
    finally:
        model.config.eos_token_id = old


class _AdapterOffset(nn.Module):
    """A linear that adds a per-adapter offset to its segments' rows: stands in for the fused LoRA linear."""

    def __init__(self, base, offsets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base, self.offsets = base, offsets
        self.seen: set = set()

    def forward(self, x, batch=None):
        y = self.base(x, batch)
        assert sum(s.end - s.start for s in batch.segments) == x.shape[0]  # segments cover exactly the rows
        out = []
        for s in batch.segments:
            self.seen.add(s.adapter)
            part = y[s.start : s.end]
            out.append(part if s.adapter is None else part + self.offsets[s.adapter])
        return torch.cat(out)


@pytest.mark.slow
def test_rows_use_their_own_adapter_and_keep_their_order(tiny, tmp_path):
    model = load_model(tiny["qwen3"][2])
    g = torch.Generator().manual_seed(5)
    offsets_q = {
        a: 0.5 * torch.randn(model.config.num_attention_heads * model.config.head_dim, generator=g)
        for a in "ab"
    }
    offsets_h = {a: 2.0 * torch.randn(TINY_VOCAB, generator=g) for a in "ab"}
    layer = model.layers["1"].self_attn
    layer.q_proj = _AdapterOffset(layer.q_proj, offsets_q)
    model.lm_head = _AdapterOffset(model.lm_head, offsets_h)
    prompts = _prompts(4, lens=(4, 7, 2, 5, 3))
    adapters = ["a", None, "b", "a", None]  # interleaved: generate must group them and restore the order
    got = generate(model, None, prompts, max_new_tokens=8, adapters=adapters, stop_ids=[])
    want = [_reference_greedy(model, p, 8, adapter=a) for p, a in zip(prompts, adapters)]
    assert got == want
    assert layer.q_proj.seen == {"a", "b", None} and model.lm_head.seen == {"a", "b", None}
    # The adapters change the answers, so the test would notice rows getting the wrong adapter.
    base = generate(model, None, prompts, max_new_tokens=8, stop_ids=[])
    assert base[0] != got[0] or base[2] != got[2]


def test_sampling_probabilities_match_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in ((0.7, 0.9), (1.3, 0.5), (1.0, 1.0), (0.5, 0.05)):
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_p < 1.0:
            ref = TopPLogitsWarper(top_p)(None, ref)
        assert torch.allclose(_sampling_probs(logits, temperature, top_p), torch.softmax(ref, -1), atol=1e-6)


@pytest.mark.slow
def test_sampling_is_seeded_per_row(tiny):
    model = tiny["smollm2"][0]
    prompts = _prompts(6, lens=(3, 5))
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, stop_ids=[])
    a = generate(model, None, prompts, seed=1, **kw)
    assert a == generate(model, None, prompts, seed=1, **kw)
    assert a != generate(model, None, prompts, seed=2, **kw)
    # Row 0 samples with its own generator, so the other rows do not change its text.
    assert generate(model, None, prompts[:1], seed=1, **kw)[0] == a[0]
    # A vanishing top_p keeps only the most likely token: greedy.
    tiny_p = generate(model, None, prompts, seed=3, **{**kw, "top_p": 1e-6})
    assert tiny_p == generate(model, None, prompts, max_new_tokens=10, stop_ids=[])


def test_bfloat16_generation_runs(tiny):
    path = tiny["qwen3"][2]
    model = load_model(path, dtype=torch.bfloat16)
    tok = load_tokenizer(path)
    out = generate(model, tok, _prompts(7), max_new_tokens=5, stop_ids=[])
    assert [len(o) for o in out] == [5, 5, 5, 5] and all(0 <= t < TINY_VOCAB for o in out for t in o)


def test_bad_arguments_are_value_errors(tiny, tmp_path):
    model = tiny["smollm2"][0]
    with pytest.raises(ValueError, match="no empty prompt"):
        generate(model, None, [[1], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, None, [[TINY_VOCAB + 5]], 4)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, None, [[1]], 4, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="one per prompt"):
        generate(model, None, [[1], [2]], 4, adapters=["a"])
    stage = load_model(tiny["smollm2"][2], last_layer=2)
    with pytest.raises(ValueError, match="full model"):
        generate(stage, None, [[1]], 4)
    assert generate(model, None, [[1], [2, 3]], 0) == [[], []]
