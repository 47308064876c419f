"""LoRA on MoE experts: the fused (expert, adapter) operator against its loop and autograd, PEFT's format."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import lorafleet
from helpers import TINY_VOCAB, make_tiny_model
from lorafleet.batch import FusedBatch, Segment
from lorafleet.lora import AdapterSpec, add_adapter, load_peft, save_peft
from lorafleet.lora.adapters import TARGET_MODULES, adapter_parameters
from lorafleet.lora.experts import FusedLoRAExperts, reference_expert_lora
from lorafleet.models.families import ModelConfig
from lorafleet.models.moe import Experts, route

EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


@dataclass
class _Segments:
    segments: tuple


def _layer(dtype, num_experts=8, hidden=12, inter=10, seed=0):
    cfg = ModelConfig("MixtralForCausalLM", 50, hidden, inter, 1, 2, 2, 6, num_experts=num_experts,
                      num_experts_per_tok=2, moe_layers=[0])  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    base = Experts(cfg, dtype, "cpu")
    with torch.no_grad():
        base.gate_up_proj.copy_(torch.randn(base.gate_up_proj.shape, generator=g) * 0.3)
        base.down_proj.copy_(torch.randn(base.down_proj.shape, generator=g) * 0.3)
    layer = FusedLoRAExperts(base)
    adapters = {"a": (2, EXPERTS), "b": (4, EXPERTS[:1]), "c": (3, EXPERTS[1:])}
    for name, (rank, targets) in adapters.items():
        spec = AdapterSpec(name, rank=rank, alpha=2.0 * rank + 1, dropout=0.0, target_modules=targets)
        factors = {}
        for t in targets:
            i, o = layer.shapes(t.split(".")[1])
            er = num_experts * rank
            factors[t.split(".")[1]] = (
                (torch.randn(er, i, generator=g) * 0.3).to(dtype),
                (torch.randn(o, er, generator=g) * 0.3).to(dtype),
            )
        layer.add(spec, factors)
    return layer, cfg


def _case(dtype, t=29, seed=1, num_experts=8):
    layer, cfg = _layer(dtype, num_experts=num_experts)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, cfg.hidden_size, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    router = torch.randn(cfg.num_experts, cfg.hidden_size, generator=g, dtype=torch.float64).to(dtype)
    batch = _Segments((Segment("b", 0, 7), Segment(None, 7, 11), Segment("a", 11, 20), Segment("c", 20, t)))
    return layer, cfg, x, router, batch


def test_operator_equals_the_loop_with_gradients():
    layer, cfg, x, router, batch = _case(torch.float32)
    x_ref = x.detach().clone().requires_grad_()
    out = layer(x, route(x @ router.T, 2, True), batch)
    ref = reference_expert_lora(layer, x_ref, route(x_ref @ router.T, 2, True), batch)
    assert (out - ref).abs().max() <= 1e-5 and ref.abs().max() > 0.1
    gy = torch.randn_like(out)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * gy).sum(), [x, *params])
    refs = torch.autograd.grad((ref * gy).sum(), [x_ref, *params])
    for a, b in zip(grads, refs):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    # adapter-free rows equal the frozen experts alone
    plain = Experts.forward(layer, x.detach(), route(x.detach() @ router.T, 2, True))
    assert (out[7:11] - plain[7:11]).abs().max() <= 1e-5 and (out[:7] - plain[:7]).abs().max() > 1e-3


def test_operator_backward_passes_gradcheck():
    layer, cfg, x, router, batch = _case(torch.float64, t=23, num_experts=4)
    params = [p for p in layer.parameters() if p.requires_grad]

    def f(x, *ps):
        return layer(x, route(x @ router.T, 2, True), batch)

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


def test_spec_refuses_expert_dropout_and_dora():
    with pytest.raises(ValueError, match="without dropout"):
        AdapterSpec("x", dropout=0.1, target_modules=EXPERTS)
    with pytest.raises(ValueError, match="without dropout"):
        AdapterSpec("x", kind="dora", dropout=0.0, target_modules=EXPERTS[:1])


def test_config_and_adapter_target_lists_agree():
    from lorafleet import config

    assert config.TARGET_MODULES == TARGET_MODULES


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    out = {}
    for i, fam in enumerate(("mixtral", "qwen3_moe")):
        path = tmp_path_factory.mktemp(fam)
        make_tiny_model(fam, path, seed=40 + i)
        out[fam] = path
    return out


def _peft_adapter(model_dir, out, targets, params, rank, seed):
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, target_parameters=params)
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out)
    return pm.eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("params", [["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], ["down_proj"]])
def test_peft_expert_adapter_loads_and_saves_with_equal_logits(moe_dirs, tmp_path, family, params):
    import transformers as tf
    from peft import PeftModel

    pm = _peft_adapter(moe_dirs[family], tmp_path / "peft", ["q_proj", "o_proj"], params, 3, seed=5)
    model = lorafleet.load_model(moe_dirs[family])
    spec = load_peft(model, tmp_path / "peft", "x")
    assert set(spec.target_modules) >= {"q_proj", "experts.down_proj"}
    ids = torch.randint(0, TINY_VOCAB, (2, 11), generator=torch.Generator().manual_seed(2))
    batch = FusedBatch.from_sequences(ids.tolist(), adapters=["x", "x"])
    with torch.no_grad():
        ours = model.forward_packed(batch.input_ids, batch).view(2, 11, -1)
        ref = pm(ids).logits
        plain = tf.AutoModelForCausalLM.from_pretrained(moe_dirs[family])(ids).logits
    assert (ours - ref).abs().max() <= 1e-4 and (ref - plain).abs().max() > 1e-3
    save_peft(tmp_path / "ours", spec, adapter_parameters(model, "x"))
    back = PeftModel.from_pretrained(
        tf.AutoModelForCausalLM.from_pretrained(moe_dirs[family]), tmp_path / "ours"
    )
    with torch.no_grad():
        assert (back(ids).logits - ref).abs().max() <= 1e-5


def test_new_adapter_on_experts_starts_as_the_base(moe_dirs):
    model = lorafleet.load_model(moe_dirs["qwen3_moe"])
    ids = torch.randint(0, TINY_VOCAB, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(ids)
    add_adapter(model, AdapterSpec("n", rank=2, dropout=0.0, target_modules=("k_proj", *EXPERTS)))
    keys = adapter_parameters(model, "n")
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys
    assert not any("layers.1.mlp.experts" in k for k in keys)  # layer 1 is a dense MLP layer
    batch = FusedBatch.from_sequences(ids.tolist(), adapters=["n"])
    with torch.no_grad():
        after = model.forward_packed(batch.input_ids, batch)
    assert (after - before[0]).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="not projections of this model"):
        add_adapter(model, AdapterSpec("m", dropout=0.0, target_modules=("qkv_proj",)))


def test_benchmark_smoke_runs_and_checks_equal_outputs(capsys):
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    import moe_experts

    assert moe_experts.main(["--smoke", "--device", "cpu"]) == 0
    assert "| fused |" in capsys.readouterr().out
