"""``FusedBatch.attention`` over a packed batch against each sequence's attention computed alone.

Oracle: the attention of one sequence written out in float64 (scores, soft-cap, causal and window mask,
softmax, grouped-query heads), forward and the gradients of q, k and v under autograd. The batches mix
sequences long enough to attend in a call of their own (``ALONE_MIN_LEN``) with short ones that go through
the padded groups, and batches of only one kind.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.batch import ALONE_MIN_LEN, FusedBatch
from lorafleet.models.attention import AttentionSpec

H, K, D = 4, 2, 16
A = ALONE_MIN_LEN
LAYOUTS = {
    "mixed": [A + 7, 3, A, 40, 1, A - 1, 2 * A],
    "only long": [A, A + 30],
    "only short": [5, A - 1, 12, 1],
}


def _alone_oracle(q, k, v, spec: AttentionSpec):
    """One sequence: q [N, H, D], k and v [N, K, D], in float64."""
    n = q.shape[0]
    kk = k.repeat_interleave(H // K, dim=1)
    vv = v.repeat_interleave(H // K, dim=1)
    s = torch.einsum("nhd,mhd->hnm", q, kk) * (spec.scale if spec.scale is not None else D**-0.5)
    if spec.softcap is not None:
        s = spec.softcap * torch.tanh(s / spec.softcap)
    i = torch.arange(n)
    allowed = i[None, :] <= i[:, None]
    if spec.sliding_window is not None:
        allowed &= (i[:, None] - i[None, :]) < spec.sliding_window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "spec",
    [AttentionSpec(), AttentionSpec(sliding_window=9), AttentionSpec(scale=0.3, softcap=2.0)],
    ids=["causal", "window", "softcap"],
)
def test_packed_attention_equals_each_sequence_alone(layout, spec):
    lens = LAYOUTS[layout]
    t = sum(lens)
    g = torch.Generator().manual_seed(len(lens))
    q, k, v = (torch.randn(t, h, D, generator=g) for h in (H, K, K))
    grad_out = torch.randn(t, H, D, generator=g)
    batch = FusedBatch.from_sequences([[1] * n for n in lens])
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    out = batch.attention(*ours, layer_idx=0, spec=spec)
    out.backward(grad_out)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    cu = [0, *torch.tensor(lens).cumsum(0).tolist()]
    ref_out = torch.cat([_alone_oracle(*(x[a:b] for x in ref), spec) for a, b in zip(cu[:-1], cu[1:])])
    ref_out.backward(grad_out.double())
    assert out.shape == (t, H, D)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name, x, r in zip("qkv", ours, ref):
        torch.testing.assert_close(x.grad.double(), r.grad, rtol=1e-5, atol=1e-5, msg=f"d{name}")
