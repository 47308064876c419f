"""The fused multi-adapter linear against its oracles: the plain autograd loop, PEFT's LoRA layer, gradcheck.

Legend: T rows, I input features, O output features, R rank.

Dropout masks are keyed (``lorafleet.masks``): every batch here carries ``dropout_rows`` built from
sequence keys, and no test seeds torch's RNG to make two paths agree.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.batches import keyed_batch
from lorafleet.batch import Segment
from lorafleet.lora import AdapterSpec, FusedLoRALinear, reference_fused_lora
from lorafleet.masks import MaskSite, keep_mask
from lorafleet.models.decoder import Linear

I, O = 48, 40
# Per-dtype tolerance on the norm-wise relative error ||fused - ref|| / ||ref||.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}

# Adapter sets: several ranks, LoRA / rsLoRA / DoRA, with and without dropout.
ADAPTER_SETS = {
    "lora": [AdapterSpec(f"a{i}", rank=r, alpha=2.0 * r) for i, r in enumerate([1, 4, 16, 8, 2, 4])],
    "rslora+dropout": [
        AdapterSpec(f"a{i}", rank=r, alpha=8.0, use_rslora=True, dropout=p)
        for i, (r, p) in enumerate([(4, 0.1), (16, 0.0), (1, 0.3), (8, 0.05), (2, 0.0), (4, 0.2)])
    ],
    "dora+mixed": [
        AdapterSpec("a0", kind="dora", rank=4),
        AdapterSpec("a1", kind="dora", rank=8, dropout=0.2, use_rslora=True),
        AdapterSpec("a2", rank=16, dropout=0.1),
        AdapterSpec("a3", kind="dora", rank=1),
        AdapterSpec("a4", rank=2),
        AdapterSpec("a5", kind="dora", rank=4, dropout=0.1),
    ],
}


def _segments(mix: str, names: list[str]) -> tuple[list[Segment], int]:
    """Segments for a mix, with rows of no adapter and of an adapter unknown to the layer in between."""
    lengths: list[tuple[str | None, int]]
    if mix == "one":
        lengths = [(names[0], 37)]
    elif mix == "distinct":
        lengths = [(n, 5 + i) for i, n in enumerate(names)]
    elif mix == "identical":  # one adapter, several segments (rows of KV-cache generation are like this)
        lengths = [(names[0], 7), (None, 2), (names[0], 5), ("not_here", 3), (names[0], 9)]
    elif mix == "skewed":
        lengths = [(names[0], 3), (names[1], 90), (names[2], 2), (names[3], 1)]
    elif mix == "zipf":
        lengths = [(n, max(1, round(60 / (i + 1) ** 1.2))) for i, n in enumerate(names)]
    else:
        raise AssertionError(mix)
    if mix != "identical":  # base-only rows: no adapter, and an adapter that does not target this layer
        lengths = [(None, 3), *lengths[:2], ("not_here", 4), *lengths[2:], (None, 2)]
    segs, cursor = [], 0
    for name, n in lengths:
        segs.append(Segment(name, cursor, cursor + n))
        cursor += n
    if mix == "skewed":  # segments need not be listed in row order (masks are drawn in row order)
        segs.reverse()
    return segs, cursor


def _layer(specs: list[AdapterSpec], dtype: torch.dtype, bias: bool, seed: int = 0) -> FusedLoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = Linear(I, O, bias, dtype, "cpu")
    base.weight.data.copy_(torch.randn(O, I, generator=g) / math.sqrt(I))
    if bias:
        base.bias.data.copy_(torch.randn(O, generator=g))
    layer = FusedLoRALinear(base, MaskSite(3, 2))
    for spec in specs:
        a = torch.randn(spec.rank, I, generator=g) / math.sqrt(I)
        b = torch.randn(O, spec.rank, generator=g)  # nonzero B, or A's gradient would be zero
        m = torch.rand(O, generator=g) + 0.5 if spec.kind == "dora" else None
        layer.add(spec, a, b, m)
    return layer.train()


def _run(fn, layer: nn.Module, x_TI: torch.Tensor, batch, g_TO: torch.Tensor, rng: int = 1):
    """Output, input gradient and parameter gradients of one forward+backward (torch's RNG set to ``rng``:
    keyed masks must not depend on it)."""
    x = x_TI.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    torch.manual_seed(rng)
    y = fn(layer, x, batch)
    y.backward(g_TO)
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in layer.named_parameters()
        if p.requires_grad
    }
    return y.detach(), x.grad.clone(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("adapters", list(ADAPTER_SETS))
@pytest.mark.parametrize("mix", ["one", "distinct", "identical", "skewed", "zipf"])
def test_fused_matches_reference(mix: str, adapters: str, dtype: torch.dtype) -> None:
    specs = ADAPTER_SETS[adapters]
    layer = _layer(specs, dtype, bias=adapters != "lora")
    segs, t = _segments(mix, [s.name for s in specs])
    batch = keyed_batch(segs, t)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(t, I, generator=g).to(dtype)
    dy = torch.randn(t, O, generator=g).to(dtype)
    y1, dx1, g1 = _run(lambda m, x, b: m(x, b), layer, x, batch, dy, rng=1)
    y2, dx2, g2 = _run(reference_fused_lora, layer, x, batch, dy, rng=2)
    tol = TOL[dtype]
    assert _rel(y1, y2) <= tol
    assert _rel(dx1, dx2) <= tol
    used = {s.adapter for s in segs}
    assert set(g1) == set(g2)
    for name in g1:
        adapter = name.split(".")[-1]
        if adapter in used:
            assert _rel(g1[name], g2[name]) <= tol, name
        else:  # an adapter with no rows in the batch gets an exact zero / no gradient
            assert g1[name].abs().max() == 0 and g2[name].abs().max() == 0
    # Rows of no adapter (and of adapters not on this layer) are the base output exactly.
    base = F.linear(x, layer.weight, layer.bias)
    for s in segs:
        if s.adapter not in layer.specs:
            torch.testing.assert_close(y1[s.start : s.end], base[s.start : s.end], rtol=0, atol=0)


def test_dropout_masks_are_keyed() -> None:
    """Fused and reference apply the keyed mask of each row (whatever torch's RNG holds); other keys or
    another site give other outputs; the same keys give bit-identical ones; eval mode has no dropout."""
    layer = _layer([AdapterSpec("a", rank=4, dropout=0.5)], torch.float32, bias=False)
    batch = keyed_batch((Segment("a", 0, 64),), 64, seed=7)
    x = torch.randn(64, I)
    dy = torch.randn(64, O)
    y1, dx1, g1 = _run(lambda m, x, b: m(x, b), layer, x, batch, dy, rng=7)
    y2, dx2, g2 = _run(reference_fused_lora, layer, x, batch, dy, rng=8)
    y1b, dx1b, g1b = _run(lambda m, x, b: m(x, b), layer, x, batch, dy, rng=9)
    assert _rel(y1, y2) <= 1e-6 and _rel(dx1, dx2) <= 1e-6
    assert all(_rel(g1[n], g2[n]) <= 1e-6 for n in g1)
    assert torch.equal(y1, y1b) and torch.equal(dx1, dx1b) and all(torch.equal(g1[n], g1b[n]) for n in g1)
    # The mask is lorafleet.masks' one: the adapter sees x * keep / (1 - p), its input gradient is masked.
    keep = keep_mask(batch.dropout_rows, layer.mask_site, I, 0.5)
    a, b = layer.lora_A["a"].detach(), layer.lora_B["a"].detach()
    want = F.linear(x, layer.weight) + (x * keep * 2.0) @ a.t() @ b.t() * layer.specs["a"].scaling
    assert _rel(y1, want) <= 1e-6
    want_dx = dy @ layer.weight + (dy @ b * layer.specs["a"].scaling) @ a * keep * 2.0
    assert _rel(dx1, want_dx) <= 1e-6
    y3, _, _ = _run(lambda m, x, b: m(x, b), layer, x, keyed_batch(batch.segments, 64, seed=8), dy)
    assert _rel(y1, y3) > 1e-3
    layer.mask_site = MaskSite(3, 1)
    y4, _, _ = _run(lambda m, x, b: m(x, b), layer, x, batch, dy)
    assert _rel(y1, y4) > 1e-3
    layer.eval()  # no dropout outside training mode: no keys needed
    ya, _, _ = _run(lambda m, x, b: m(x, b), layer, x, SimpleNamespace(segments=batch.segments), dy)
    want_eval = F.linear(x, layer.weight) + x @ a.t() @ b.t() * layer.specs["a"].scaling
    assert _rel(ya, want_eval) <= 1e-6


def test_dropout_needs_keys() -> None:
    layer = _layer([AdapterSpec("a", rank=4, dropout=0.1)], torch.float32, bias=False)
    x = torch.randn(8, I)
    for fn in (lambda b: layer(x, b), lambda b: reference_fused_lora(layer, x, b)):
        with pytest.raises(ValueError, match="dropout keys"):
            fn(SimpleNamespace(segments=(Segment("a", 0, 8),)))
        with pytest.raises(ValueError, match="one entry per row"):
            fn(SimpleNamespace(segments=(Segment("a", 0, 8),), dropout_rows=torch.zeros(5, dtype=torch.long)))


class _KeyedDropout(nn.Module):
    """Stands in for PEFT's ``nn.Dropout``: the keyed mask of lorafleet.masks, so PEFT stays the oracle."""

    def __init__(self, batch, site: MaskSite, p: float) -> None:
        super().__init__()
        self.batch, self.site, self.p = batch, site, p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * keep_mask(self.batch.dropout_rows, self.site, x.shape[1], self.p) / (1 - self.p)


@pytest.mark.parametrize(
    "spec",
    [
        AdapterSpec("ad", rank=4, alpha=8.0),
        AdapterSpec("ad", rank=8, alpha=4.0, use_rslora=True, dropout=0.25),
        AdapterSpec("ad", kind="dora", rank=4, alpha=8.0),
        AdapterSpec("ad", kind="dora", rank=2, alpha=3.0, dropout=0.3, use_rslora=True),
    ],
    ids=["lora", "rslora+dropout", "dora", "dora+dropout"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_single_adapter_matches_peft_layer(spec: AdapterSpec, training: bool) -> None:
    """PEFT 0.21's own LoRA layer is an independent oracle for the semantics (bias included)."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    layer = _layer([], torch.float32, bias=True)
    lin = nn.Linear(I, O, bias=True)
    lin.weight.data.copy_(layer.weight)
    lin.bias.data.copy_(layer.bias)
    lin.requires_grad_(False)
    cfg = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        use_dora=spec.kind == "dora",
    )
    peft = PeftLinear(lin, "ad", config=cfg, r=spec.rank, lora_alpha=spec.alpha)
    peft.lora_B["ad"].weight.data.normal_()  # PEFT's init leaves B = 0
    a, b = peft.lora_A["ad"].weight.detach().clone(), peft.lora_B["ad"].weight.detach().clone()
    if spec.kind == "dora":
        # Recompute the magnitude for the new B as PEFT's init does, and check our DoRA init formula.
        peft.lora_magnitude_vector["ad"].update_layer(
            base_layer=lin, lora_A=a, lora_B=b, scaling=spec.scaling
        )
    m = peft.lora_magnitude_vector["ad"].weight.detach().clone() if spec.kind == "dora" else None
    layer.add(spec, a, b, m)
    layer.train(training)
    peft.train(training)
    x = torch.randn(30, I)
    dy = torch.randn(30, O)
    batch = keyed_batch((Segment("ad", 0, 30),), 30)
    if spec.dropout > 0:
        peft.lora_dropout["ad"] = _KeyedDropout(batch, layer.mask_site, spec.dropout).train(training)
    y0, dx0, g0 = _run(lambda m, x, b: m(x), peft, x, None, dy)
    for fn in (lambda m, x, b: m(x, b), reference_fused_lora):
        y1, dx1, g1 = _run(fn, layer, x, batch, dy)
        assert _rel(y1, y0) <= 1e-5 and _rel(dx1, dx0) <= 1e-5
        assert _rel(g1["lora_A.ad"], g0["lora_A.ad.weight"]) <= 1e-5
        assert _rel(g1["lora_B.ad"], g0["lora_B.ad.weight"]) <= 1e-5
        if spec.kind == "dora":
            assert _rel(g1["lora_magnitude_vector.ad"], g0["lora_magnitude_vector.ad.weight"]) <= 1e-5


def test_gradcheck_float64() -> None:
    """Finite differences in float64 (keyed dropout: the masks are fixed by the batch's keys).

    DoRA's A and B are left out: its norm is detached by definition, so their gradient is deliberately not
    the derivative of the output (the PEFT-layer test covers them); x and the magnitude are exact.
    """
    specs = [
        AdapterSpec("a", rank=2, dropout=0.3),
        AdapterSpec("b", kind="dora", rank=3),
        AdapterSpec("c", kind="dora", rank=2, dropout=0.2, use_rslora=True),
    ]
    layer = _layer(specs, torch.float32, bias=True).double()
    batch = keyed_batch(
        (Segment("a", 0, 4), Segment(None, 4, 5), Segment("b", 5, 8), Segment("c", 8, 11)), 11
    )
    dora = {"b", "c"}
    names = [
        n
        for n, p in layer.named_parameters()
        if p.requires_grad and not (n.split(".")[-1] in dora and n.startswith(("lora_A", "lora_B")))
    ]
    values = [layer.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    x = torch.randn(11, I, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x, batch))

    assert torch.autograd.gradcheck(f, (x, *values), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_no_grad_paths_match_and_skip_autograd() -> None:
    layer = _layer(ADAPTER_SETS["dora+mixed"], torch.float32, bias=True).eval()
    segs, t = _segments("zipf", [s.name for s in ADAPTER_SETS["dora+mixed"]])
    batch = SimpleNamespace(segments=tuple(segs))
    x = torch.randn(t, I)
    y = layer(x, batch)
    assert y.grad_fn is not None  # adapter parameters require grad
    with torch.no_grad():
        y_ng = layer(x, batch)
    with torch.inference_mode():
        y_inf = layer(x, batch)
    assert y_ng.grad_fn is None and y_inf.grad_fn is None
    torch.testing.assert_close(y_ng, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_inf, y.detach(), rtol=0, atol=0)
    assert _rel(y_ng, reference_fused_lora(layer, x, batch).detach()) <= 1e-6
    # No segments, or no batch: exactly the frozen linear.
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_per_row_adapters_like_generation() -> None:
    """Rows of a KV-cache step, each with its own adapter, non-adjacent rows sharing one."""
    specs = ADAPTER_SETS["dora+mixed"]
    layer = _layer(specs, torch.float32, bias=False).eval()
    order = ["a0", "a2", None, "a0", "a5", "a2", "a3", "a0"]
    batch = SimpleNamespace(segments=tuple(Segment(n, i, i + 1) for i, n in enumerate(order)))
    x = torch.randn(len(order), I)
    with torch.inference_mode():
        y = layer(x, batch)
        for i, n in enumerate(order):
            one = SimpleNamespace(segments=(Segment(n, 0, 1),))
            assert _rel(y[i : i + 1], reference_fused_lora(layer, x[i : i + 1], one)) <= 1e-6


def _saved_bytes(fn, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves during ``fn()``, other than those of ``exclude``."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind,p", [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("dora", 0.1)])
def test_saved_memory_per_token(kind: str, p: float, dtype: torch.dtype) -> None:
    """The saved-tensor table of the fused module's docstring, measured."""
    r, t = 4, 100
    e = torch.finfo(dtype).bits // 8
    layer = _layer([AdapterSpec("a", kind=kind, rank=r, dropout=p)], dtype, bias=True)
    x = torch.randn(t, I, dtype=dtype, requires_grad=True)
    batch = keyed_batch((Segment("a", 0, t),), t)
    skip = [x, *layer.parameters(), batch.dropout_rows]
    fused = _saved_bytes(lambda: layer(x, batch), skip)
    plain = _saved_bytes(lambda: reference_fused_lora(layer, x, batch), skip)
    norm = O * e if kind == "dora" else 0  # DoRA's per-call [O] norm
    assert fused == t * e * r + norm  # keyed dropout keeps no mask: the backward recomputes it
    assert plain - fused >= t * ((e + 1) * I * (p > 0) + 2 * e * O * (kind == "dora"))


def test_bad_inputs() -> None:
    layer = _layer([AdapterSpec("a", rank=2)], torch.float32, bias=False)
    x = torch.randn(10, I)
    with pytest.raises(ValueError, match="'a'.*overlaps"):
        layer(x, SimpleNamespace(segments=(Segment("a", 0, 6), Segment("a", 5, 10))))
    with pytest.raises(ValueError, match="'a'.*outside"):
        layer(x, SimpleNamespace(segments=(Segment("a", 0, 11),)))
    with pytest.raises(ValueError, match=r"rows \[T, I\]"):
        layer(x[None], SimpleNamespace(segments=(Segment("a", 0, 10),)))
    with pytest.raises(ValueError, match="already on this layer"):
        layer.add(AdapterSpec("a", rank=2), torch.zeros(2, I), torch.zeros(O, 2))
    with pytest.raises(ValueError, match="'b'.*lora_A must be"):
        layer.add(AdapterSpec("b", rank=3), torch.zeros(2, I), torch.zeros(O, 2))
    with pytest.raises(ValueError, match="'c'.*magnitude"):
        layer.add(AdapterSpec("c", kind="dora", rank=2), torch.zeros(2, I), torch.zeros(O, 2))
    layer.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        layer(x, SimpleNamespace(segments=(Segment("a", 0, 10),)))
