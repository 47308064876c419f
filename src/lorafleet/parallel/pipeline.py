"""LoRA-aware pipeline parallelism: the base model split into stages, kept busy by independent adapters.

    torchrun --nproc-per-node 2 -m lorafleet train examples/demo.yaml   # 2 stages on one machine (CPU: gloo)
    lorafleet train examples/demo.yaml --nproc 2                         # the same; starts torchrun itself
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m lorafleet train cfg.yaml   # and node-rank 1 elsewhere

Legend: T tokens of a micro-batch, E hidden size.

Every rank runs one stage: the layers ``[a, b)`` that ``Topology`` gives it (loaded for that range only),
its slice of every adapter with that slice's optimizer and schedule, and the loop below. Stage 0
coordinates (``PipelineTrainer``, ``coordinator.py``): tasks are added to it, as to the engine, and it
announces each one to the other stages; a ``lorafleet train`` run adds the config's tasks and runs until
they are done, a service worker (``--nproc P``) adds and cancels jobs while others train. The model code is
unchanged: a stage is ``Decoder.forward_packed`` over its range plus a send and a receive. With
``WORLD_SIZE = R x P`` there are R independent pipelines, each training every R-th task of the config:
tasks share no parameter, so replicas exchange nothing until the final summary.

Schedule (per stage, never a global flush):

- The first stage (the coordinator) runs the dispatcher (``train/dispatcher.py``, as the single-process engine does) over the
  tasks whose current step still has examples to run, packs the micro-batch and sends its activations with
  the metadata the other stages need: the ``FusedBatch`` (tokens, positions, sequence boundaries, adapter
  segments, labels, sequence roles), each task's step denominators and which tasks end their step with it.
- A middle stage runs the forward of what it receives and sends it on; the last stage runs forward, each
  task's loss (``train/tasks.py``) and backward at once and sends the input gradient back.
- Every stage prefers a ready backward over a new forward and keeps at most ``pipeline.max_in_flight``
  micro-batches between forward and backward. When the micro-batch that ends task t's step has passed
  backward on a stage, every micro-batch of that step has (backward order is forward order everywhere), so
  the stage steps t's optimizer for its slice right away. A task's next step is dispatched only after the
  first stage, the last to see the gradient, has stepped it; the channels are ordered, so every stage has
  stepped t before t's next micro-batch reaches it. Other tasks fill the pipeline meanwhile.
- Gradient clipping needs the norm over all stages: each stage adds its slice's squared norm to the
  backward message, the first stage gets the total, steps, and announces the total in its next forward
  message; the other stages step t when that message arrives (before any of t's next micro-batches).

Exactness: a task's gradient depends only on its own examples (adapters share no parameters, attention
stays inside sequences, losses are divided by the denominators of the whole step), so any grouping into
fused micro-batches and any interleaving gives the single-process result up to float rounding.

Options (the config's ``pipeline:`` section): ``stages`` and ``boundaries`` (see ``Topology``),
``max_in_flight`` as above. As in one process, the top-level ``recompute`` (``recompute.apply_recompute``:
every layer of the stage keeps only its input and reruns its forward in the backward) and
``base_model.quantize`` (the stage's projections) apply to each stage.

Outputs: per-stage checkpoints (``checkpoints/<task>/stage-<s>-of-<P>/step-N``), one PEFT folder per
adapter written by the first stage from every stage's slice (the slices travel back with the gradients),
``metrics.jsonl`` from the coordinator (each step's loss travels back from the last stage with the gradient), and ``trace.json``: every stage's forward, backward and optimizer
spans as a Chrome / Perfetto trace (open it at https://ui.perfetto.dev), where idle gaps are the bubbles.

Faults: a stage that raises sends ``abort`` to its neighbours, which pass it on and stop; a stage that dies
closes its sockets, so its neighbours' receiving threads wake at once and they abort the same way. Every
stage exits with a ``PipelineError`` naming the stage and rank that failed. Rerunning the same command
resumes every task from the newest step that every stage has checkpointed.

Layout: ``messages`` (the typed messages, versioned), ``transport`` (sending them between neighbours),
``stage`` (one stage's messages, forward, backward and evaluation), ``stage_tasks`` (its tasks: adds, steps,
checkpoints, failures, exports), ``coordinator`` (``PipelineTrainer``, the ``Trainer`` on stage 0),
``trace`` (spans and their summary), this module (a ``lorafleet train`` run).
"""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..config import RunConfig
from ..train.task import TaskState
from .coordinator import PipelineTrainer
from .topology import Topology
from .trace import chrome_trace, trace_summary
from .transport import PipelineError

