"""``Activation.gated``: the gated MLP's ``act(gate) * up``, forward and backward, bit for bit as autograd
computes it, keeping two [T, I] tensors for the backward where autograd keeps three."""

from __future__ import annotations

import pytest
import torch

from lorafleet.models.decoder import activation
from lorafleet.models.families import _ACTIVATIONS


def _saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", _ACTIVATIONS)
def test_gated_equals_autograd_bit_for_bit(name, dtype):
    act = activation(name)
    g = torch.Generator().manual_seed(0)
    gate0 = (3 * torch.randn(37, 96, generator=g)).to(dtype)
    up0 = torch.randn(37, 96, generator=g).to(dtype)
    grad = torch.randn(37, 96, generator=g).to(dtype)
    outs = []
    for fn in (lambda a, b: act(a) * b, act.gated):
        gate, up = gate0.clone().requires_grad_(), up0.clone().requires_grad_()
        y = fn(gate, up)
        y.backward(grad)
        outs.append((y.detach(), gate.grad, up.grad))
    for want, got in zip(outs[0], outs[1], strict=True):
        assert got.dtype == dtype
        assert torch.equal(want, got)


@pytest.mark.parametrize("name", _ACTIVATIONS)
def test_gated_keeps_less_for_the_backward(name):
    act = activation(name)
    gate = torch.randn(64, 128, requires_grad=True)
    up = torch.randn(64, 128, requires_grad=True)
    plain = _saved_bytes(lambda: act(gate) * up)
    fused = _saved_bytes(lambda: act.gated(gate, up))
    assert plain == 3 * gate.numel() * 4
    assert fused == 2 * gate.numel() * 4


def test_gated_grad_for_one_input_only_and_without_autograd():
    act = activation("silu")
    gate = torch.randn(8, 16, requires_grad=True)
    up = torch.randn(8, 16)
    act.gated(gate, up).sum().backward()
    want = torch.ops.aten.silu_backward(up, gate.detach())
    assert torch.equal(gate.grad, want)
    with torch.no_grad():
        y = act.gated(gate, up)
    assert not y.requires_grad and torch.equal(y, torch.nn.functional.silu(gate.detach()) * up)
