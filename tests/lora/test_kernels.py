"""The Triton segmented LoRA kernels against their oracles, on CPU in Triton's interpreter.

Legend: T rows, I input features, O output features, R rank, K adapter slots.

Triton fixes its mode when it is first imported, so ``TRITON_INTERPRET=1`` must be in the environment by
then. Run alone (``pytest tests/test_kernels.py``) this module sets it before importing anything; inside a
larger session another module may have imported Triton already (``import peft`` does), and then
``test_in_subprocess`` runs this module again in a fresh interpreter-mode process instead. Oracles: the
plain-loop references of the segmented operators, and ``reference_fused_lora`` (plain autograd) for the
fused layer, forward and gradients, across adapter mixes (one adapter, all distinct, identical, skewed,
Zipf), ranks 1 to 80, float32 and bfloat16, with dropout, on a dense and on a quantized base. Dropout masks
are keyed (``lorafleet.masks``): every batch carries ``dropout_rows``, and the Triton path must apply the
masks the reference applies, whatever torch's RNG holds.
"""

from __future__ import annotations

import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import math
import subprocess
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("triton")

from helpers import REPO
from helpers.batches import keyed_batch
from lorafleet.batch import FusedBatch, Segment
from lorafleet.lora import AdapterSpec, FusedLoRALinear, LoraBackend, add_adapter, reference_fused_lora
from lorafleet.lora.kernels import (
    reference_segmented_expand,
    reference_segmented_outer,
    reference_segmented_shrink,
    segmented_expand,
    segmented_outer,
    segmented_shrink,
    triton_unsupported,
)
from lorafleet.lora.kernels._triton import Tiles, interpreting
from lorafleet.masks import MaskSite
from lorafleet.models import Decoder, ModelConfig
from lorafleet.models.decoder import Linear

IN_PROCESS = interpreting()


@pytest.fixture(autouse=True)
def _needs_interpreter(request):
    if not IN_PROCESS and request.node.originalname != "test_in_subprocess":
        pytest.skip("Triton was imported in compiled mode before this module; test_in_subprocess runs it")


@pytest.mark.slow
def test_in_subprocess():
    """This whole module in a fresh process with TRITON_INTERPRET=1 (when Triton came in compiled mode here)."""
    if IN_PROCESS:
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", __file__]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


I, O = 40, 36
# Norm-wise relative error ||got - ref|| / ||ref|| per dtype (bfloat16: the reference rounds more often).
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# Exercises the split reduction over I, several rank tiles and several chunks per slot.
SMALL_TILES = Tiles(block_m=16, block_k=16, block_n=16, block_r=16, split_k=3, chunk_rows=16)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def test_interpreter_is_on():
    assert interpreting()


# -- the segmented operators -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tiles", [None, SMALL_TILES], ids=["auto", "split"])
def test_segmented_ops_equal_references(dtype, tiles):
    g = torch.Generator().manual_seed(1)
    t, k, r = 90, 3, 20  # r > 16: two rank tiles with SMALL_TILES
    segs = [(60, 89, 0), (2, 30, 2), (30, 33, 1), (40, 41, 0)]  # unsorted, a 1-row segment, gaps
    x = torch.randn(t, I, generator=g).to(dtype)
    a = (torch.randn(k, r, I, generator=g) / math.sqrt(I)).to(dtype)
    b = torch.randn(k, O, r, generator=g).to(dtype)
    y = torch.randn(t, O, generator=g).to(dtype)
    scales = [0.5, 2.0, 1.25]
    scales_k = torch.tensor(scales)
    rows = torch.cat([torch.arange(s, e) for s, e, _ in segs])

    h = segmented_shrink(x, a, segs, tiles=tiles)
    h_ref = reference_segmented_shrink(x, a, segs)
    assert h.dtype == dtype
    assert _rel(h[rows], h_ref[rows]) < TOL[dtype]

    y_got = segmented_expand(y.clone(), h_ref, b, segs, scales_k, tiles=tiles)
    y_ref = reference_segmented_expand(y, h_ref, b, segs, scales)
    assert _rel(y_got, y_ref) < TOL[dtype]
    outside = torch.ones(t, dtype=torch.bool)
    outside[rows] = False
    assert torch.equal(y_got[outside], y[outside])  # rows of no segment are untouched
    bias = torch.randn(O, generator=g).to(dtype)
    y_new = segmented_expand(y.clone(), h_ref, b, segs, scales_k, accumulate=False, bias_O=bias, tiles=tiles)
    y_new_ref = reference_segmented_expand(y, h_ref, b, segs, scales, accumulate=False, bias_O=bias)
    assert _rel(y_new, y_new_ref) < TOL[dtype] and torch.equal(y_new[outside], y[outside])

    # Transposed views, as the backward passes them: u = g B (shrink with B^T), dx += u A (expand with A^T).
    u = segmented_shrink(y, b.transpose(1, 2), segs, tiles=tiles)
    u_ref = reference_segmented_shrink(y, b.transpose(1, 2), segs)
    assert _rel(u[rows], u_ref[rows]) < TOL[dtype]

    out = segmented_outer(h_ref, y, segs, k + 1, torch.tensor([*scales, 3.0]), tiles=tiles)
    out_ref = reference_segmented_outer(h_ref, y, segs, k + 1, [*scales, 3.0])
    assert out.dtype == torch.float32 and out.shape == (k + 1, r, O)
    assert _rel(out, out_ref) < 1e-5  # float32 accumulation of the same (rounded) inputs
    assert torch.equal(out[k], torch.zeros_like(out[k]))  # a slot with no segment


