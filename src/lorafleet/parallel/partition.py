"""Decoder layers -> pipeline stages, balanced by cost (embedding and head included). Pure Python.

    costs = estimate_costs(model_cfg)                  # per-layer training cost, embedding, head
    edges = balance(costs, num_stages=2)               # e.g. (0, 16, 30): stage s holds [edges[s], edges[s+1])
    edges = edges_from_boundaries([16], num_layers=30) # the same from pipeline.boundaries

A pipeline runs as fast as its slowest stage, so layers are split into contiguous ranges that minimise the
largest stage cost. The first stage also pays for the embedding and the last one for the final norm, the
head and the loss; with a large vocabulary and a small model the head weighs as much as several layers
(SmolLM2-135M: vocabulary 49152 x hidden 576 = 28M weights, eight layers' worth), so the last stage gets
fewer layers.

Costs are in multiply-adds per token of one training micro-batch (forward plus backward). The base is
frozen, so the backward of a linear layer computes only the input gradient (one matmul, as the forward);
attention adds ``4 * seq_len * H * D`` per token and direction (scores and values, causal half counted in
full, as a kernel computes it). The head runs on supervised positions only (the engine skips the others),
so its cost is weighted by ``supervised_fraction``. Measured costs (seconds per layer from a profile) can be
passed to ``balance`` instead; it only needs one non-negative number per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..models.families import ModelConfig

__all__ = ["StageCosts", "balance", "edges_from_boundaries", "estimate_costs", "stage_cost"]


@dataclass(frozen=True)
class StageCosts:
    """Cost of each decoder layer, plus the extras of the first (``embed``) and last (``head``) stages."""

    layers: tuple[float, ...]
    embed: float = 0.0
    head: float = 0.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a model needs at least one decoder layer to partition")
        if any(c < 0 for c in (*self.layers, self.embed, self.head)):
            raise ValueError(
                f"costs must be non-negative, got layers={list(self.layers)}, embed={self.embed}, head={self.head}"
            )


def estimate_costs(cfg: ModelConfig, supervised_fraction: float = 0.5, seq_len: int = 256) -> StageCosts:
    """Multiply-adds per token of one training pass (forward + input-gradient backward) per stage part.

    ``supervised_fraction`` is the share of tokens with a label (the head and the loss run on those only);
    ``seq_len`` the typical sequence length (attention's cost grows with it).
    """
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must be in [0, 1], got {supervised_fraction}")
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    linear = h * d * (2 * cfg.num_attention_heads + 2 * cfg.num_key_value_heads) + 3 * h * i
    attention = 4 * seq_len * cfg.num_attention_heads * d
    per_layer = 2.0 * (linear + attention)  # forward + input gradient
    # The loss: the head's matmul twice (forward, input gradient) plus softmax and its gradient over V.
    head = supervised_fraction * (2.0 * h * cfg.vocab_size + 4.0 * cfg.vocab_size)
    embed = float(h)  # a row gather; nothing flows back into token ids
    return StageCosts(layers=(per_layer,) * cfg.num_hidden_layers, embed=embed, head=head)


def stage_cost(costs: StageCosts, first: int, last: int) -> float:
    """Cost of a stage holding layers ``[first, last)`` (with the embedding if first is 0, the head if last)."""
    n = len(costs.layers)
    total = sum(costs.layers[first:last])
    if first == 0:
        total += costs.embed
    if last == n:
        total += costs.head
    return total


def balance(costs: StageCosts, num_stages: int) -> tuple[int, ...]:
    """Layer edges ``(0, e1, ..., n)`` of ``num_stages`` contiguous ranges minimising the largest stage cost.

    Exact (dynamic programming over split points); among equally good splits the one with the least total
    squared deviation from the mean is taken, then the earliest, so the result is deterministic. Every
    stage gets at least one layer.
    """
    n = len(costs.layers)
    if num_stages < 1:
        raise ValueError(f"num_stages = {num_stages}; a pipeline has at least one stage")
    if num_stages > n:
        raise ValueError(
            f"{num_stages} stages but the model has {n} decoder layers: each stage needs at least one layer, "
            f"so use at most {n} stages"
        )
    mean = stage_cost(costs, 0, n) / num_stages
    inf = (float("inf"), float("inf"))
    # best[s][j]: (max cost, squared deviation) of splitting layers [0, j) into s stages; cut[s][j]: last cut.
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for k in range(s - 1, j):
                prev = best[s - 1][k]
                if prev == inf:
                    continue
                c = stage_cost(costs, k, j)
                cand = (max(prev[0], c), prev[1] + (c - mean) ** 2)
                if _better(cand, best[s][j]):
                    best[s][j], cut[s][j] = cand, k
    edges = [n]
    for s in range(num_stages, 0, -1):
        edges.append(cut[s][edges[-1]])
    return tuple(reversed(edges))


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    # Relative tolerance so that float noise in equal sums does not pick an arbitrary split.
    tol = 1e-9 * max(1.0, abs(b[0]) if b[0] != float("inf") else 1.0)
    if a[0] < b[0] - tol:
        return True
    return abs(a[0] - b[0]) <= tol and a[1] < b[1] - tol


def edges_from_boundaries(boundaries: Sequence[int], num_layers: int) -> tuple[int, ...]:
    """``pipeline.boundaries`` (the first layer of every stage after the first) -> edges ``(0, ..., n)``."""
    b = list(boundaries)
    edges = (0, *b, num_layers)
    bad = [(s, edges[s], edges[s + 1]) for s in range(len(edges) - 1) if edges[s] >= edges[s + 1]]
    if bad:
        s, first, last = bad[0]
        raise ValueError(
            f"pipeline.boundaries {b} give stage {s} the layers [{first}, {last}), which is empty: the model has "
            f"{num_layers} layers (0 to {num_layers - 1}), so boundaries must increase strictly from 1 to "
            f"{num_layers - 1}, e.g. {list(_balance_even(num_layers, min(len(b) + 1, num_layers))[1:-1])}"
        )
    return edges


def _balance_even(num_layers: int, num_stages: int) -> tuple[int, ...]:
    """Edges of ``num_stages`` ranges of (nearly) equal layer counts; used for examples in messages."""
    return tuple(round(s * num_layers / num_stages) for s in range(num_stages + 1))
