"""The one batch type that travels everywhere: engine, pipeline messages, decoder and fused operator.

Legend: T tokens in the batch (all sequences packed back to back, no padding), S sequences, H heads,
K key/value heads, D head dim, L the longest sequence.

A ``FusedBatch`` holds the real tokens of several sequences in one flat stream. Sequence boundaries are
``cu_seqlens`` (cumulative lengths, as in varlen attention kernels); adapter *segments* are contiguous token
ranges, each owned by one adapter (or by none: a reference pass through the frozen base). The linear layers
never see padding. Attention is the only place where sequences must not mix: ``attention`` gathers each
sequence's tokens into a padded [S, H, L, D] view, applies a causal mask that also hides the padding, runs one
``scaled_dot_product_attention`` call and scatters the real rows back, so no token attends across a
sequence boundary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

__all__ = ["FusedBatch", "Segment", "SequenceInfo"]

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of the batch belong to ``adapter`` (``None``: base model only)."""

    adapter: str | None
    start: int
    end: int


@dataclass(frozen=True)
class SequenceInfo:
    """Where one packed sequence came from: its task, the example's index and its role (e.g. chosen)."""

    task: str | None = None
    example: int = -1
    role: str = ""


@dataclass
class FusedBatch:
    """Packed tokens of several sequences and adapters; built once per micro-batch.

    Args:
        input_ids: [T] token ids.
        positions: [T] position of each token inside its own sequence.
        cu_seqlens: [S + 1] cumulative sequence lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        segments: adapter segments covering ranges of whole sequences, ordered by start.
        labels: [T] next-token target of each position (``IGNORE_INDEX`` where unsupervised), or None.
        sequences: one ``SequenceInfo`` per sequence (engine bookkeeping; the model ignores it).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    segments: tuple[Segment, ...] = ()
    labels: torch.Tensor | None = None
    sequences: tuple[SequenceInfo, ...] = field(default_factory=tuple)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @staticmethod
    def from_sequences(
        seqs: list[list[int]],
        adapters: list[str | None] | None = None,
        labels: list[list[int]] | None = None,
        sequences: list[SequenceInfo] | None = None,
        device: torch.device | str = "cpu",
    ) -> FusedBatch:
        """Pack token lists; ``adapters[i]`` owns sequence i. Sequences of one adapter must be adjacent.

        ``labels[i][j]`` is the target for position j of sequence i (already shifted), or IGNORE_INDEX.
        """
        if not seqs or any(len(s) == 0 for s in seqs):
            raise ValueError("FusedBatch needs at least one sequence and no empty sequence")
        lens = [len(s) for s in seqs]
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        segments: list[Segment] = []
        if adapters is not None:
            assert len(adapters) == len(seqs)
            for i, name in enumerate(adapters):
                if segments and segments[-1].adapter == name and segments[-1].end == cu[i]:
                    segments[-1] = Segment(name, segments[-1].start, cu[i + 1])
                else:
                    if name is not None and any(s.adapter == name for s in segments):
                        raise ValueError(f"sequences of adapter {name!r} are not adjacent in the batch")
                    segments.append(Segment(name, cu[i], cu[i + 1]))
        flat = [t for s in seqs for t in s]
        pos = [p for n in lens for p in range(n)]
        lab = None
        if labels is not None:
            lab = torch.tensor([t for row in labels for t in row], dtype=torch.long, device=device)
            assert lab.numel() == len(flat)
        return FusedBatch(
            input_ids=torch.tensor(flat, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            cu_seqlens=torch.tensor(cu, dtype=torch.long, device=device),
            segments=tuple(segments),
            labels=lab,
            sequences=tuple(sequences or ()),
        )

    @staticmethod
    def from_rectangular(input_ids: torch.Tensor) -> FusedBatch:
        """Every row of ``input_ids`` [B, L] is one full sequence of length L (no padding)."""
        b, n = input_ids.shape
        dev = input_ids.device
        return FusedBatch(
            input_ids=input_ids.reshape(-1),
            positions=torch.arange(n, device=dev).repeat(b),
            cu_seqlens=torch.arange(0, b * n + 1, n, device=dev),
        )

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_sequences(self) -> int:
        return int(self.cu_seqlens.numel()) - 1

    @cached_property
    def seq_lens(self) -> list[int]:
        cu = self.cu_seqlens.tolist()
        return [b - a for a, b in zip(cu[:-1], cu[1:])]

    def to(self, device: torch.device | str) -> FusedBatch:
        return FusedBatch(
            input_ids=self.input_ids.to(device),
            positions=self.positions.to(device),
            cu_seqlens=self.cu_seqlens.to(device),
            segments=self.segments,
            labels=None if self.labels is None else self.labels.to(device),
            sequences=self.sequences,
        )

    @cached_property
    def _padded_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gather index [S, L] into T+1 rows (T = a zero row), scatter index [T] into S*L, key valid [S, L])."""
        lens = self.seq_lens
        s, n, t = len(lens), max(lens), self.num_tokens
        dev = self.input_ids.device
        lens_t = torch.tensor(lens, device=dev)
        col = torch.arange(n, device=dev)
        valid = col[None, :] < lens_t[:, None]
        gather = torch.where(valid, self.cu_seqlens[:-1, None] + col[None, :], torch.full_like(valid, t, dtype=torch.long))
        scatter = (torch.arange(s, device=dev)[:, None] * n + col[None, :])[valid]
        return gather, scatter, valid

    def _mask(self, sliding_window: int | None) -> torch.Tensor:
        """[S, 1, L, L] boolean: query i sees key j iff j <= i, j is real and (i - j) < window."""
        if sliding_window in self._masks:
            return self._masks[sliding_window]
        _, _, valid = self._padded_layout
        n = valid.shape[1]
        i = torch.arange(n, device=valid.device)
        allowed = i[None, :] <= i[:, None]
        if sliding_window is not None:
            allowed = allowed & ((i[:, None] - i[None, :]) < sliding_window)
        mask = (allowed[None] & valid[:, None, :])[:, None]
        self._masks[sliding_window] = mask
        return mask

    def attention(
        self,
        q_THD: torch.Tensor,
        k_TKD: torch.Tensor,
        v_TKD: torch.Tensor,
        layer_idx: int,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Causal attention inside each sequence; returns [T, H, D]. ``layer_idx`` is for caches."""
        del layer_idx
        if q_THD.is_cuda:  # no padding on a GPU when a varlen kernel is there (models/varlen.py)
            from .models.varlen import varlen_attention

            o = varlen_attention(q_THD, k_TKD, v_TKD, self.cu_seqlens, max(self.seq_lens), sliding_window)
            if o is not None:
                return o
        t, h, d = q_THD.shape
        if self.num_sequences == 1 and sliding_window is None:
            o = F.scaled_dot_product_attention(
                q_THD.transpose(0, 1)[None],
                k_TKD.transpose(0, 1)[None],
                v_TKD.transpose(0, 1)[None],
                is_causal=True,
                enable_gqa=True,
            )
            return o[0].transpose(0, 1)
        gather, scatter, _ = self._padded_layout
        s, n = gather.shape

        def pad(x: torch.Tensor) -> torch.Tensor:  # [T, *, D] -> [S, *, L, D]
            x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
            return x[gather].transpose(1, 2)

        o = F.scaled_dot_product_attention(
            pad(q_THD), pad(k_TKD), pad(v_TKD), attn_mask=self._mask(sliding_window), enable_gqa=True
        )
        return o.transpose(1, 2).reshape(s * n, h, d)[scatter]
