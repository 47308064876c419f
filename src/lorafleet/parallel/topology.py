"""Who is who in a pipeline run: ranks, stages, replicas, layer ranges and the process groups between them.

    topo = Topology.from_env(model_cfg, cfg.pipeline)   # under torchrun: RANK, WORLD_SIZE, LOCAL_RANK
    print(topo.describe())                             # one line per stage: ranks and layers
    links = topo.connect()                             # torch.distributed: the world and the stage links

``Topology`` is the one object that knows the layout, and the one place that checks it: every refusal
carries the arithmetic (``WORLD_SIZE (3) is not a multiple of pipeline.stages (2): ...``) and the fix.

Layout: ``WORLD_SIZE = num_replicas x num_stages``. Consecutive ranks form one pipeline (rank r is stage
``r % num_stages`` of replica ``r // num_stages``), so with ``--nproc-per-node num_stages`` each pipeline
stays inside one machine. Replicas need no gradient exchange at all: tasks are independent, so each replica
trains its own share of the tasks (task i goes to replica ``i % num_replicas``).

Links: between stage s and s + 1 of a replica there are two process groups of those two ranks, one per
direction, so that the thread receiving on a link and the thread sending on the other never share a group
(gloo and NCCL groups are not meant to be driven from two threads at once). Control messages (and, on CPU,
the activations too) travel over gloo; on CUDA the activations and gradients travel over two more groups
per link with the NCCL backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..models.families import ModelConfig
from .partition import StageCosts, balance, edges_from_boundaries, estimate_costs, stage_cost

__all__ = ["Links", "Topology"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class Topology:
    """The layout of a pipeline run as seen from one rank (validated on construction).

    Attributes:
        world_size: processes in the run (torchrun's WORLD_SIZE).
        rank: this process (RANK).
        num_stages: stages per pipeline; ``world_size`` must be a multiple of it.
        edges: ``num_stages + 1`` layer indices; stage s holds decoder layers ``[edges[s], edges[s + 1])``.
        local_rank: this process on its machine (LOCAL_RANK), which picks the CUDA device.
        device: "cpu" or "cuda"; CUDA runs put rank ``local_rank`` on ``cuda:local_rank``.
    """

    world_size: int
    rank: int
    num_stages: int
    edges: tuple[int, ...]
    local_rank: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        w, p = self.world_size, self.num_stages
        if w < 1 or not 0 <= self.rank < w:
            raise ValueError(f"RANK ({self.rank}) must be in [0, WORLD_SIZE ({w})); launch with torchrun")
        if p < 1:
            raise ValueError(f"pipeline.stages ({p}) must be at least 1")
        if w % p:
            raise ValueError(
                f"WORLD_SIZE ({w}) is not a multiple of pipeline.stages ({p}): {w} = {w // p} x {p} + {w % p}; "
                f"run a multiple of {p} processes (e.g. {p} or {2 * p}) or set pipeline.stages to a divisor of "
                f"{w} ({', '.join(map(str, _divisors(w)))})"
            )
        e = self.edges
        n = e[-1] if e else 0
        if len(e) != p + 1 or e[0] != 0 or any(a >= b for a, b in zip(e, e[1:])):
            raise ValueError(
                f"layer edges {list(e)} do not split [0, {n}) into {p} non-empty ranges; {p} stages need {p + 1} "
                "strictly increasing edges from 0 to the number of layers"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r}: a pipeline runs on 'cpu' or 'cuda'")

    # -- construction ------------------------------------------------------------------------------------

    @staticmethod
    def build(
        world_size: int,
        rank: int,
        model: ModelConfig,
        stages: int | None = None,
        boundaries: list[int] | None = None,
        costs: StageCosts | None = None,
        local_rank: int = 0,
        device: str = "cpu",
    ) -> Topology:
        """Resolve ``pipeline.stages`` / ``pipeline.boundaries`` against the world size and the model.

        ``stages`` None means one stage per process (or ``len(boundaries) + 1`` when boundaries are given);
        ``boundaries`` None balances the layers by ``costs`` (default: ``estimate_costs(model)``).
        """
        n = model.num_hidden_layers
        if stages is None:
            stages = len(boundaries) + 1 if boundaries is not None else world_size
        if stages > n:
            raise ValueError(
                f"pipeline.stages ({stages}) > num_hidden_layers ({n}) of the model: each stage needs at least "
                f"one decoder layer, so use at most {n} stages"
                + (
                    " (pipeline.stages defaults to WORLD_SIZE: launch fewer processes)"
                    if stages == world_size
                    else ""
                )
            )
        if boundaries is not None:
            if len(boundaries) != stages - 1:
                raise ValueError(
                    f"pipeline.boundaries {list(boundaries)} has {len(boundaries)} entries, but {stages} stages need "
                    f"{stages} - 1 = {stages - 1} (the first layer of every stage after the first)"
                )
            edges = edges_from_boundaries(boundaries, n)
        else:
            edges = balance(costs if costs is not None else estimate_costs(model), stages)
        return Topology(world_size, rank, stages, edges, local_rank, device)

    @staticmethod
    def from_env(
        model: ModelConfig,
        pipeline: Any,
        device: str = "cpu",
        env: Mapping[str, str] | None = None,
        costs: StageCosts | None = None,
    ) -> Topology:
        """The topology of this process from torchrun's environment and the config's ``pipeline`` section."""
        env = os.environ if env is None else env
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} not set: a pipeline run is started by torchrun, e.g. "
                "`torchrun --nproc-per-node 2 -m lorafleet train CONFIG.yaml` or `lorafleet train CONFIG.yaml --nproc 2`"
            )
        return Topology.build(
            world_size=int(env["WORLD_SIZE"]),
            rank=int(env["RANK"]),
            model=model,
            stages=pipeline.stages,
            boundaries=pipeline.boundaries,
            costs=costs,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            device=device,
        )

    # -- where this rank sits ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.edges[-1]

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.num_stages

    @property
    def stage(self) -> int:
        return self.rank % self.num_stages

    @property
    def replica(self) -> int:
        return self.rank // self.num_stages

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    @property
    def layers(self) -> tuple[int, int]:
        """This stage's decoder layers ``[first, last)``."""
        return self.edges[self.stage], self.edges[self.stage + 1]

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        """Global rank of ``stage`` in ``replica`` (default: this rank's replica)."""
        r = self.replica if replica is None else replica
        return r * self.num_stages + stage

    @property
    def prev_rank(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next_rank(self) -> int | None:
        return None if self.is_last else self.rank + 1

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.local_rank}" if self.device == "cuda" else "cpu"

    def replica_of_task(self, index: int) -> int:
        """Which replica trains the ``index``-th task of the config."""
        return index % self.num_replicas

    def describe(self, model: ModelConfig | None = None) -> str:
        """One line per stage: its ranks and layers (and its share of the estimated cost with ``model``)."""
        costs = estimate_costs(model) if model is not None else None
        total = stage_cost(costs, 0, self.num_layers) if costs else 0.0
        lines = [
            f"pipeline: {self.world_size} processes = {self.num_replicas} replica(s) x {self.num_stages} stages, "
            f"{self.num_layers} layers, device {self.device}"
        ]
        for s in range(self.num_stages):
            a, b = self.edges[s], self.edges[s + 1]
            ranks = [self.rank_of(s, r) for r in range(self.num_replicas)]
            extra = (" + embedding" if a == 0 else "") + (
                " + norm, head, loss" if b == self.num_layers else ""
            )
            share = f", {100 * stage_cost(costs, a, b) / total:.0f}% of the estimated cost" if costs else ""
            lines.append(f"  stage {s}: rank(s) {ranks}, layers [{a}, {b}){extra}{share}")
        return "\n".join(lines)

    # -- process groups -------------------------------------------------------------------------------------

    def connect(self, timeout_s: float = 1800.0) -> Links:
        """Initialise torch.distributed (env://, gloo) and create every link group; returns this rank's links.

        Every rank must call this, in the same order, as group creation is collective.
        """
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timeout)
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"torch.distributed has WORLD_SIZE {dist.get_world_size()} and RANK {dist.get_rank()}, "
                f"the topology {self.world_size} and {self.rank}; build the topology from the same environment"
            )
        links = Links()
        for r in range(self.num_replicas):
            for s in range(self.num_stages - 1):
                pair = [self.rank_of(s, r), self.rank_of(s + 1, r)]
                fwd = dist.new_group(pair, timeout=timeout, backend="gloo")
                bwd = dist.new_group(pair, timeout=timeout, backend="gloo")
                fwd_data = bwd_data = None
                if self.device == "cuda":
                    fwd_data = dist.new_group(pair, timeout=timeout, backend="nccl")
                    bwd_data = dist.new_group(pair, timeout=timeout, backend="nccl")
                if self.rank == pair[0]:
                    links.to_next, links.from_next = fwd, bwd
                    links.to_next_data, links.from_next_data = fwd_data, bwd_data
                elif self.rank == pair[1]:
                    links.from_prev, links.to_prev = fwd, bwd
                    links.from_prev_data, links.to_prev_data = fwd_data, bwd_data
        return links


@dataclass
class Links:
    """This rank's process groups to its neighbours (None at the ends of the pipeline).

    ``to_next``/``from_prev`` carry forward messages (activations), ``to_prev``/``from_next`` backward
    ones (gradients); the ``*_data`` groups (NCCL, CUDA runs only) carry the tensors of those messages.
    """

    to_next: Any = None
    from_next: Any = None
    from_prev: Any = None
    to_prev: Any = None
    to_next_data: Any = None
    from_next_data: Any = None
    from_prev_data: Any = None
    to_prev_data: Any = None
