"""Gemma 2/3, Phi-3/4 and the MoE families (Mixtral, Qwen3-MoE) against transformers (issue 16)."""

from __future__ import annotations

import pytest
import torch

import lorafleet
from helpers import TINY_NEW_FAMILIES, TINY_VOCAB, make_tiny_model
from lorafleet.batch import ALONE_MIN_LEN, FusedBatch
from lorafleet.models import ModelLoadError, read_model_config

ATOL_F32 = 1e-4


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    out = {}
    for i, fam in enumerate(TINY_NEW_FAMILIES):
        path = tmp_path_factory.mktemp(fam)
        out[fam] = (path, make_tiny_model(fam, path, seed=20 + i))
    return out


def _ids(*shape, seed=0):
    return torch.randint(0, TINY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_configs_describe_the_family_features(tiny_models):
    g3 = read_model_config(tiny_models["gemma3"][0])
    assert [g3.window_of(i) for i in range(3)] == [4, None, 4]
    assert g3.rope_of(0).theta == 10000.0 and g3.rope_of(1).theta == 1e6 and g3.rope_of(1).scaling
    assert g3.norm_offset == 1.0 and g3.embed_scale and g3.final_logit_softcapping == 3.0
    assert g3.attn_logit_softcapping is None  # transformers' Gemma 3 does not apply it
    assert read_model_config(tiny_models["gemma2"][0]).attn_logit_softcapping == 2.0
    phi = read_model_config(tiny_models["phi3"][0])
    assert phi.fused_qkv and phi.fused_gate_up and phi.rope_of(0).rotary_dim == 8
    q = read_model_config(tiny_models["qwen3_moe"][0])
    assert q.num_experts == 6 > q.num_experts_per_tok == 2 and q.moe_layers == [0, 2] and not q.norm_topk_prob


@pytest.mark.parametrize("family", TINY_NEW_FAMILIES)
@pytest.mark.parametrize("length", [5, 13])
def test_logits_equal_transformers(tiny_models, family, length):
    """13 tokens: past Gemma's window of 4 and Phi's original context of 8 (LongRoPE's long factors)."""
    path, hf = tiny_models[family]
    model = lorafleet.load_model(path)
    ids = _ids(2, length, seed=length)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == ref.shape == (2, length, TINY_VOCAB)
    assert (ours - ref).abs().max().item() <= ATOL_F32
    assert ref.std() > 0.05  # not a degenerate model


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3_moe"])
def test_packed_sequences_equal_each_alone(tiny_models, family):
    path, hf = tiny_models[family]
    model = lorafleet.load_model(path)
    seqs = [_ids(7, seed=2).tolist(), _ids(ALONE_MIN_LEN + 1, seed=5).tolist(), _ids(3, seed=3).tolist(),
            _ids(7, seed=4).tolist()]  # fmt: skip
    batch = FusedBatch.from_sequences(seqs)
    with torch.no_grad():
        packed = model.forward_packed(batch.input_ids, batch)
        cu = batch.cu_seqlens.tolist()
        for i, s in enumerate(seqs):
            alone = hf(torch.tensor([s])).logits[0]
            assert (packed[cu[i] : cu[i + 1]] - alone).abs().max().item() <= ATOL_F32


@pytest.mark.parametrize("family", ["gemma3", "mixtral"])
def test_layer_range_chain_equals_full_model(tiny_models, family):
    path, hf = tiny_models[family]
    first, second = lorafleet.load_model(path, last_layer=2), lorafleet.load_model(path, first_layer=2)
    ids = _ids(1, 9, seed=5)
    batch = FusedBatch.from_rectangular(ids)
    with torch.no_grad():
        out = second.forward_packed(first.forward_packed(ids.reshape(-1), batch), batch)
        assert (out - hf(ids).logits[0]).abs().max().item() <= ATOL_F32


def test_missing_expert_is_a_clear_error(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    path, _ = tiny_models["mixtral"]
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="weights missing"):
        lorafleet.load_model(broken)


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_target_logprobs_apply_the_heads_final_softcap(monkeypatch, rows):
    """The loss's log-probabilities go through the model's head, Gemma's final soft-cap included."""
    from lorafleet.models.decoder import LMHead
    from lorafleet.train import logprobs

    monkeypatch.setattr(logprobs, "_rows_per_chunk", lambda vocab: rows)
    g = torch.Generator().manual_seed(0)
    head = LMHead(16, 101, 1.5, torch.float32, "cpu")
    with torch.no_grad():
        head.weight.copy_(torch.randn(101, 16, generator=g))
    h_ref = torch.randn(37, 16, generator=g).requires_grad_()
    h = h_ref.detach().clone().requires_grad_()
    targets = torch.randint(0, 101, (37,), generator=g)
    w = torch.randn(37, generator=g)
    ref = -torch.nn.functional.cross_entropy(head(h_ref).float(), targets, reduction="none")
    ours = logprobs.target_logprobs(head, h, targets)
    (ref * w).sum().backward()
    (ours * w).sum().backward()
    assert (ours - ref).abs().max() <= 1e-5 and (h.grad - h_ref.grad).abs().max() <= 1e-5
    head.softcap = None  # the cap matters in this test
    assert (logprobs.target_logprobs(head, h, targets) - ref).abs().max() > 1e-2