__all__ = ["PipelineError", "PipelineResult", "run_pipeline", "trace_summary"]


@dataclass
class PipelineResult:
    """What a pipeline run returns on every rank; ``states`` and ``trace`` are complete on rank 0 only."""

    states: dict[str, TaskState]
    trace: list[dict[str, Any]]  # spans of every stage (see ``trace_summary``)
    finish_s: dict[str, float]  # when each task finished, in seconds since its replica's loop began
    topology: Topology
    wall_s: float  # this rank's loop, from the first plan to the end of the run


def run_pipeline(cfg: RunConfig, progress: bool = False, timeout_s: float = 1800.0) -> PipelineResult:
    """Run this process's stage of ``cfg`` under torchrun (RANK, WORLD_SIZE, ... in the environment).

    Each replica's coordinator adds its share of the config's tasks (task i goes to replica i % R) and
    trains them to the end. Every rank returns when the whole pipeline is done; rank 0's result holds every
    task's final state and the merged trace (also written to ``OUTPUT_DIR/trace.json``). A failed or dead
    stage makes every other stage raise ``PipelineError`` naming it. ``timeout_s`` bounds any single wait.
    """
    from ..metrics import plot_curves, read_metrics

    trainer = PipelineTrainer(cfg, progress=progress, timeout_s=timeout_s)
    topo, stage = trainer.topology, trainer.stage
    if topo.num_replicas > len(cfg.tasks):
        raise ValueError(
            f"{topo.num_replicas} pipeline replicas (WORLD_SIZE {topo.world_size} / pipeline.stages "
            f"{topo.num_stages}) but only {len(cfg.tasks)} tasks: each replica trains whole tasks, so run at most "
            f"{len(cfg.tasks)} x {topo.num_stages} = {len(cfg.tasks) * topo.num_stages} processes"
        )
    print(trainer.memory_line(), flush=True)
    tic = time.time()
    try:
        if trainer.is_coordinator:
            datasets = {d.name: d for d in cfg.datasets}
            adapters = {a.name: a for a in cfg.adapters}
            for i, task in enumerate(cfg.tasks):
                if topo.replica_of_task(i) == topo.replica:
                    ev = datasets[task.eval_dataset] if task.eval_dataset else None
                    trainer.add_task(datasets[task.dataset], adapters[task.adapter], task, ev)
            while trainer.run_once():
                pass
            trainer.close()
        else:
            trainer.follow()
    except PipelineError:
        raise
    except Exception as e:
        traceback.print_exc()
        try:
            stage.abort(f"stage {topo.stage} (rank {topo.rank}) failed: {type(e).__name__}: {e}")
        except PipelineError as pe:
            raise pe from e
    wall = time.time() - tic
    finish = {n: t.finished_at - stage.t_start for n, t in stage.tasks.items() if t.finished_at is not None}
    states = trainer.states if trainer.is_coordinator else {}
    mine = (topo.replica, topo.stage, states, list(stage.trace), finish)
    gathered: list[Any] = [None] * topo.world_size if topo.rank == 0 else []
    dist.gather_object(mine, gathered if topo.rank == 0 else None, dst=0)
    merged: dict[str, TaskState] = {}
    events: list[dict[str, Any]] = []
    finish_s: dict[str, float] = {}
    if topo.rank == 0:
        for replica, s, their_states, trace, finished in gathered:
            events.extend({**e, "replica": replica} for e in trace)
            finish_s.update(finished if s == 0 else {})
            merged.update(their_states)
        merged = {t.name: merged[t.name] for t in cfg.tasks}
        out = Path(cfg.output_dir)
        (out / "trace.json").write_text(json.dumps(chrome_trace(events, topo)))
        records = read_metrics(out / "metrics.jsonl")
        if records:
            plot_curves(records, out / "loss.png")
    dist.barrier()
    dist.destroy_process_group()
    return PipelineResult(states=merged, trace=events, finish_s=finish_s, topology=topo, wall_s=wall)
