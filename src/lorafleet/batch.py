"""The one batch type that travels everywhere: engine, pipeline messages, decoder and fused operator.

Legend: T tokens in the batch (all sequences packed back to back, no padding), S sequences, H heads,
K key/value heads, D head dim, L the longest sequence.

A ``FusedBatch`` holds the real tokens of several sequences in one flat stream. Sequence boundaries are
``cu_seqlens`` (cumulative lengths, as in varlen attention kernels); adapter *segments* are contiguous token
ranges, each owned by one adapter (or by none: a reference pass through the frozen base). The linear layers
never see padding. Attention is the only place where sequences must not mix: ``attention`` runs each long
sequence in a call of its own on views of q, k and v, groups the short ones by length, gathers each group's
tokens into a padded [s, H, n, D] view, applies a causal mask that also hides the padding, runs one
``scaled_dot_product_attention`` call per group and puts the real rows back in order, so no token attends
across a sequence boundary and short sequences are not padded to the longest.
(On CUDA a varlen kernel, when installed, needs no padding at all: ``models/varlen.py``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from .masks import sequence_key, token_rows
from .models.attention import AttentionSpec, attend, causal_window_mask

__all__ = ["ALONE_MIN_LEN", "FusedBatch", "Segment", "SequenceInfo"]

IGNORE_INDEX = -100

# From this length on a sequence attends in its own call, on views of the batch's q, k, v: gathering it into
# a padded group costs more (the copies in and out, the backward's index_add_ over all T rows, the padding)
# than the call. Forward + backward of [T ~ 4000, 8 heads, 64], float32, 2 threads: equal lengths of 16-96
# alike either way (a group has no padding then); lengths spread up to 256 or 512 (log-normal, median
# ~150): 105 -> 77 ms and 118 -> 92 ms; sequences of 10-40 tokens: unchanged.
ALONE_MIN_LEN = 96


@dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of the batch belong to ``adapter`` (``None``: base model only)."""

    adapter: str | None
    start: int
    end: int


@dataclass(frozen=True)
class SequenceInfo:
    """Where one packed sequence came from: its task, the example's index, its role (e.g. chosen) and key.

    ``key`` is the sequence's 64-bit adapter-dropout key (``lorafleet.masks.sequence_key``: the task's
    seed, the example's epoch and place in the task's data order, the role); None: the batch gives it one
    from its place in the batch (see ``FusedBatch.dropout_rows``).
    """

    task: str | None = None
    example: int = -1
    role: str = ""
    key: int | None = None