def test_segmented_outer_is_deterministic():
    g = torch.Generator().manual_seed(2)
    left, right = torch.randn(70, 16, generator=g), torch.randn(70, O, generator=g)
    segs, scales = [(0, 70, 0)], torch.tensor([1.0])
    first = segmented_outer(left, right, segs, 1, scales, tiles=SMALL_TILES)
    assert torch.equal(first, segmented_outer(left, right, segs, 1, scales, tiles=SMALL_TILES))


def test_bad_segments_are_refused():
    x, a = torch.randn(10, I), torch.randn(2, 4, I)
    with pytest.raises(ValueError, match="disjoint"):
        segmented_shrink(x, a, [(0, 6, 0), (5, 8, 1)])
    with pytest.raises(ValueError, match="slot"):
        segmented_shrink(x, a, [(0, 6, 2)])
    with pytest.raises(ValueError, match="outside"):
        segmented_shrink(x, a, [(4, 11, 0)])


# -- the fused layer on the Triton path ------------------------------------------------------------------------

RANKS = {"r1-16": [1, 4, 16, 8, 2, 4], "r8-80": [8, 80, 8, 32, 5, 8]}


def _segments(mix: str, names: list[str]) -> tuple[list[Segment], int]:
    """Segments for a mix, with rows of no adapter and of an adapter unknown to the layer in between."""
    if mix == "one":
        lengths = [(names[0], 37)]
    elif mix == "distinct":
        lengths = [(n, 4 + 2 * i) for i, n in enumerate(names)]
    elif mix == "identical":  # one adapter owning several segments
        lengths = [(names[0], 7), (None, 2), (names[0], 5), ("not_here", 3), (names[0], 9)]
    elif mix == "skewed":
        lengths = [(names[0], 3), (names[1], 70), (names[2], 2), (names[3], 1)]
    elif mix == "zipf":
        lengths = [(n, max(1, round(48 / (i + 1) ** 1.2))) for i, n in enumerate(names)]
    else:
        raise AssertionError(mix)
    if mix != "identical":
        lengths = [(None, 3), *lengths[:2], ("not_here", 4), *lengths[2:], (None, 2)]
    segs, cursor = [], 0
    for name, n in lengths:
        segs.append(Segment(name, cursor, cursor + n))
        cursor += n
    return segs, cursor


def _layer(ranks: list[int], dtype: torch.dtype, bias: bool, dropout: float = 0.0) -> FusedLoRALinear:
    g = torch.Generator().manual_seed(sum(ranks))
    base = Linear(I, O, bias, dtype, "cpu")
    base.weight.data.copy_(torch.randn(O, I, generator=g) / math.sqrt(I))
    if bias:
        base.bias.data.copy_(torch.randn(O, generator=g))
    layer = FusedLoRALinear(base, MaskSite(2, 5))
    for i, r in enumerate(ranks):
        spec = AdapterSpec(f"a{i}", rank=r, alpha=2.0 * r, dropout=dropout * (i % 2), use_rslora=i == 3)
        a = torch.randn(r, I, generator=g) / math.sqrt(I)
        b = torch.randn(O, r, generator=g)  # nonzero B, or A's gradient would be zero
        layer.add(spec, a, b)
    return layer.train()


def _run(layer: FusedLoRALinear, x: torch.Tensor, batch, grad: torch.Tensor, use_reference: bool, seed: int):
    x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    torch.manual_seed(seed)
    y = reference_fused_lora(layer, x, batch) if use_reference else layer(x, batch)
    y.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", ["one", "distinct", "identical", "skewed", "zipf"])
