"""The decoder against transformers: every family, sharded folders, packed sequences, layer ranges, bfloat16."""

from __future__ import annotations

import pytest
import torch

import lorafleet
from helpers import TINY_FAMILIES, TINY_VOCAB, make_tiny_model
from lorafleet.batch import ALONE_MIN_LEN, FusedBatch
from lorafleet.models import load_model

ATOL_F32 = 1e-4


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """family -> (folder, transformers model); llama2 also saved as 12 shards under 'llama2-sharded'."""
    out = {}
    for fam in TINY_FAMILIES:
        path = tmp_path_factory.mktemp(fam)
        out[fam] = (path, make_tiny_model(fam, path, seed=TINY_FAMILIES.index(fam)))
    path = tmp_path_factory.mktemp("llama2-sharded")
    out["llama2-sharded"] = (path, make_tiny_model("llama2", path, seed=7, max_shard_size="60KB"))
    return out


def _ids(*shape, seed=0):
    return torch.randint(0, TINY_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", [*TINY_FAMILIES, "llama2-sharded"])
def test_logits_equal_transformers(tiny_models, family):
    path, hf = tiny_models[family]
    if family == "llama2-sharded":
        assert len(list(path.glob("*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    model = lorafleet.load_model(path)
    ids = _ids(3, 13, seed=1)
    with torch.no_grad():
        ours, ref = model(ids), hf(ids).logits
    assert ours.shape == (3, 13, TINY_VOCAB)
    assert (ours - ref).abs().max().item() <= ATOL_F32


@pytest.mark.parametrize("family", ["mistral", "qwen3", "smollm2"])
def test_packed_sequences_equal_each_alone(tiny_models, family):
    path, hf = tiny_models[family]
    model = load_model(path)
    seqs = [
        _ids(5, seed=2)[0:5].tolist(),
        _ids(ALONE_MIN_LEN + 3, seed=6).tolist(),  # long ones attend alone, the rest in padded groups
        _ids(17, seed=3).tolist(),
        _ids(1, seed=4).tolist(),
        _ids(ALONE_MIN_LEN, seed=7).tolist(),
        _ids(9, seed=5).tolist(),
    ]
    batch = FusedBatch.from_sequences(seqs)
    with torch.no_grad():
        packed = model.forward_packed(batch.input_ids, batch)
        cu = batch.cu_seqlens.tolist()
        for i, s in enumerate(seqs):
            alone = hf(torch.tensor([s])).logits[0]
            assert (packed[cu[i] : cu[i + 1]] - alone).abs().max().item() <= ATOL_F32


@pytest.mark.parametrize("family", ["llama3", "qwen2", "smollm2"])
def test_layer_range_chain_equals_full_model(tiny_models, family):
    path, _ = tiny_models[family]
    full = load_model(path)
    n = full.config.num_hidden_layers
    first, second, third = (
        load_model(path, last_layer=1),
        load_model(path, first_layer=1, last_layer=2),
        load_model(path, first_layer=2),
    )
    assert first.has_embed and not first.has_head and first.norm is None
    assert not second.has_embed and not second.has_head and list(second.layers) == ["1"]
    assert third.has_head and not third.has_embed and third.last_layer == n
    # A tied head on a stage without the embedding still gets the embedding matrix.
    assert torch.equal(third.lm_head.weight, full.lm_head.weight)
    batch = FusedBatch.from_sequences([_ids(7, seed=8).tolist(), _ids(4, seed=9).tolist()])
    with torch.no_grad():
        x = batch.input_ids
        for stage in (first, second, third):
            x = stage.forward_packed(x, batch)
        ref = full.forward_packed(batch.input_ids, batch)
    assert torch.equal(x, ref)
    with pytest.raises(ValueError, match="full model"):
        first(batch.input_ids[None])


@pytest.mark.parametrize("family", ["llama2", "qwen3"])
def test_bfloat16_runs_and_is_close(tiny_models, family):
    path, hf = tiny_models[family]
    model = load_model(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    ids = _ids(2, 11, seed=10)
    with torch.no_grad():
        ours = model(ids).float()
        ref = hf(ids).logits
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); through 3 layers and a 64-wide head the
    # error stays a few percent of the logits' range.
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= 0.05 * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8


def test_load_errors_are_value_errors(tmp_path, tiny_models):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    path, _ = tiny_models["smollm2"]
    with pytest.raises(ValueError, match="layer range"):
        load_model(path, first_layer=2, last_layer=2)