@dataclass
class FusedBatch:
    """Packed tokens of several sequences and adapters; built once per micro-batch.

    Args:
        input_ids: [T] token ids.
        positions: [T] position of each token inside its own sequence.
        cu_seqlens: [S + 1] cumulative sequence lengths, ``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == T``.
        segments: adapter segments covering ranges of whole sequences, ordered by start.
        labels: [T] next-token target of each position (``IGNORE_INDEX`` where unsupervised), or None.
        sequences: one ``SequenceInfo`` per sequence (engine bookkeeping, and the dropout keys).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    segments: tuple[Segment, ...] = ()
    labels: torch.Tensor | None = None
    sequences: tuple[SequenceInfo, ...] = field(default_factory=tuple)
    _masks: dict[tuple[str, int, int | None], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

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
    def dropout_rows(self) -> torch.Tensor:
        """[T] int64: each token's ``lorafleet.masks.token_rows`` value, what its dropout masks hash.

        From each sequence's ``SequenceInfo.key`` and each token's position; a sequence without a key (or
        a batch without ``sequences``) uses ``sequence_key(0, 0, i, role)`` with i its place in the batch,
        so masks are still deterministic, but then depend on the batch's layout: the engine always gives
        keys. Built once per batch and shared by every layer.
        """
        n = self.num_sequences
        if self.sequences and len(self.sequences) != n:
            raise ValueError(f"the batch has {n} sequences but {len(self.sequences)} SequenceInfo entries")
        infos = self.sequences or (SequenceInfo(),) * n
        keys = [s.key if s.key is not None else sequence_key(0, 0, i, s.role) for i, s in enumerate(infos)]
        return token_rows(keys, self.seq_lens, self.positions)

    @cached_property
    def _alone(self) -> list[int]:
        """The sequences (in batch order) long enough to attend in a call of their own (``ALONE_MIN_LEN``)."""
        return [i for i, n in enumerate(self.seq_lens) if n >= ALONE_MIN_LEN]

    @cached_property
    def _buckets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The shorter sequences grouped by length, each group one padded attention call.

        Per group: (gather index [s, n] into the batch's T rows, key valid [s, n]); a padding slot gathers
        its sequence's first token, any real row would do: no real query attends to it (it comes after the
        sequence's end, or the window mask drops it), its own output is dropped, so its gradient is exactly
        zero. Sequences are sorted by length and a
        group grows while its padded attention work (s * n^2) stays within twice the work of its real
        sequences (sum of l^2), so a few long sequences do not make every short one pay for their length.

        The layout moves rows with ``index_select`` only: its backward is one ``index_add_``, several times
        faster on CPU than the accumulating ``index_put_`` behind the backward of advanced indexing.
        """
        lens = self.seq_lens
        dev = self.input_ids.device
        groups: list[list[int]] = []
        real = 0
        for i in sorted(range(len(lens)), key=lens.__getitem__):
            n = lens[i]
            if n >= ALONE_MIN_LEN:
                break
            if groups and (len(groups[-1]) + 1) * n * n <= 2 * (real + n * n):
                groups[-1].append(i)
                real += n * n
            else:
                groups.append([i])
                real = n * n
        out = []
        for members in groups:
            idx = torch.tensor(members, device=dev)
            glens = torch.tensor([lens[i] for i in members], device=dev)
            col = torch.arange(int(glens.max()), device=dev)
            valid = col[None, :] < glens[:, None]
            pos = self.cu_seqlens[idx][:, None] + col[None, :]
            gather = torch.where(valid, pos, self.cu_seqlens[idx][:, None])
            out.append((gather, valid))
        return out

    @cached_property
    def _unbucket(self) -> torch.Tensor:
        """[T]: for each token of the batch, its row in the concatenation of the lone sequences' outputs
        (in batch order) and the groups' padded [s * n] outputs."""
        cu, dev = self.cu_seqlens.tolist(), self.cu_seqlens.device
        rows = [torch.arange(cu[i], cu[i + 1], device=dev) for i in self._alone]
        real = [torch.ones(len(r), dtype=torch.bool, device=dev) for r in rows]
        rows += [gather.flatten() for gather, _ in self._buckets]
        real += [valid.flatten() for _, valid in self._buckets]
        flat, at = torch.cat(rows), torch.cat(real).nonzero().squeeze(1)
        where = torch.empty(self.num_tokens, dtype=torch.long, device=dev)
        where[flat[at]] = at
        return where

    def _mask(self, group: int, sliding_window: int | None) -> torch.Tensor:
        """[s, 1, n, n] boolean: query i sees key j iff j <= i, j is real and (i - j) < window."""
        key = ("group", group, sliding_window)
        if key not in self._masks:
            valid = self._buckets[group][1]
            n = valid.shape[1]
            i = torch.arange(n, device=valid.device)
            allowed = i[None, :] <= i[:, None]
            if sliding_window is not None:
                allowed = allowed & ((i[:, None] - i[None, :]) < sliding_window)
            self._masks[key] = (allowed[None] & valid[:, None, :])[:, None]
        return self._masks[key]

    def _lone_mask(self, n: int, sliding_window: int | None) -> torch.Tensor | None:
        """[n, n] boolean causal window mask of a sequence of n that attends alone; None: plain causal."""
        if sliding_window is None or sliding_window >= n:
            return None
        key = ("alone", n, sliding_window)
        if key not in self._masks:
            i = torch.arange(n, device=self.input_ids.device)
            self._masks[key] = causal_window_mask(i, i, sliding_window)
        return self._masks[key]

    def attention(
        self,
        q_THD: torch.Tensor,
        k_TKD: torch.Tensor,
        v_TKD: torch.Tensor,
        layer_idx: int,
        spec: AttentionSpec | None = None,
    ) -> torch.Tensor:
        """Causal attention inside each sequence (``models.attention.attend``); returns [T, H, D].

        ``layer_idx`` is for caches; ``spec`` holds the layer's window, scale and soft-cap.
        """
        del layer_idx
        spec = spec or AttentionSpec()
        window = spec.sliding_window
        plain = spec.softcap is None and (spec.scale is None or spec.scale == q_THD.shape[-1] ** -0.5)
        if q_THD.is_cuda and plain:  # no padding on a GPU when a varlen kernel is there (models/varlen.py)
            from .models.varlen import varlen_attention

            o = varlen_attention(q_THD, k_TKD, v_TKD, self.cu_seqlens, max(self.seq_lens), window)
            if o is not None:
                return o
        if self.num_sequences == 1:
            return _attend_alone(q_THD, k_TKD, v_TKD, self._lone_mask(self.num_tokens, window), spec)
        outs = []
        if self._alone:  # views of q, k, v: no copy in, and the backward of split is one cat
            lens = self.seq_lens
            qs, ks, vs = q_THD.split(lens), k_TKD.split(lens), v_TKD.split(lens)
            outs = [
                _attend_alone(qs[i], ks[i], vs[i], self._lone_mask(lens[i], window), spec)
                for i in self._alone
            ]
            if not self._buckets:
                return torch.cat(outs)
        for g, (gather, _) in enumerate(self._buckets):
            s, n = gather.shape
            flat = gather.flatten()
            # Each row is one sequence from column 0, padded after its end: a real query's causal keys are
            # all real, so without a window plain causal attention is exact (the padding rows' outputs are
            # dropped) and lets the kernel skip the blocks above the diagonal instead of reading a mask.
            o = attend(
                *(
                    x.index_select(0, flat).view(s, n, *x.shape[1:]).transpose(1, 2)
                    for x in (q_THD, k_TKD, v_TKD)
                ),
                None if window is None else self._mask(g, window),
                spec,
                is_causal=window is None,
            )  # [s, H, n, D]
            outs.append(o.transpose(1, 2).reshape(s * n, o.shape[1], o.shape[3]))
        return torch.cat(outs).index_select(0, self._unbucket)


def _attend_alone(q_NHD, k_NKD, v_NKD, mask: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor:
    """Causal attention over one whole sequence [N, H, D] (a view of the batch's rows); ``mask`` [N, N]
    when a sliding window hides some earlier keys, else None."""
    o = attend(*(x.transpose(0, 1)[None] for x in (q_NHD, k_NKD, v_NKD)), mask, spec, is_causal=mask is None)
    return o[0].transpose(0, 1)
