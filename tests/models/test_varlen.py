"""Packed-sequence attention: the varlen contract equals the batch's padded CPU path; the kernel call is right.

Legend: T tokens, H query heads, K key/value heads, D head dim.

On a CPU no varlen kernel runs, so the call into one is checked against an emulation of FlashAttention's
documented semantics (query i sees key j iff i - left <= j <= i + right inside its sequence), installed in
place of ``flash_attn`` / ``torch``'s ``varlen_attn``: that pins the argument mapping (int32 offsets, the
window's off-by-one, GQA). The real kernels are compared on a GPU (``gpu`` marker, and benchmarks/gpu_check.py).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lorafleet.batch import FusedBatch
from lorafleet.models import varlen
from lorafleet.models.attention import AttentionSpec
from lorafleet.models.varlen import reference_varlen_attention, varlen_attention, varlen_backend

H, K, D = 6, 2, 16
LENGTHS = {"one": [13], "mixed": [5, 1, 17, 8], "many-short": [2, 3, 1, 2, 4, 3]}
WINDOWS = [None, 1, 3, 100]


def _qkv(lengths: list[int], dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(t, n, D, generator=g).to(dtype) for n in (H, K, K))
    batch = FusedBatch.from_sequences([[1] * n for n in lengths])
    return q, k, v, batch


def _emulated_flash(q, k, v, cu_q, cu_k, max_q, max_k, *, window_size, causal=False, enable_gqa=False, **kw):
    """FlashAttention's varlen semantics with a (left, right) window, as its documentation states them."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_k, cu_q)
    cu = cu_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    left, right = window_size
    if causal:
        right = 0
    out = torch.empty_like(q)
    groups = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1], cu[1:]):
        i = torch.arange(b - a)
        d = i[None, :] - i[:, None]  # j - i
        ok = d <= (right if right >= 0 else b - a)
        if left >= 0:
            ok &= -d <= left
        for h in range(q.shape[1]):
            s = (q[a:b, h] @ k[a:b, h // groups].t()) / D**0.5
            out[a:b, h] = torch.softmax(s.masked_fill(~ok, float("-inf")), -1) @ v[a:b, h // groups]
    return out


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("mix", list(LENGTHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_equals_the_padded_cpu_path(mix, window, dtype):
    q, k, v, batch = _qkv(LENGTHS[mix], dtype)
    got = reference_varlen_attention(q, k, v, batch.cu_seqlens, window)
    ref = batch.attention(q, k, v, 0, AttentionSpec(window))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.shape == (q.shape[0], H, D)
    assert torch.allclose(got.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("amx", [False, True])
def test_bfloat16_cpu_attention_on_either_kernel_equals_float32(amx, monkeypatch):
    """Long buckets run torch's bfloat16 kernel where the CPU has AMX, float32 otherwise: both within bf16."""
    from lorafleet.models import attention

    monkeypatch.setattr(attention, "_has_amx", lambda: amx)
    assert attention._cpu_runs_upcast(attention.AMX_BF16_MIN_QUERIES) is not amx
    q, k, v, batch = _qkv([300, 17, 260], torch.bfloat16)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    got = batch.attention(q, k, v, 0, AttentionSpec(None))
    ref = reference_varlen_attention(q.float(), k.float(), v.float(), batch.cu_seqlens, None)
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((got.float() * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()


def test_no_varlen_kernel_on_cpu():
    q, k, v, batch = _qkv([4, 5], torch.bfloat16)
    assert varlen_backend(q) is None
    assert varlen_attention(q, k, v, batch.cu_seqlens, 5) is None


@pytest.mark.parametrize("backend", ["flash_attn", "torch"])
def test_kernel_call_maps_window_gqa_and_offsets(backend, monkeypatch):
    monkeypatch.setattr(varlen, "varlen_backend", lambda q: backend)
    if backend == "flash_attn":
        fake = types.ModuleType("flash_attn")
        fake.flash_attn_varlen_func = _emulated_flash
        monkeypatch.setitem(sys.modules, "flash_attn", fake)
    else:
        import torch.nn.attention.varlen as torch_varlen

        monkeypatch.setattr(torch_varlen, "varlen_attn", _emulated_flash)
    q, k, v, batch = _qkv(LENGTHS["mixed"], seed=3)
    for window in WINDOWS:
        got = varlen_attention(q, k, v, batch.cu_seqlens, max(batch.seq_lens), window)
        ref = reference_varlen_attention(q, k, v, batch.cu_seqlens, window)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), window
    # The off-by-one matters: a window of (w, 0) would let each query see w + 1 keys.
    wrong = _emulated_flash(
        q, k, v, batch.cu_seqlens.int(), batch.cu_seqlens.int(), 17, 17, window_size=(3, 0)
    )
    assert not torch.allclose(wrong, reference_varlen_attention(q, k, v, batch.cu_seqlens, 3), atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 4])
def test_cuda_varlen_equals_the_padded_path(window):
    q, k, v, batch = _qkv(LENGTHS["mixed"], torch.bfloat16)
    q, k, v, batch = q.cuda(), k.cuda(), v.cuda(), batch.to("cuda")
    if varlen_backend(q) is None:
        pytest.skip("no varlen kernel on this machine")
    got = varlen_attention(q, k, v, batch.cu_seqlens, max(batch.seq_lens), window)
    ref = reference_varlen_attention(q.float(), k.float(), v.float(), batch.cu_seqlens, window)
    assert torch.allclose(got.float(), ref, rtol=2e-2, atol=2e-2)