def test_triton_layer_equals_reference(mix, dtype):
    ranks = RANKS["r1-16"] if mix in ("one", "identical", "skewed") else RANKS["r8-80"]
    layer = _layer(ranks, dtype, bias=mix != "zipf", dropout=0.25 if mix in ("distinct", "skewed") else 0.0)
    layer = layer.with_backend("triton")
    segs, t = _segments(mix, [f"a{i}" for i in range(len(ranks))])
    batch = keyed_batch(segs, t)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(t, I, generator=g).to(dtype)
    grad = torch.randn(t, O, generator=g).to(dtype)

    y, dx, grads = _run(layer, x, batch, grad, use_reference=False, seed=3)
    y_ref, dx_ref, grads_ref = _run(layer, x, batch, grad, use_reference=True, seed=4)
    tol = TOL[dtype]
    assert y.dtype == dtype and _rel(y, y_ref) < tol
    assert _rel(dx, dx_ref) < tol
    if mix in ("distinct", "skewed"):  # with dropout: other keys give the reference other masks
        _, dx_other, _ = _run(layer, x, keyed_batch(segs, t, seed=2), grad, use_reference=True, seed=3)
        assert _rel(dx, dx_other) > 20 * tol
    used = {s.adapter for s in segs if s.adapter in layer.specs}
    assert {n.split(".")[-1] for n in grads} == used  # adapters without rows get no gradient
    assert grads.keys() == grads_ref.keys()
    for name, got in grads.items():
        assert got.dtype == torch.float32  # adapters train in float32 on a bfloat16 base
        assert _rel(got, grads_ref[name]) < tol, name


def test_triton_layer_without_grad_and_eval_mode():
    layer = _layer(RANKS["r1-16"], torch.float32, bias=True, dropout=0.3).eval().with_backend("triton")
    segs, t = _segments("distinct", [f"a{i}" for i in range(6)])
    batch = SimpleNamespace(segments=tuple(segs))  # eval mode needs no dropout keys
    x = torch.randn(t, I, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = layer(x, batch)
        ref = reference_fused_lora(layer, x, batch)  # eval mode: no dropout on either side
    assert _rel(got, ref) < TOL[torch.float32]


def test_x_gradient_only_when_adapters_are_frozen():
    layer = _layer([4, 8], torch.float32, bias=False).with_backend(LoraBackend.TRITON)
    for p in layer.parameters():
        p.requires_grad_(False)
    batch = SimpleNamespace(segments=(Segment("a0", 0, 10), Segment("a1", 12, 20)))
    x = torch.randn(20, I, requires_grad=True)
    layer(x, batch).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    reference_fused_lora(layer, x_ref, batch).sum().backward()
    assert _rel(x.grad, x_ref.grad) < TOL[torch.float32]


def test_backend_choice_and_errors(monkeypatch):
    layer = FusedLoRALinear(Linear(I, O, False, torch.float32, "cpu"), backend="triton")
    assert layer.backend is LoraBackend.TRITON
    layer.weight.data.normal_()
    layer.add(
        AdapterSpec("d0", kind="dora", rank=4), torch.randn(4, I), torch.randn(O, 4), torch.rand(O) + 0.5
    )
    batch = SimpleNamespace(segments=(Segment("d0", 0, 8),))
    x = torch.randn(8, I)
    with pytest.raises(ValueError, match="DoRA"):
        layer(x, batch)
    # auto on a CPU tensor: the PyTorch path, never the kernels.
    import lorafleet.lora.kernels as kernels

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran for a CPU tensor under backend auto")

    monkeypatch.setattr(kernels, "triton_fused_lora", boom)
    lora = _layer([4], torch.float32, bias=False)
    assert lora.backend is LoraBackend.AUTO and lora.backend == "auto"
    lora(x, SimpleNamespace(segments=(Segment("a0", 0, 8),)))
    assert triton_unsupported(x.double(), SimpleNamespace(slots=())) is not None
    # One typed choice, fixed when the layers are built; bad names are refused with the choices.
    with pytest.raises(ValueError, match="LoRA backend must be one of 'auto', 'torch', 'triton'"):
        FusedLoRALinear(Linear(I, O, False, torch.float32, "cpu"), backend="cuda")
    with pytest.raises(AttributeError):
        lora.backend = "triton"
    assert LoraBackend.parse(" Torch ") is LoraBackend.TORCH


def test_model_backend_is_chosen_by_add_adapter_once():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=24,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=8)  # fmt: skip
    model = Decoder(cfg)
    add_adapter(model, AdapterSpec("t0", rank=2, target_modules=("q_proj", "v_proj")), backend="torch")
    add_adapter(model, AdapterSpec("t1", rank=2, target_modules=("k_proj",)))  # None: the model's backend
    layers = [m for m in model.modules() if isinstance(m, FusedLoRALinear)]
    assert len(layers) == 6 and {m.backend for m in layers} == {LoraBackend.TORCH}
    with pytest.raises(ValueError, match="built with torch; a model's layers share one backend"):
        add_adapter(model, AdapterSpec("t2", rank=2, target_modules=("o_proj",)), backend=LoraBackend.TRITON)
    with pytest.raises(ValueError, match="LoRA backend must be one of"):
        add_adapter(Decoder(cfg), AdapterSpec("t3", rank=2), backend="gpu")
    fresh = Decoder(cfg)
    add_adapter(fresh, AdapterSpec("t4", rank=2))
    assert {m.backend for m in fresh.modules() if isinstance(m, FusedLoRALinear)} == {LoraBackend.AUTO}


