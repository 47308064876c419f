"""Continuous batching: generation where rows join and leave between decode steps, each row its own adapter.

``generate`` (``generate.py``) runs one fixed batch to the end. A server cannot wait for that: requests
arrive while others are half-way. ``ContinuousBatcher`` keeps the rows in flight in one KV cache;
``step()`` first prefills the rows that arrived since the last step (packed, no padding) and appends their
caches, then runs ONE decode step over every row in flight (rows of one adapter adjacent, as the fused
LoRA linear wants), and finally drops the rows that finished. Each row samples with its own generator,
temperature and top-p, so a row's tokens do not depend on which other rows share its steps: greedy rows
give the tokens ``generate`` gives for the same prompt and adapter.

Legend as in ``generate.py``: R rows, K key/value heads, C cache capacity, D head dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..batch import FusedBatch
from .generate import KVCache, _Decode, _Prefill, _sampling_probs

__all__ = ["ContinuousBatcher", "GenRow", "StepReport"]


@dataclass
class GenRow:
    """One request in flight. ``on_token(row, token_id)`` sees every new token; ``on_done(row, reason)`` once
    (reason ``"stop"``: a stop token, ``"length"``: ``max_new_tokens`` reached, or what ``finish`` set)."""

    prompt: list[int]
    max_new_tokens: int
    adapter: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_ids: frozenset[int] = frozenset()
    want_logprobs: bool = False  # record log p(token) of the unscaled distribution for every new token
    on_token: Callable[[GenRow, int], None] | None = None
    on_done: Callable[[GenRow, str], None] | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None  # set by a caller (e.g. a stop string matched) to end the row
    _generator: torch.Generator | None = None
    _next: int = -1  # the token to feed at the next decode step

    def finish(self, reason: str) -> None:
        """End this row after the current token (the batcher drops it at the end of the step)."""
        self.finish_reason = self.finish_reason or reason


@dataclass(frozen=True)
class StepReport:
    """What one ``step()`` did: rows prefilled, rows in the decode step, rows that finished."""

    joined: int
    decoded: int
    finished: int
    adapters: int  # distinct adapters (None counts as one) in the decode step


class ContinuousBatcher:
    """Rows join (``add``) and leave between decode steps; ``step()`` advances every row by one token."""

    def __init__(self, model, max_rows: int = 64) -> None:
        if not (getattr(model, "has_embed", False) and getattr(model, "has_head", False)):
            raise ValueError("continuous batching needs the full model (embedding and head)")
        self.model = model
        self.max_rows = max_rows
        self.rows: list[GenRow] = []  # in cache order (adapters adjacent)
        self.pending: list[GenRow] = []
        self.cache: KVCache | None = None

    def add(self, row: GenRow) -> None:
        """Queue ``row``; it joins at the next ``step()`` (if fewer than ``max_rows`` are in flight)."""
        vocab = self.model.config.vocab_size
        if not row.prompt or any(not 0 <= t < vocab for t in row.prompt):
            raise ValueError(f"a prompt needs at least one token, each in [0, {vocab})")
        if row.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {row.max_new_tokens}")
        row._generator = torch.Generator(device=self.model.device).manual_seed(row.seed)
        self.pending.append(row)

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.pending)

    def adapters_in_use(self) -> set[str]:
        return {r.adapter for r in self.rows + self.pending if r.adapter is not None}

    # -- one step -------------------------------------------------------------------------------------

    def step(self) -> StepReport:
        """Prefill the rows that arrived, decode one token for every row in flight, drop finished rows."""
        with torch.inference_mode():
            room = max(0, self.max_rows - len(self.rows))
            joining, self.pending = self.pending[:room], self.pending[room:]
            if joining:
                self._prefill(joining)
            decoded = len(self.rows)
            adapters = len({r.adapter for r in self.rows})
            if self.rows:
                self._decode()
            finished = self._drop_finished()
        return StepReport(len(joining), decoded, finished, adapters)

    def _pick(self, row: GenRow, logits_V: torch.Tensor) -> int:
        if row.temperature == 0.0:
            return int(logits_V.argmax(-1))
        probs = _sampling_probs(logits_V[None], row.temperature, row.top_p)[0]
        return int(torch.multinomial(probs, 1, generator=row._generator))

    def _emit(self, row: GenRow, logits_V: torch.Tensor) -> None:
        tok = self._pick(row, logits_V)
        if tok in row.stop_ids:
            row.finish("stop")
            return
        row.tokens.append(tok)
        if row.want_logprobs:
            row.logprobs.append(float(torch.log_softmax(logits_V.float(), -1)[tok]))
        row._next = tok
        if row.on_token is not None:
            row.on_token(row, tok)
        if len(row.tokens) >= row.max_new_tokens:
            row.finish("length")

    def _prefill(self, joining: list[GenRow]) -> None:
        order = sorted(range(len(joining)), key=lambda i: (joining[i].adapter or "",))
        joining = [joining[i] for i in order]
        dev = self.model.device
        fused = FusedBatch.from_sequences(
            [r.prompt for r in joining], [r.adapter for r in joining], device=dev
        )
        capacity = max(len(r.prompt) + r.max_new_tokens for r in joining)
        cache = KVCache(fused.seq_lens, capacity, dev)
        hidden_TE = self.model.forward_packed(fused.input_ids, _Prefill(fused, cache), apply_head=False)
        last_R = fused.cu_seqlens[1:] - 1
        logits_RV = self.model.lm_head(hidden_TE[last_R], _Decode(cache, [r.adapter for r in joining]))
        for row, logits_V in zip(joining, logits_RV):
            self._emit(row, logits_V)
        # rows that ended on their first token never enter the shared cache
        keep = [i for i, r in enumerate(joining) if r.finish_reason is None]
        for r in joining:
            if r.finish_reason is not None:
                self._done(r)
        if not keep:
            return
        cache.keep(keep)
        self._merge([joining[i] for i in keep], cache)

    def _merge(self, new_rows: list[GenRow], new: KVCache) -> None:
        """Append ``new``'s rows to the shared cache (growing its capacity if needed), then sort by adapter."""
        if self.cache is None:
            self.cache, self.rows = new, new_rows
        else:
            old = self.cache
            cap = max(old.capacity, new.capacity)
            merged = KVCache(old.lengths + new.lengths, cap, old.device)

            def grown(t: torch.Tensor) -> torch.Tensor:  # [R, K, C, D] -> [R, K, cap, D]
                return F.pad(t, (0, 0, 0, cap - t.shape[2]))

            for layer in old.k:
                merged.k[layer] = torch.cat([grown(old.k[layer]), grown(new.k[layer])])
                merged.v[layer] = torch.cat([grown(old.v[layer]), grown(new.v[layer])])
            self.cache, self.rows = merged, self.rows + new_rows
        order = sorted(range(len(self.rows)), key=lambda i: (self.rows[i].adapter or "",))
        if order != list(range(len(self.rows))):
            self.cache.keep(order)
            self.rows = [self.rows[i] for i in order]

    def _decode(self) -> None:
        cache = self.cache
        dev = self.model.device
        # a row needs room for the token it feeds now
        need = max(cache.lengths) + 1
        if need > cache.capacity:
            grow = need - cache.capacity
            cache.k = {i: F.pad(t, (0, 0, 0, grow)) for i, t in cache.k.items()}
            cache.v = {i: F.pad(t, (0, 0, 0, grow)) for i, t in cache.v.items()}
            cache.capacity = need
        next_R = torch.tensor([r._next for r in self.rows], dtype=torch.long, device=dev)
        logits_RV = self.model.forward_packed(next_R, _Decode(cache, [r.adapter for r in self.rows]))
        cache.lengths = [m + 1 for m in cache.lengths]
        for row, logits_V in zip(self.rows, logits_RV):
            if row.finish_reason is None:
                self._emit(row, logits_V)

    def _drop_finished(self) -> int:
        keep = [i for i, r in enumerate(self.rows) if r.finish_reason is None]
        gone = [r for r in self.rows if r.finish_reason is not None]
        for r in gone:
            self._done(r)
        if not gone:
            return 0
        if keep:
            self.cache.keep(keep)
            self.rows = [self.rows[i] for i in keep]
        else:
            self.cache, self.rows = None, []
        return len(gone)

    def _done(self, row: GenRow) -> None:
        if row.on_done is not None:
            row.on_done(row, row.finish_reason or "stop")

    def cancel(self, row: GenRow) -> None:
        """End ``row`` (a client went away): it leaves at the end of the next step."""
        if row in self.pending:
            self.pending.remove(row)
        else:
            row.finish("cancelled")
