"""The rotary embedding's custom autograd function: bit for bit the plain expression under autograd,
forward and backward, full and partial rotary, float32 and bfloat16, keeping no activation for the backward."""

from __future__ import annotations

import pytest
import torch

from lorafleet.models.decoder import _apply_rope


def _plain(x: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin on the first R dims."""
    r = cos_TR.shape[-1]
    cos, sin = cos_TR[:, None], sin_TR[:, None]
    rot, rest = x[..., :r], x[..., r:]
    a, b = rot.chunk(2, dim=-1)
    return torch.cat((rot * cos + torch.cat((-b, a), dim=-1) * sin, rest), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "dim", "rotary"), [(8, 64, 64), (3, 96, 32), (2, 128, 128)])
def test_rope_equals_the_plain_expression_bit_for_bit(dtype, heads, dim, rotary):
    g = torch.Generator().manual_seed(dim + rotary)
    x0 = torch.randn(57, heads, dim, generator=g).to(dtype)
    angle = torch.randn(57, rotary, generator=g)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    grad = torch.randn(57, heads, dim, generator=g).to(dtype)
    results = []
    for fn in (_plain, _apply_rope):
        x = x0.clone().requires_grad_()
        y = fn(x, cos, sin)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    (want_y, want_dx), (got_y, got_dx) = results
    assert got_y.dtype == dtype and torch.equal(got_y, want_y)
    assert torch.equal(got_dx, want_dx)


def test_rope_keeps_only_cos_and_sin():
    saved: list[torch.Size] = []

    def pack(t: torch.Tensor):
        saved.append(t.shape)
        return t

    x = torch.randn(10, 4, 16, requires_grad=True)
    cos, sin = torch.randn(10, 16), torch.randn(10, 16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _apply_rope(x, cos, sin)
    assert saved == [torch.Size([10, 1, 16])] * 2