@pytest.mark.slow
def test_decoder_training_step_triton_equals_torch():
    """Two layers, all seven projections adapted by three adapters: loss and every gradient agree."""
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    model = Decoder(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for i, r in enumerate([4, 16, 2]):
        add_adapter(model, AdapterSpec(f"t{i}", rank=r, alpha=8.0, dropout=0.1, target_modules=targets))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (9, 6, 11, 4)]
    batch = FusedBatch.from_sequences(seqs, adapters=["t0", "t1", "t1", None])
    targets_t = torch.randint(0, 64, (batch.num_tokens,), generator=g)

    def step(backend: str) -> tuple[float, dict[str, torch.Tensor]]:
        for parent in list(model.modules()):  # every fused layer's twin on ``backend``, same parameters
            for name, child in list(parent.named_children()):
                if isinstance(child, FusedLoRALinear):
                    setattr(parent, name, child.with_backend(backend))
        assert {m.backend for m in model.modules() if isinstance(m, FusedLoRALinear)} == {
            LoraBackend(backend)
        }
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        logits = model.forward_packed(batch.input_ids, batch)
        loss = torch.nn.functional.cross_entropy(logits, targets_t)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_t, grads_t = step("torch")
    loss_k, grads_k = step("triton")
    assert math.isclose(loss_t, loss_k, rel_tol=1e-5)
    assert grads_t.keys() == grads_k.keys() and len(grads_t) == 2 * 14 * 2  # t2 has no rows: no grads
    for n in grads_t:
        assert _rel(grads_k[n], grads_t[n]) < 1e-4, n


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_triton_layer_on_quantized_base_equals_reference_on_dense_twin(mode):
    pytest.importorskip("bitsandbytes")
    from lorafleet.models.quant import QuantLinear, dense_weight

    base = Linear(64, 48, True, torch.float32, "cpu")
    g = torch.Generator().manual_seed(9)
    base.weight.data.copy_(torch.randn(48, 64, generator=g) / 8)
    base.bias.data.copy_(torch.randn(48, generator=g))
    quant = FusedLoRALinear(QuantLinear.from_linear(base, mode))
    base.weight.data.copy_(dense_weight(quant.weight, torch.float32))
    dense = FusedLoRALinear(base)
    for i, r in enumerate([4, 16]):
        a, b = torch.randn(r, 64, generator=g) / 8, torch.randn(48, r, generator=g)
        spec = AdapterSpec(f"a{i}", rank=r, alpha=8.0, dropout=0.2 * i)
        quant.add(spec, a, b)
        dense.add(spec, a.clone(), b.clone())
    quant = quant.with_backend("triton")
    batch = keyed_batch((Segment("a0", 0, 9), Segment(None, 9, 12), Segment("a1", 12, 30)), 30)
    x, grad = torch.randn(30, 64, generator=g), torch.randn(30, 48, generator=g)
    y, dx, grads = _run(quant.train(), x, batch, grad, use_reference=False, seed=2)
    y_ref, dx_ref, grads_ref = _run(dense.train(), x, batch, grad, use_reference=True, seed=2)
    assert _rel(y, y_ref) < 1e-5 and _rel(dx, dx_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and len(grads) == 4
    for n in grads:
        assert _rel(grads[n], grads_ref[n]) < 1e-5, n
