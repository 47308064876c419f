"""Build a ``FusedBatch`` from the dispatcher's plan: token ids, shifted labels, adapter segments."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batch import IGNORE_INDEX, FusedBatch, SequenceInfo

__all__ = ["pack", "shifted_labels"]


def shifted_labels(tokens: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """Label of position j = token j+1 when that token is supervised, else IGNORE_INDEX (last: IGNORE_INDEX)."""
    out = [tokens[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(tokens) - 1)]
    out.append(IGNORE_INDEX)
    return out


def pack(
    groups: Sequence[tuple[str | None, str | None, Sequence[tuple]]],
    device: torch.device | str = "cpu",
) -> FusedBatch:
    """Pack ``[(task, adapter, [(example id, tokens, mask[, role[, key]]), ...]), ...]``; one segment per group.

    A group's sequences stay adjacent and in order, so each adapter's tokens are contiguous. ``role`` (e.g.
    ``chosen``, see ``train/tasks.py``) and ``key`` (the sequence's dropout key, ``masks.sequence_key``)
    are recorded in the sequence's ``SequenceInfo``.
    """
    seqs: list[list[int]] = []
    labels: list[list[int]] = []
    adapters: list[str | None] = []
    infos: list[SequenceInfo] = []
    for task, adapter, examples in groups:
        for example_id, tokens, mask, *extra in examples:
            seqs.append(list(tokens))
            labels.append(shifted_labels(tokens, mask))
            adapters.append(adapter)
            role = extra[0] if extra else ""
            key = extra[1] if len(extra) > 1 else None
            infos.append(SequenceInfo(task=task, example=example_id, role=role, key=key))
    return FusedBatch.from_sequences(seqs, adapters=adapters, labels=labels, sequences=infos, device=device)
