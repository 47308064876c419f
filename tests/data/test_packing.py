"""Packing a plan into one FusedBatch: shifted labels, contiguous adapter segments, boundaries, keys."""

from __future__ import annotations

import torch

from lorafleet.batch import IGNORE_INDEX
from lorafleet.data.packing import pack, shifted_labels


def test_shifted_labels_supervise_only_masked_targets():
    assert shifted_labels([5, 6, 7, 8], [False, False, True, True]) == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]
    assert shifted_labels([5], [True]) == [IGNORE_INDEX]


def test_groups_become_contiguous_segments_with_boundaries_and_keys():
    groups = [
        ("ta", "A", [(0, [1, 2, 3], [False, True, True], "sft", 11), (4, [4, 5], [False, True], "sft", 12)]),
        ("tb", "B", [(2, [6, 7, 8, 9], [False, False, True, True], "chosen", 13)]),
        ("tb", None, [(2, [6, 7], [False, True], "ref_chosen", 14)]),
    ]
    b = pack(groups)
    assert b.input_ids.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7]
    assert b.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 1]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 9, 11]
    assert [(s.adapter, s.start, s.end) for s in b.segments] == [("A", 0, 5), ("B", 5, 9), (None, 9, 11)]
    assert b.labels.tolist() == [2, 3, -100, 5, -100, -100, 8, 9, -100, 7, -100]
    assert [(s.task, s.example, s.role, s.key) for s in b.sequences] == [
        ("ta", 0, "sft", 11), ("ta", 4, "sft", 12), ("tb", 2, "chosen", 13), ("tb", 2, "ref_chosen", 14)
    ]  # fmt: skip
    rows = b.dropout_rows
    assert rows.shape == (11,) and rows.dtype == torch.int64
    # a token's dropout row depends on its sequence's key and position only, not on where it was packed
    alone = pack([("tb", "B", [(2, [6, 7, 8, 9], [False, False, True, True], "chosen", 13)])])
    assert alone.dropout_rows.tolist() == rows[5:9].tolist()
