"""Keyed dropout masks (``lorafleet.masks``): the definition, its statistics, and the batch's keys.

Oracles: ``reference_keep`` (the module's Semantics on Python integers, independent of the tensor code),
binomial bounds for the keep rate and for correlations between neighbouring mask elements.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from lorafleet.batch import FusedBatch, SequenceInfo
from lorafleet.data.packing import pack
from lorafleet.masks import (
    MaskSite,
    keep_mask,
    keep_threshold,
    reference_keep,
    sequence_key,
    token_rows,
)


def _mask(key: int, length: int, site: MaskSite, width: int, p: float) -> torch.Tensor:
    """[length, width] keep-mask of one sequence with ``key``, positions 0 .. length - 1."""
    rows = token_rows([key], [length], torch.arange(length))
    return keep_mask(rows, site, width, p)


def test_vectorized_masks_equal_the_definition():
    rng = random.Random(0)
    keys = [sequence_key(rng.getrandbits(70), rng.randrange(5), rng.randrange(10**6), r) for r in ("sft", "")]
    keys += [0, 2**64 - 1, sequence_key(-3, 0, 0, "chosen")]  # extremes of the key range, a negative seed
    lens = [5, 9, 1, 3, 4]
    pos = torch.cat([torch.arange(n) for n in lens])
    rows = token_rows(keys, lens, pos)
    assert rows.dtype == torch.int64 and int(rows.min()) >= 0 and int(rows.max()) < 2**32
    for site in (MaskSite(0, 0), MaskSite(31, 6), MaskSite(2**27, 15)):
        for p in (0.05, 0.5, 0.9):
            m = keep_mask(rows, site, 70, p)
            t = 0
            for key, n in zip(keys, lens):
                for position in range(n):
                    want = [reference_keep(key, position, site, i, p) for i in range(70)]
                    assert m[t].tolist() == want, (site, p, t)
                    t += 1
    assert keep_mask(rows, MaskSite(), 70, 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_masks_in_the_activations_dtype_are_the_bool_masks(dtype, p):
    """The fused operator asks for its activations' dtype (no bool -> float copy in ``x * mask``)."""
    rows = token_rows([sequence_key(7, 0, i) for i in range(3)], [40] * 3, torch.arange(40).repeat(3))
    want = keep_mask(rows, MaskSite(2, 1), 96, p)
    got = keep_mask(rows, MaskSite(2, 1), 96, p, dtype)
    assert want.dtype == torch.bool and got.dtype == dtype
    assert torch.equal(got, want.to(dtype)) and set(got.unique().tolist()) <= {0.0, 1.0}
    x = torch.randn(120, 96).to(dtype)
    assert torch.equal(x.mul(got), x.mul(want))  # bit for bit what the bool mask gave


