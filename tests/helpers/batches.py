"""Hand-built batches for operator tests: adapter segments plus the keyed dropout rows training needs."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lorafleet.masks import sequence_key, token_rows

__all__ = ["keyed_batch"]


def keyed_batch(segments, t: int, seed: int = 1) -> SimpleNamespace:
    """A batch of ``segments`` over T rows that are the tokens of sequences of 8, each with its dropout key."""
    lens = [min(8, t - a) for a in range(0, t, 8)]
    keys = [sequence_key(seed, 0, i, "sft") for i in range(len(lens))]
    pos = torch.cat([torch.arange(n) for n in lens])
    return SimpleNamespace(segments=tuple(segments), dropout_rows=token_rows(keys, lens, pos))
