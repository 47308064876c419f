"""Adapters on a decoder: specs, init, partial models, LoRA+ groups, and a training step against HF PEFT.

The oracle for the training step is K separate ``peft.get_peft_model`` models on the transformers LLaMA,
each fed only its own sequences; lorafleet runs all K adapters (plus base-only rows) in one fused batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tiny_model
from lorafleet import FusedBatch, load_model
from lorafleet.lora import (
    AdapterSpec,
    FusedLoRALinear,
    adapter_names,
    adapter_parameters,
    adapter_spec,
    add_adapter,
    lora_plus_param_groups,
    remove_adapter,
)
from lorafleet.models.decoder import Decoder
from lorafleet.models.loading import read_model_config

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model(
        "llama2", folder, hidden_size=32, intermediate_size=48, vocab_size=96, max_position_embeddings=64,
        attention_bias=True, mlp_bias=True,  # biases on q, k, v, o exercise DoRA's bias handling
    )  # fmt: skip
    return folder


def _peft_model(folder, spec: AdapterSpec):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        use_dora=spec.kind == "dora",
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(hf, cfg)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def test_spec_scaling_and_validation() -> None:
    assert AdapterSpec("a", rank=8, alpha=16).scaling == 2.0
    assert AdapterSpec("a", rank=16, alpha=8, use_rslora=True).scaling == 2.0
    spec = AdapterSpec("a", target_modules=["q_proj", "down_proj"])
    assert spec.target_modules == ("q_proj", "down_proj") and hash(spec)
    cases = [
        (dict(rank=0), "'x'.*rank"),
        (dict(rank=2.5), "'x'.*rank"),
        (dict(kind="ia3"), "'x'.*kind"),
        (dict(alpha=-1.0), "'x'.*alpha"),
        (dict(dropout=1.0), "'x'.*dropout"),
        (dict(target_modules=("c_attn",)), r"'x'.*target_modules.*unknown: \['c_attn'\]"),
        (dict(target_modules=()), "'x'.*target_modules"),
        (dict(target_modules=("q_proj", "q_proj")), "'x'.*target_modules"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            AdapterSpec("x", **kwargs)
    for bad in ("", "a.b", "has space", "train", "keys"):
        with pytest.raises(ValueError, match="name"):
            AdapterSpec(bad)


def test_add_remove_and_init(hf_folder) -> None:
    model = load_model(hf_folder)
    base_keys = set(model.state_dict())
    base_logits = model(torch.arange(12).view(2, 6))
    add_adapter(
        model,
        AdapterSpec("a", rank=4, target_modules=("q_proj", "down_proj")),
        torch.Generator().manual_seed(0),
    )
    add_adapter(
        model, AdapterSpec("b", kind="dora", rank=2, target_modules=ALL), torch.Generator().manual_seed(1)
    )
    assert adapter_names(model) == ["a", "b"]
    assert adapter_spec(model, "b").kind == "dora"
    layer = model.layers["1"]
    assert isinstance(layer.self_attn.q_proj, FusedLoRALinear)
    assert set(layer.self_attn.q_proj.specs) == {"a", "b"}  # swapped once, shared by both adapters
    assert set(layer.self_attn.k_proj.specs) == {"b"}
    assert not layer.self_attn.q_proj.training  # swapped into an eval-mode model: no dropout
    # The base parameters keep their names (a checkpoint still loads into the model).
    assert base_keys <= set(model.state_dict())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    params = adapter_parameters(model, "a")
    assert len(params) == 3 * 2 * 2 and all(
        p.requires_grad and p.dtype == torch.float32 for p in params.values()
    )
    for key, p in params.items():
        if key.endswith("lora_A.weight"):  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            bound = 1 / math.sqrt(p.shape[1])
            assert p.abs().max() <= bound and p.std() > 0.4 * bound
        else:
            assert torch.count_nonzero(p) == 0
    dora = adapter_parameters(model, "b")
    w = model.layers["2"].mlp.up_proj.weight
    m = dora["base_model.model.model.layers.2.mlp.up_proj.lora_magnitude_vector"]
    torch.testing.assert_close(m, torch.linalg.vector_norm(w, dim=1))
    # B = 0 at init: every adapter leaves the model's output unchanged.
    for name in ("a", "b"):
        batch = FusedBatch.from_sequences([list(range(6)), list(range(6, 12))], adapters=[name, name])
        torch.testing.assert_close(model.forward_packed(batch.input_ids, batch).view(2, 6, -1), base_logits)
    with pytest.raises(ValueError, match="'a'.*already used"):
        add_adapter(model, AdapterSpec("a"))
    remove_adapter(model, "a")
    assert adapter_names(model) == ["b"]
    assert not any(".a" in k or k.endswith("lora_A.a") for k in dict(model.named_parameters()))
    with pytest.raises(ValueError, match="'a' is not on this model"):
        remove_adapter(model, "a")
    with pytest.raises(ValueError, match="'zz' is not on this model"):
        adapter_parameters(model, "zz")


def test_dora_magnitude_init_matches_peft(hf_folder) -> None:
    spec = AdapterSpec("d", kind="dora", rank=4, alpha=8, target_modules=("v_proj", "gate_proj"))
    model = load_model(hf_folder)
    add_adapter(model, spec)
    ours = {k: v for k, v in adapter_parameters(model, "d").items() if "magnitude" in k}
    from peft import get_peft_model_state_dict

    theirs = {
        k: v for k, v in get_peft_model_state_dict(_peft_model(hf_folder, spec)).items() if "magnitude" in k
    }
    assert ours.keys() == theirs.keys() and len(ours) == 6
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k])


def test_partial_model_gets_the_full_models_weights(hf_folder) -> None:
    spec = AdapterSpec("p", rank=4, target_modules=("k_proj", "up_proj"))
    full = load_model(hf_folder)
    stage = load_model(hf_folder, first_layer=1, last_layer=3)
    add_adapter(full, spec, torch.Generator().manual_seed(5))
    add_adapter(stage, spec, torch.Generator().manual_seed(5))
    full_params, stage_params = adapter_parameters(full, "p"), adapter_parameters(stage, "p")
    assert sorted(stage_params) == sorted(k for k in full_params if ".layers.0." not in k)
    for k, p in stage_params.items():
        torch.testing.assert_close(p, full_params[k], rtol=0, atol=0)
    # A bare stage built without weights works too (no embedding, no head).
    bare = Decoder(read_model_config(hf_folder), 2, 3)
    add_adapter(bare, spec)
    assert all(".layers.2." in k for k in adapter_parameters(bare, "p"))


def test_lora_plus_groups_follow_peft() -> None:
    a, b, m = (torch.nn.Parameter(torch.zeros(s)) for s in [(2, 4), (4, 2), (4,)])
    params = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": m,
    }
    groups = lora_plus_param_groups(params, 1e-3, 8.0)
    assert [(g["lr"], [id(p) for p in g["params"]]) for g in groups] == [
        (1e-3, [id(a)]),
        (8e-3, [id(b), id(m)]),
    ]
    one = lora_plus_param_groups(params, 1e-3, None)
    assert len(one) == 1 and one[0]["lr"] == 1e-3 and len(one[0]["params"]) == 3
    torch.optim.AdamW(groups)  # a valid optimizer spec
    with pytest.raises(ValueError, match="ratio"):
        lora_plus_param_groups(params, 1e-3, 0.0)


def _next_token_loss(logits_TV: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return F.cross_entropy(logits_TV[:-1], torch.tensor(ids[1:]), reduction="sum")


def test_training_step_matches_separate_peft_models(hf_folder) -> None:
    """K adapters in one fused batch get the gradients K separate PEFT models get from their own rows."""
    from peft import set_peft_model_state_dict

    specs = [
        AdapterSpec("qa", rank=4, alpha=8, target_modules=("q_proj", "v_proj")),
        AdapterSpec("chat", rank=8, alpha=4, use_rslora=True, target_modules=ALL),
        AdapterSpec("code", kind="dora", rank=2, alpha=4, target_modules=("o_proj", "up_proj", "down_proj")),
    ]
    model = load_model(hf_folder).train()
    g = torch.Generator().manual_seed(0)
    for i, spec in enumerate(specs):
        add_adapter(model, spec, torch.Generator().manual_seed(i))
        with torch.no_grad():  # nonzero B (and an off-init magnitude) so every parameter gets a gradient
            for key, p in adapter_parameters(model, spec.name).items():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
                elif "magnitude" in key:
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))
    rows = {
        "qa": [[1, 5, 9, 3, 4, 8, 2], [7, 7, 1, 0, 3]],
        None: [[4, 4, 2, 9, 1, 6]],  # a base-only (reference) sequence in the middle of the batch
        "chat": [[3, 1, 4, 1, 5, 9, 2, 6, 5]],
        "code": [[2, 7, 1, 8], [2, 8, 1, 8, 2, 8, 4, 5], [9, 0, 9, 0, 9, 1]],
    }
    seqs = [s for rs in rows.values() for s in rs]
    owners = [name for name, rs in rows.items() for _ in rs]
    batch = FusedBatch.from_sequences(seqs, adapters=owners)
    logits = model.forward_packed(batch.input_ids, batch)
    cu = batch.cu_seqlens.tolist()
    loss = sum(
        _next_token_loss(logits[cu[i] : cu[i + 1]], s)
        for i, (s, o) in enumerate(zip(seqs, owners))
        if o is not None
    )
    loss.backward()

    for spec in specs:
        ours = adapter_parameters(model, spec.name)
        pm = _peft_model(hf_folder, spec).train()
        result = set_peft_model_state_dict(pm, {k: v.detach().clone() for k, v in ours.items()})
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k]
        theirs = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        assert len(theirs) == len(ours)
        peft_loss = sum(
            _next_token_loss(pm(input_ids=torch.tensor([s])).logits[0], s) for s in rows[spec.name]
        )
        peft_loss.backward()
        for key, p in ours.items():
            name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
                ".lora_B.weight", ".lora_B.default.weight"
            )
            name = name.replace(".lora_magnitude_vector", ".lora_magnitude_vector.default.weight")
            assert _rel(p.grad, theirs[name].grad) <= 2e-5, key