def test_chunked_rows_equal_one_chunk(monkeypatch):
    """Rows are hashed in chunks; chunk boundaries change nothing (a wide and a narrow width)."""
    import lorafleet.masks as masks

    rows = token_rows([sequence_key(1, 0, i) for i in range(6)], [50] * 6, torch.arange(50).repeat(6))
    for width in (3, 5000):
        whole = keep_mask(rows, MaskSite(1, 2), width, 0.3)
        monkeypatch.setattr(masks, "_CHUNK_ELEMENTS", 7 * width)
        assert torch.equal(keep_mask(rows, MaskSite(1, 2), width, 0.3), whole)
        monkeypatch.undo()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate_is_binomial(p):
    m = _mask(sequence_key(5, 1, 2, "sft"), 512, MaskSite(4, 3), 2048, p)
    n = m.numel()
    q = 1.0 - p
    assert keep_threshold(p) / 2**32 == pytest.approx(q, abs=2**-32)
    sigma = math.sqrt(n * q * (1 - q))
    assert abs(int(m.sum()) - n * q) <= 5 * sigma  # 5 sigma: a false alarm once in ~3.5 million runs
    # Every row and every column keeps about its share too (no stuck features or tokens).
    rows, cols = m.float().mean(1), m.float().mean(0)
    assert (rows - q).abs().max() <= 6 * math.sqrt(q * (1 - q) / m.shape[1])
    assert (cols - q).abs().max() <= 6 * math.sqrt(q * (1 - q) / m.shape[0])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of equally shaped masks that differ in one coordinate by one step (p = 0.5)."""
    p, width, length = 0.5, 1024, 256
    k = sequence_key(11, 2, 40, "chosen")
    base = _mask(k, length + 1, MaskSite(6, 2), width + 1, p)
    a = base[:length, :width]
    out = {
        "feature i, i+1": (a, base[:length, 1 : width + 1]),
        "token t, t+1": (a, base[1 : length + 1, :width]),
        "layer l, l+1": (a, _mask(k, length, MaskSite(7, 2), width, p)),
        "module m, m+1": (a, _mask(k, length, MaskSite(6, 3), width, p)),
        "epoch e, e+1": (a, _mask(sequence_key(11, 3, 40, "chosen"), length, MaskSite(6, 2), width, p)),
        "index n, n+1": (a, _mask(sequence_key(11, 2, 41, "chosen"), length, MaskSite(6, 2), width, p)),
        "chosen, rejected": (a, _mask(sequence_key(11, 2, 40, "rejected"), length, MaskSite(6, 2), width, p)),
        "seed s, s+1": (a, _mask(sequence_key(12, 2, 40, "chosen"), length, MaskSite(6, 2), width, p)),
    }
    return out


@pytest.mark.parametrize("name", list(_pairs()))
def test_no_correlation_between_neighbours(name):
    """Pearson correlation of neighbouring masks within 5 / sqrt(N) of 0 (N = 262144 pairs: |r| < 0.01),
    and the parity of 2 x 2 neighbourhoods (what an xor-structured hash would bias) balanced."""
    a, b = _pairs()[name]
    n = a.numel()
    assert abs(_corr(a, b)) <= 5 / math.sqrt(n), name
    assert not torch.equal(a, b)
    # Four elements: (t, i), (t, i+1) in a and the same in b. With independent fair bits their parity is 1
    # half the time.
    quad = a[:, :-1] ^ a[:, 1:] ^ b[:, :-1] ^ b[:, 1:]
    m = quad.numel()
    assert abs(float(quad.double().mean()) - 0.5) <= 5 * 0.5 / math.sqrt(m), name


def test_masks_are_the_same_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here; the Triton interpreter tests (test_kernels.py) cover the kernels")
    rows = token_rows([sequence_key(3, 0, i) for i in range(4)], [64] * 4, torch.arange(64).repeat(4))
    cpu = keep_mask(rows, MaskSite(5, 1), 4096, 0.1)
    assert torch.equal(keep_mask(rows.cuda(), MaskSite(5, 1), 4096, 0.1).cpu(), cpu)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="epoch"):
        sequence_key(0, -1, 0, "sft")
    with pytest.raises(ValueError, match="index"):
        sequence_key(0, 0, 1.5, "sft")
    with pytest.raises(ValueError, match="seed"):
        sequence_key("0", 0, 0)
    with pytest.raises(ValueError, match="module"):
        MaskSite(0, 16)
    with pytest.raises(ValueError, match="layer"):
        MaskSite(-1, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        keep_threshold(1.0)
    with pytest.raises(ValueError, match="one key per sequence"):
        token_rows([1, 2], [3], torch.arange(3))


def test_batch_rows_come_from_sequence_keys():
    """A sequence's rows depend only on its own key and positions, not on where it sits in the batch."""
    k1, k2 = sequence_key(1, 0, 3, "sft"), sequence_key(1, 0, 4, "sft")
    one = pack([("t", "a", [(3, [5, 6, 7], [True] * 3, "sft", k1)])])
    two = pack(
        [
            ("u", "b", [(0, [9, 9], [True] * 2, "sft", k2)]),
            ("t", "a", [(3, [5, 6, 7], [True] * 3, "sft", k1)]),
        ]
    )
    assert one.sequences[0].key == k1 and two.sequences[1].key == k1
    assert torch.equal(two.dropout_rows[2:], one.dropout_rows)
    assert torch.equal(two.dropout_rows[:2], token_rows([k2], [2], torch.arange(2)))
    # No keys: sequence i of the batch gets sequence_key(0, 0, i, role), deterministic.
    plain = FusedBatch.from_sequences([[1, 2], [3, 4, 5]])
    want = token_rows([sequence_key(0, 0, 0), sequence_key(0, 0, 1)], [2, 3], plain.positions)
    assert torch.equal(plain.dropout_rows, want)
    bad = FusedBatch.from_sequences([[1, 2], [3]], sequences=[SequenceInfo()])
    with pytest.raises(ValueError, match="SequenceInfo"):
        _ = bad.dropout_rows
    assert torch.equal(one.to("cpu").dropout_rows, one.dropout_rows)
