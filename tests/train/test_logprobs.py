"""``target_logprobs`` (the LM head's log-probabilities without keeping the logits) against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.models.decoder import Linear
from lorafleet.train import logprobs


def _head(vocab: int, hidden: int, bias: bool, dtype: torch.dtype) -> Linear:
    g = torch.Generator().manual_seed(vocab + hidden)
    head = Linear(hidden, vocab, bias, dtype, "cpu")
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.2)
        if bias:
            head.bias.copy_(torch.randn(vocab, generator=g))
    return head


@pytest.mark.parametrize(
    ("dtype", "bias", "rows", "tol"),
    [
        (torch.float32, False, 1, 1e-5),  # one row per chunk
        (torch.float32, True, 7, 1e-5),  # chunks that do not divide M
        (torch.float32, False, 1000, 1e-5),  # one chunk
        (torch.bfloat16, False, 5, 2e-2),
    ],
)
def test_values_and_gradient_equal_autograd(monkeypatch, dtype, bias, rows, tol):
    monkeypatch.setattr(logprobs, "_rows_per_chunk", lambda vocab: rows)
    m, hidden, vocab = 37, 16, 101
    head = _head(vocab, hidden, bias, dtype)
    g = torch.Generator().manual_seed(1)
    h_ref = (torch.randn(m, hidden, generator=g) * 2).to(dtype).requires_grad_()
    h = h_ref.detach().clone().requires_grad_()
    targets = torch.randint(0, vocab, (m,), generator=g)
    weights = torch.randn(m, generator=g)  # an arbitrary incoming gradient, as DPO's loss gives

    ref = -F.cross_entropy(head(h_ref).float(), targets, reduction="none")
    out = logprobs.target_logprobs(head, h, targets)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    (ref * weights).sum().backward()
    (out * weights).sum().backward()
    torch.testing.assert_close(h.grad.float(), h_ref.grad.float(), atol=tol, rtol=tol)


def test_a_confident_head_keeps_its_small_gradient_exact():
    """Targets of probability near 1: the gradient W[target] - softmax W is a difference of nearly equal
    rows, and must still match autograd's (onehot - softmax) W."""
    head = _head(64, 64, False, torch.float32)
    with torch.no_grad():
        head.weight.mul_(0.05).add_(torch.eye(64))  # row i points at hidden feature i
    scale = torch.linspace(8, 24, 16)[:, None]  # target logits 8 to 24 above the rest
    h_ref = (torch.eye(64)[:16] * scale).requires_grad_()
    h = h_ref.detach().clone().requires_grad_()
    targets = torch.arange(16)
    ref = -F.cross_entropy(head(h_ref), targets, reduction="none")
    assert ref.exp().min() > 0.9 and ref.exp().max() == 1.0  # down to probability 1 in float32
    out = logprobs.target_logprobs(head, h, targets)
    ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-6, rtol=1e-4)


def test_without_grad_keeps_nothing_and_a_trained_head_uses_autograd():
    head = _head(50, 8, False, torch.float32)
    h = torch.randn(9, 8)
    targets = torch.randint(0, 50, (9,))
    with torch.no_grad():
        out = logprobs.target_logprobs(head, h, targets)
    assert out.grad_fn is None
    torch.testing.assert_close(out, -F.cross_entropy(head(h), targets, reduction="none"))
    # a head whose weight trains needs its own gradient: the plain path gives it
    head.weight.requires_grad_(True)
    logprobs.target_logprobs(head, h.requires_grad_(), targets).sum().backward()
    assert head.weight.grad is not None and h.grad is not None


def test_memory_kept_for_backward_is_the_hidden_size_not_the_vocabulary():
    """What the graph keeps: the [M, E] gradient, not [M, V] logits (saved-tensor hooks count the bytes)."""
    head = _head(4096, 32, False, torch.float32)
    h = torch.randn(64, 32, requires_grad=True)
    targets = torch.randint(0, 4096, (64,))
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs.target_logprobs(head, h, targets).sum()
    assert sum(saved) == 64 * 32 * 4
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (-F.cross_entropy(head(h), targets, reduction="none")).sum()
    assert sum(saved) >= 64 * 4096 * 4  # autograd keeps at least the logits
