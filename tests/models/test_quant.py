"""The quantized base (QLoRA): NF4 / int8 projections through bitsandbytes, adapters trained on top.

Legend: T rows, I input features, O output features, R rank.

On a CPU ``quantize_model`` refuses to run (the configuration offers quantize on CUDA only); the same
replacement runs here through ``_quantize_projections`` on bitsandbytes' CPU backend, which implements the
same quantizers. Oracles: bitsandbytes' own ``matmul_4bit`` and the int8 code * absmax / 127 formula for the
weights, and a *dense twin* (the same model with the dequantized weights as ordinary float tensors) run
through ``reference_fused_lora`` / plain autograd for everything trained on top.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("bitsandbytes")

from helpers.batches import keyed_batch
from lorafleet.batch import FusedBatch, Segment
from lorafleet.config import ConfigError, parse_config
from lorafleet.lora import AdapterSpec, FusedLoRALinear, add_adapter, reference_fused_lora
from lorafleet.models import Decoder, ModelConfig
from lorafleet.models.decoder import Linear
from lorafleet.models.quant import (
    QuantLinear,
    _quantize_projections,
    dense_weight,
    is_quantized,
    quantize_model,
)

I, O = 64, 48


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _linear(seed: int = 0, bias: bool = True, dtype=torch.float32) -> Linear:
    g = torch.Generator().manual_seed(seed)
    lin = Linear(I, O, bias, dtype, "cpu")
    lin.weight.data.copy_(torch.randn(O, I, generator=g) / math.sqrt(I))
    if bias:
        lin.bias.data.copy_(torch.randn(O, generator=g))
    return lin


def test_weights_dequantize_as_bitsandbytes_defines_them():
    import bitsandbytes as bnb

    lin = _linear()
    w = lin.weight.detach().clone()
    x = torch.randn(5, I)

    q4 = QuantLinear.from_linear(lin, "nf4")
    assert is_quantized(q4.weight) and q4.weight.dtype == torch.uint8
    assert q4.weight.numel() == O * I // 2  # two 4-bit codes per byte
    w4 = dense_weight(q4.weight, torch.float32)
    assert w4.shape == (O, I) and w4.dtype == torch.float32
    ref = bnb.matmul_4bit(x, q4.weight.t(), quant_state=q4.weight.quant_state)
    assert torch.allclose(F.linear(x, w4), ref, rtol=1e-5, atol=1e-5)
    assert 0 < _rel(w4, w) < 0.15  # NF4 is lossy, but close

    q8 = QuantLinear.from_linear(_linear(), "int8")
    assert q8.weight.dtype == torch.int8
    absmax = w.abs().amax(1, keepdim=True)
    assert torch.allclose(q8.weight.SCB[:, None], absmax.half().float(), rtol=1e-3)
    expected = q8.weight.data.float() * q8.weight.SCB.float()[:, None] / 127
    assert torch.allclose(dense_weight(q8.weight, torch.float32), expected, rtol=1e-6, atol=1e-7)
    assert 0 < _rel(expected, w) < 0.02
    plain = torch.randn(3, 3)
    assert dense_weight(plain, torch.float32) is plain  # dense weights pass through untouched


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quant_linear_keeps_only_the_quantized_weight_for_backward(mode):
    q = QuantLinear.from_linear(_linear(1), mode)
    w = dense_weight(q.weight, torch.float32)
    x = torch.randn(7, I, requires_grad=True)
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    assert torch.allclose(y, F.linear(x, w, q.bias), rtol=1e-5, atol=1e-6)
    assert all(not (dt.is_floating_point and shape == (O, I)) for dt, shape in saved), saved
    g = torch.randn(7, O)
    y.backward(g)
    assert torch.allclose(x.grad, g @ w, rtol=1e-5, atol=1e-6)


SPECS = [
    AdapterSpec("a0", rank=4, alpha=8.0),
    AdapterSpec("a1", rank=16, alpha=16.0, dropout=0.2),
    AdapterSpec("d2", kind="dora", rank=8, alpha=16.0),
]


def _fused_pair(mode: str, specs: list[AdapterSpec]) -> tuple[FusedLoRALinear, FusedLoRALinear]:
    """The fused layer on a quantized base, and its dense twin (dequantized weight, same adapters)."""
    g = torch.Generator().manual_seed(3)
    quant = FusedLoRALinear(QuantLinear.from_linear(_linear(2), mode))
    dense_base = _linear(2)
    dense_base.weight.data.copy_(dense_weight(quant.weight, torch.float32))
    dense = FusedLoRALinear(dense_base)
    for spec in specs:
        a, b = torch.randn(spec.rank, I, generator=g) / math.sqrt(I), torch.randn(O, spec.rank, generator=g)
        m = torch.rand(O, generator=g) + 0.5 if spec.kind == "dora" else None
        quant.add(spec, a, b, m)
        dense.add(spec, a.clone(), b.clone(), None if m is None else m.clone())
    return quant.train(), dense.train()


def _step(layer, x, batch, grad, reference: bool):
    x = x.clone().requires_grad_(True)
    y = reference_fused_lora(layer, x, batch) if reference else layer(x, batch)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_adapters_on_quantized_base_equal_reference_on_dense_twin(mode):
    """The PyTorch path (the Triton path on a quantized base: tests/test_kernels.py)."""
    specs = SPECS
    quant, dense = _fused_pair(mode, specs)
    quant = quant.with_backend("torch")
    segs = (Segment("a0", 0, 9), Segment(None, 9, 12), Segment("a1", 12, 30), Segment("d2", 30, 41))
    segs = tuple(s for s in segs if s.adapter is None or s.adapter in quant.specs)
    batch = keyed_batch(segs, 41, seed=5)  # a1's dropout: keyed masks
    x, grad = torch.randn(41, I), torch.randn(41, O)
    y, dx, grads = _step(quant, x, batch, grad, reference=False)
    y_ref, dx_ref, grads_ref = _step(dense, x, batch, grad, reference=True)
    assert _rel(y, y_ref) < 1e-5 and _rel(dx, dx_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * len(specs) + (len(specs) == 3)
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-5, n


def _tiny_cfg() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )


def test_decoder_on_nf4_base_trains_like_its_dense_twin():
    torch.manual_seed(0)
    model = Decoder(_tiny_cfg())
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    assert _quantize_projections(model, "nf4") == 14
    twin = Decoder(_tiny_cfg())
    twin.load_state_dict(
        {
            n: dense_weight(p, torch.float32) if n.endswith("weight") and is_quantized(p) else p
            for n, p in model.state_dict(keep_vars=True).items()
            if not n.endswith(("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state"))
            and "bitsandbytes" not in n
        },
        strict=False,
    )
    for name, p in twin.named_parameters():  # every dense weight of the twin is the dequantized one
        assert torch.equal(p, dense_weight(model.get_parameter(name), torch.float32)), name
    targets = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")
    for m in (model, twin):
        add_adapter(m, AdapterSpec("t0", rank=8, target_modules=targets), torch.Generator().manual_seed(1))
        add_adapter(
            m,
            AdapterSpec("t1", kind="dora", rank=4, target_modules=targets),
            torch.Generator().manual_seed(2),
        )
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    assert isinstance(model.get_submodule("layers.0.self_attn.q_proj").weight, torch.nn.Parameter)
    assert is_quantized(model.get_submodule("layers.0.self_attn.k_proj").weight)  # untargeted, still NF4
    batch = FusedBatch.from_sequences(
        [[1, 5, 9, 3, 7, 2], [4, 4, 8, 1], [6, 2, 2]], adapters=["t0", "t1", None]
    )
    labels = torch.randint(0, 64, (batch.num_tokens,), generator=torch.Generator().manual_seed(4))

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m.forward_packed(batch.input_ids, batch), labels)
        loss.backward()
        return loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    loss_q, grads_q = step(model)
    loss_d, grads_d = step(twin)
    assert math.isclose(loss_q, loss_d, rel_tol=1e-6)
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 2 * 5 * 2 + 2 * 5 * 3  # LoRA A,B; DoRA A,B,m
    for n in grads_q:
        assert _rel(grads_q[n], grads_d[n]) < 1e-5, n


def test_quantize_model_refuses_what_it_cannot_run(monkeypatch):
    model = Decoder(_tiny_cfg())
    with pytest.raises(ValueError, match="one of"):
        quantize_model(model, "int4")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            quantize_model(model, "nf4")
    add_adapter(model, AdapterSpec("t0", rank=2, target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="before adding adapters"):
        quantize_model(model, "nf4")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a)
    )
    with pytest.raises(ValueError, match="pip install bitsandbytes"):
        QuantLinear.from_linear(_linear(), "nf4")


def test_config_quantize_field(tmp_path):
    data = yaml.safe_load(
        """
        base_model: {path: model.gguf, quantize: nf4, device: cpu}
        datasets: [{name: d, path: d.jsonl, format: text}]
        adapters: [{name: a, rank: 4}]
        tasks: [{name: t, adapter: a, dataset: d}]
        """
    )
    with pytest.raises(ConfigError, match=r"base_model\.quantize: got 'nf4' with device: cpu"):
        parse_config(data)
    data["base_model"]["quantize"] = "int4"
    with pytest.raises(ConfigError, match="nf4, int8"):
        parse_config(data)
    data["base_model"].update(quantize="int8", device="cuda")
    assert parse_config(data).base_model.quantize == "int8"
    data["base_model"].pop("quantize")
    assert parse_config(data).base_model.quantize is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_engine_with_quantize_on_a_cpu_machine_says_why(tiny_llama_dir, tmp_path):
    from lorafleet.train.engine import Engine

    (tmp_path / "d.jsonl").write_text('{"text": "hello world"}\n')
    cfg = parse_config(
        {
            "base_model": {"path": str(tiny_llama_dir), "quantize": "nf4", "device": "auto"},
            "output_dir": str(tmp_path / "out"),
            "datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl"), "format": "text"}],
            "adapters": [{"name": "a", "rank": 4}],
            "tasks": [{"name": "t", "adapter": "a", "dataset": "d"}],
        }
    )
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Engine(cfg, tensorboard=False)
