"""Layers -> stages (against a brute-force oracle) and the topology's checks, with the arithmetic in messages."""

from __future__ import annotations

import itertools
import random

import pytest

from lorafleet.models.families import ModelConfig
from lorafleet.parallel.partition import (
    StageCosts,
    balance,
    edges_from_boundaries,
    estimate_costs,
    stage_cost,
)
from lorafleet.parallel.topology import Topology


def _cfg(layers: int = 6, vocab: int = 320, hidden: int = 64) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
    )


SMOLLM2_135M = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)


def _brute_force(costs: StageCosts, p: int) -> float:
    """The smallest possible largest stage cost, over every split into p non-empty contiguous ranges."""
    n = len(costs.layers)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        best = min(best, max(stage_cost(costs, a, b) for a, b in zip(edges, edges[1:])))
    return best


def test_balance_matches_brute_force_on_random_costs():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        p = rng.randint(1, n)
        costs = StageCosts(
            layers=tuple(rng.choice([1.0, 2.0, 3.5, rng.random() * 10]) for _ in range(n)),
            embed=rng.random() * 5,
            head=rng.random() * 20,
        )
        edges = balance(costs, p)
        assert edges[0] == 0 and edges[-1] == n and len(edges) == p + 1
        assert all(a < b for a, b in zip(edges, edges[1:])), edges
        got = max(stage_cost(costs, a, b) for a, b in zip(edges, edges[1:]))
        assert got == pytest.approx(_brute_force(costs, p)), (costs, p, edges)


def test_uniform_layers_split_evenly_and_deterministically():
    costs = StageCosts(layers=(1.0,) * 8)
    assert balance(costs, 2) == (0, 4, 8)
    assert balance(costs, 4) == (0, 2, 4, 6, 8)
    assert balance(costs, 3) == balance(costs, 3)  # same answer every time
    assert balance(costs, 1) == (0, 8)


def test_heavy_head_gives_the_last_stage_fewer_layers():
    costs = estimate_costs(SMOLLM2_135M)
    # The head (49152 x 576, on half the tokens) weighs about three and a half layers (SmolLM2 is small).
    assert 3 < costs.head / costs.layers[0] < 4
    edges = balance(costs, 2)
    assert edges == (0, 17, 30)
    shares = [stage_cost(costs, a, b) for a, b in zip(edges, edges[1:])]
    assert max(shares) / min(shares) < 1.1
    # With every token supervised the head weighs more and the last stage gets fewer layers still.
    assert balance(estimate_costs(SMOLLM2_135M, supervised_fraction=1.0), 2)[1] > 17


def test_boundaries_to_edges_and_their_errors():
    assert edges_from_boundaries([3], 6) == (0, 3, 6)
    assert edges_from_boundaries([1, 5], 6) == (0, 1, 5, 6)
    with pytest.raises(
        ValueError, match=r"stage 2 the layers \[6, 6\), which is empty: the model has 6 layers"
    ):
        edges_from_boundaries([2, 6], 6)
    with pytest.raises(ValueError, match=r"stage 1 the layers \[4, 3\)"):
        edges_from_boundaries([4, 3], 6)


def test_topology_refuses_what_cannot_work_with_the_arithmetic():
    cfg = _cfg(layers=6)
    with pytest.raises(
        ValueError, match=r"WORLD_SIZE \(3\) is not a multiple of pipeline.stages \(2\): 3 = 1 x 2 \+ 1"
    ):
        Topology.build(world_size=3, rank=0, model=cfg, stages=2)
    with pytest.raises(
        ValueError, match=r"pipeline.stages \(8\) > num_hidden_layers \(6\).*at most 6 stages"
    ):
        Topology.build(world_size=8, rank=0, model=cfg)
    with pytest.raises(ValueError, match=r"has 2 entries, but 2 stages need 2 - 1 = 1"):
        Topology.build(world_size=2, rank=0, model=cfg, stages=2, boundaries=[2, 4])
    with pytest.raises(ValueError, match=r"stage 1 the layers \[6, 6\)"):
        Topology.build(world_size=2, rank=0, model=cfg, stages=2, boundaries=[6])
    with pytest.raises(ValueError, match=r"RANK \(2\) must be in \[0, WORLD_SIZE \(2\)\)"):
        Topology.build(world_size=2, rank=2, model=cfg)
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE not set.*torchrun"):
        Topology.from_env(cfg, _Pipeline(), env={})


class _Pipeline:
    stages = None
    boundaries = None


def test_topology_layout_ranks_stages_replicas():
    cfg = _cfg(layers=6)
    topos = [Topology.build(world_size=4, rank=r, model=cfg, stages=2, boundaries=[2]) for r in range(4)]
    assert [t.stage for t in topos] == [0, 1, 0, 1]
    assert [t.replica for t in topos] == [0, 0, 1, 1]
    assert [t.layers for t in topos] == [(0, 2), (2, 6), (0, 2), (2, 6)]
    assert [(t.prev_rank, t.next_rank) for t in topos] == [(None, 1), (0, None), (None, 3), (2, None)]
    assert topos[2].is_first and topos[3].is_last and not topos[3].is_first
    assert [topos[0].replica_of_task(i) for i in range(5)] == [0, 1, 0, 1, 0]
    # Defaults: one stage per process, layers balanced by cost; boundaries alone set the stage count.
    t = Topology.from_env(cfg, _Pipeline(), env={"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "2"})
    assert (t.num_stages, t.stage, t.local_rank, t.num_replicas) == (3, 2, 2, 1)
    assert t.edges == balance(estimate_costs(cfg), 3)
    assert Topology.build(world_size=3, rank=0, model=cfg, boundaries=[1, 3]).edges == (0, 1, 3, 6)
    text = topos[0].describe(cfg)
    assert "4 processes = 2 replica(s) x 2 stages" in text
    assert "stage 0: rank(s) [0, 2], layers [0, 2) + embedding" in text
    assert "stage 1: rank(s) [1, 3], layers [2, 6) + norm, head, loss" in text
