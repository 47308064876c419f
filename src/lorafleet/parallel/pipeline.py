"""LoRA-aware pipeline parallelism: the base model split into stages, kept busy by independent adapters.

    torchrun --nproc-per-node 2 -m lorafleet train examples/demo.yaml   # 2 stages on one machine (CPU: gloo)
    lorafleet train examples/demo.yaml --nproc 2                         # the same; starts torchrun itself
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 \\
        --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m lorafleet train cfg.yaml   # and node-rank 1 elsewhere

Legend: T tokens of a micro-batch, E hidden size.

Every rank runs one stage: the layers ``[a, b)`` that ``Topology`` gives it (loaded for that range only),
its slice of every adapter with that slice's optimizer and schedule, and the loop below. The model code is
unchanged: a stage is ``Decoder.forward_packed`` over its range plus a send and a receive. With
``WORLD_SIZE = R x P`` there are R independent pipelines, each training every R-th task of the config:
tasks share no parameter, so replicas exchange nothing until the final summary.

Schedule (per stage, never a global flush):

- The first stage runs the dispatcher (``train/dispatcher.py``, as the single-process engine does) over the
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
``metrics.jsonl`` from the last stage, and ``trace.json``: every stage's forward, backward and optimizer
spans as a Chrome / Perfetto trace (open it at https://ui.perfetto.dev), where idle gaps are the bubbles.

Faults: a stage that raises sends ``abort`` to its neighbours, which pass it on and stop; a stage that dies
closes its sockets, so its neighbours' receiving threads wake at once and they abort the same way. Every
stage exits with a ``PipelineError`` naming the stage and rank that failed. Rerunning the same command
resumes every task from the newest step that every stage has checkpointed.
"""

from __future__ import annotations

import json
import math
import pickle
import queue
import threading
import time
import traceback
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..batch import FusedBatch, Segment, SequenceInfo
from ..config import RunConfig
from ..devices import resolve_device
from ..metrics import MetricsWriter
from ..models import Decoder, load_model, read_model_config
from ..train.engine import pack_plan, plan_micro_batch
from ..train.evaluate import EvalResult, EvalSums, eval_batches
from ..train.events import StepEvent
from ..train.task import Task, TaskState
from .topology import Links, Topology

__all__ = ["PipelineError", "PipelineResult", "run_pipeline", "trace_summary"]


class PipelineError(RuntimeError):
    """A stage failed or stopped answering; the message names the stage and its rank."""


# -- the point-to-point protocol ------------------------------------------------------------------------------

_KINDS = ("fwd", "bwd", "evr", "stop", "stop_ack", "abort")
_END_OF_STREAM = ("stop", "stop_ack", "abort")


@dataclass
class _Message:
    """One message between neighbouring stages.

    ``kind``: fwd (a micro-batch's activations, towards the last stage), bwd (their gradient, back), stop and
    stop_ack (the end of the run, down the pipeline and back up), abort (a stage failed), or lost (made
    locally: a receiving thread lost its link, the neighbour died). ``meta`` is a small pickled dict;
    ``tensor`` the activations or gradient (on CUDA fetched from the data link by ``_Transport.fetch``).
    """

    kind: str
    meta: dict[str, Any]
    tensor: torch.Tensor | None = None
    origin: str = ""  # "prev" or "next": the neighbour that sent it
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None


class _Transport:
    """Ordered messages to and from the two neighbours of a stage.

    Wire format of one message on a link's gloo group: an int64[3] header (kind, meta bytes, tensor
    elements), the pickled meta as uint8, then the tensor: on the same gloo group on CPU, on the link's NCCL
    group on CUDA (the receiver posts that receive when it handles the message, so in order).

    One thread per incoming link blocks in ``recv`` and puts every message into one inbox, so the stage
    sleeps until either neighbour sends anything, and a neighbour that dies (its socket closes) wakes it at
    once with a ``lost`` message. Sends are asynchronous, at most one message per direction outstanding.
    """

    def __init__(self, topo: Topology, links: Links) -> None:
        self.topo, self.links = topo, links
        self.inbox: queue.Queue[_Message] = queue.Queue()
        self._outstanding: dict[str, list] = {"next": [], "prev": []}
        for origin, group, peer in (
            ("prev", links.from_prev, topo.prev_rank),
            ("next", links.from_next, topo.next_rank),
        ):
            if group is not None:
                threading.Thread(
                    target=self._receive,
                    args=(origin, group, peer),
                    daemon=True,
                    name=f"lorafleet-recv-{origin}",
                ).start()

    def _receive(self, origin: str, group, peer: int) -> None:
        data_group = self.links.from_prev_data if origin == "prev" else self.links.from_next_data
        try:
            while True:
                header = torch.empty(3, dtype=torch.int64)
                dist.recv(header, src=peer, group=group)
                kind, meta_bytes, numel = header.tolist()
                raw = torch.empty(meta_bytes, dtype=torch.uint8)
                dist.recv(raw, src=peer, group=group)
                meta = pickle.loads(raw.numpy().tobytes())
                shape, dtype = meta.pop("_shape", None), meta.pop("_dtype", None)
                msg = _Message(_KINDS[kind], meta, None, origin, shape, dtype)
                if numel and data_group is None:
                    flat = torch.empty(numel, dtype=dtype)
                    dist.recv(flat, src=peer, group=group)
                    msg.tensor = flat.view(shape)
                self.inbox.put(msg)
                if msg.kind in _END_OF_STREAM:
                    return
        except Exception as e:  # the neighbour died or the link broke: the stage must stop
            self.inbox.put(_Message("lost", {"error": f"{type(e).__name__}: {e}"}, None, origin))

    def fetch(self, msg: _Message, device: str) -> torch.Tensor | None:
        """The message's tensor on ``device`` (received from the NCCL data link when it travels there)."""
        if msg.tensor is not None or msg.shape is None:
            return None if msg.tensor is None else msg.tensor.to(device)
        group = self.links.from_prev_data if msg.origin == "prev" else self.links.from_next_data
        peer = self.topo.prev_rank if msg.origin == "prev" else self.topo.next_rank
        flat = torch.empty(math.prod(msg.shape), dtype=msg.dtype, device=device)
        dist.recv(flat, src=peer, group=group)
        msg.tensor = flat.view(msg.shape)
        return msg.tensor

    def send(self, to: str, kind: str, meta: dict[str, Any], tensor: torch.Tensor | None = None) -> None:
        """Send to the ``"next"`` or ``"prev"`` stage; returns before the bytes have left (keeps them alive)."""
        if to == "next":
            group, data_group, peer = self.links.to_next, self.links.to_next_data, self.topo.next_rank
        else:
            group, data_group, peer = self.links.to_prev, self.links.to_prev_data, self.topo.prev_rank
        self.flush(to)
        meta = dict(meta)
        flat = None
        if tensor is not None:
            flat = tensor.detach().contiguous().view(-1)
            meta["_shape"], meta["_dtype"] = tuple(tensor.shape), tensor.dtype
        raw = torch.frombuffer(
            bytearray(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)), dtype=torch.uint8
        )
        header = torch.tensor([_KINDS.index(kind), raw.numel(), 0 if flat is None else flat.numel()])
        works = [dist.isend(header, dst=peer, group=group), dist.isend(raw, dst=peer, group=group)]
        if flat is not None:
            works.append(dist.isend(flat, dst=peer, group=data_group if data_group is not None else group))
        self._outstanding[to] = [works, header, raw, flat]

    def flush(self, to: str | None = None) -> None:
        """Wait until the outstanding sends (to one side, or to both) have left; raises if the peer is gone."""
        for side in (to,) if to else ("next", "prev"):
            pending, self._outstanding[side] = self._outstanding[side], []
            for w in pending[0] if pending else ():
                w.wait()

    def send_abort(self, to: str, text: str) -> None:
        """Best effort: tell a neighbour that the run stops (it may be the one that died); a few seconds at most."""
        group, peer = (
            (self.links.to_next, self.topo.next_rank)
            if to == "next"
            else (self.links.to_prev, self.topo.prev_rank)
        )
        raw = torch.frombuffer(bytearray(pickle.dumps({"error": text})), dtype=torch.uint8)
        header = torch.tensor([_KINDS.index("abort"), raw.numel(), 0])
        try:
            for w in (dist.isend(header, dst=peer, group=group), dist.isend(raw, dst=peer, group=group)):
                w.wait(timeout=timedelta(seconds=5))
        except Exception:  # a dead neighbour cannot be told
            pass

    def get(self, block: bool) -> _Message | None:
        try:
            return self.inbox.get(block=block)
        except queue.Empty:
            return None


def _batch_meta(batch: FusedBatch) -> dict[str, Any]:
    """What another stage needs to rebuild ``batch`` (small CPU tensors and tuples)."""
    return {
        "input_ids": batch.input_ids.cpu(),
        "positions": batch.positions.cpu(),
        "cu_seqlens": batch.cu_seqlens.cpu(),
        "labels": None if batch.labels is None else batch.labels.cpu(),
        "segments": [(s.adapter, s.start, s.end) for s in batch.segments],
        "sequences": [(s.task, s.example, s.role, s.key) for s in batch.sequences],
    }


def _batch_from_meta(meta: dict[str, Any], device: str) -> FusedBatch:
    return FusedBatch(
        input_ids=meta["input_ids"].to(device),
        positions=meta["positions"].to(device),
        cu_seqlens=meta["cu_seqlens"].to(device),
        segments=tuple(Segment(*s) for s in meta["segments"]),
        labels=None if meta["labels"] is None else meta["labels"].to(device),
        sequences=tuple(SequenceInfo(*s) for s in meta["sequences"]),
    )


# -- one stage ----------------------------------------------------------------------------------------------


@dataclass
class _InFlight:
    """A micro-batch between its forward and its backward on this stage."""

    mb: int
    tasks: tuple[str, ...]  # tasks with a segment in it
    ends: tuple[str, ...]  # tasks whose optimizer step it completes
    x_TE: torch.Tensor | None  # the received activations (leaf with grad); None on the first stage
    y_TE: torch.Tensor  # this stage's output, sent on


@dataclass
class _StageTask:
    """A task as one stage sees it: the ``Task`` (its slice of the adapter) plus pipeline bookkeeping.

    ``core.step_norm`` (the step's denominators) is computed by the first stage and sent to the last one,
    which computes the losses; ``core.step_loss``, ``step_tokens`` and ``step_metrics`` add up there.
    """

    core: Task
    awaiting_norm: bool = False  # stepped once the first stage announces the total gradient norm
    awaiting_eval: bool = False  # stepped; its step ends when its evaluation's result arrives
    inflight: int = 0  # micro-batches on this stage with a segment of this task
    retired: bool = False  # finished or failed: no later micro-batch contains it
    finished_at: float | None = None


@dataclass
class PipelineResult:
    """What a pipeline run returns on every rank; ``states`` and ``trace`` are complete on rank 0 only."""

    states: dict[str, TaskState]
    trace: list[dict[str, Any]]  # spans of every stage (see ``trace_summary``)
    finish_s: dict[str, float]  # when each task finished, in seconds since its replica's loop began
    topology: Topology
    wall_s: float  # this rank's loop, from the first plan to the end of the run


class _Stage:
    """The loop of one stage (see the module docstring); ``run()`` returns when the whole pipeline is done."""

    def __init__(
        self, cfg: RunConfig, topo: Topology, links: Links, model: Decoder, tokenizer, progress: bool
    ) -> None:
        self.cfg, self.topo, self.model = cfg, topo, model
        self.device = topo.torch_device
        self.progress = progress
        self.output_dir = Path(cfg.output_dir)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=True) if topo.is_last else None
        self.tasks: dict[str, _StageTask] = {}
        datasets = {d.name: d for d in cfg.datasets}
        adapters = {a.name: a for a in cfg.adapters}
        p = topo.num_stages
        for i, task in enumerate(cfg.tasks):
            if topo.replica_of_task(i) != topo.replica:
                continue
            eval_dataset = datasets[task.eval_dataset] if task.eval_dataset else None
            root = self.output_dir / "checkpoints" / task.name / f"stage-{topo.stage}-of-{p}"
            core = Task(
                cfg, model, tokenizer, datasets[task.dataset], adapters[task.adapter], task, i,
                checkpoint_dir=root, eval_dataset=eval_dataset, layers=tuple(topo.layers),
            )  # fmt: skip
            self.tasks[task.name] = _StageTask(core=core)
        self.inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self.fwd_ready: deque[_Message] = deque()
        self.bwd_ready: deque[_Message] = deque()
        self.next_mb = 0
        # Announcements for the next forward message (first stage): total squared norms, retired tasks.
        self.announce_norms: dict[str, float] = {}
        self.announce_retired: dict[str, tuple[str, str | None]] = {}
        # Travelling back with the next backward message (stages after the first): slices, failures.
        self.out_exports: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self.out_failed: dict[str, str] = {}
        self.collected: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # first stage: slices per stage
        self.exported: set[str] = set()
        self._stop_ack: list[_Message] = []
        self.trace: list[dict[str, Any]] = []
        self.waited: dict[str, int] = {}  # dispatcher fairness, as the engine keeps it
        # Evaluation: batches still to send (first stage), loss sums of running evaluations (last stage).
        self.eval_queue: deque[tuple[list[str], FusedBatch, list[str]]] = deque()
        self.eval_sums: dict[str, EvalSums] = {}
        # Last: every mistake in data or adapters is raised above, before any thread waits on a link.
        self.transport = _Transport(topo, links)

    # -- the loop ---------------------------------------------------------------------------------------------

    def run(self) -> None:
        self.t_start = time.time()
        self._resume()
        topo = self.topo
        limit = self.cfg.pipeline.max_in_flight
        while True:
            self._drain(block=False)
            if self.bwd_ready:
                msg = self.bwd_ready.popleft()
                if msg.kind == "bwd":
                    self._backward(msg)
                else:
                    self._eval_result_received(msg)
            elif self.fwd_ready and (
                topo.is_last or len(self.inflight) < limit or self.fwd_ready[0].kind == "stop"
            ):
                msg = self.fwd_ready.popleft()
                # Applied in order: every earlier micro-batch has passed its forward here by now.
                self._apply_announcements(msg.meta)
                if msg.kind == "stop":
                    self._on_stop(msg)
                    return
                self._forward_received(msg)
            elif topo.is_first and len(self.inflight) < limit and self._dispatch():
                pass
            elif topo.is_first and not self.inflight and not self._evaluating():
                self._stop()
                return
            else:
                self._drain(block=True)

    def _drain(self, block: bool) -> None:
        """Sort arrived messages into the ready queues (waiting for one first when ``block``)."""
        msg = self.transport.get(block)
        while msg is not None:
            if msg.kind in ("abort", "lost"):
                self._fail_from_neighbour(msg)
            elif msg.kind in ("fwd", "stop"):
                self.fwd_ready.append(msg)
            elif msg.kind in ("bwd", "evr"):
                self.bwd_ready.append(msg)
            elif msg.kind == "stop_ack":
                self._stop_ack.append(msg)
            msg = self.transport.get(False)

    # -- forward ------------------------------------------------------------------------------------------------

    def _dispatch(self) -> bool:
        """First stage: plan, pack and forward the next micro-batch; False when no task can run now."""
        if self.eval_queue:
            names, batch, ends = self.eval_queue.popleft()
            meta = {"mb": -1, "eval": names, "eval_ends": ends, "batch": _batch_meta(batch), "ends": []}
            self._run_eval_forward({**meta, "step_norms": {}}, batch, batch.input_ids)
            return True
        live = [t.core for t in self.tasks.values() if _live(t)]
        plan, self.waited = plan_micro_batch(live, self.cfg, self.waited)
        if not plan:
            return False
        for item in plan:
            t = self.tasks[item.task]
            t.core.start()
            t.core.consume(len(item.examples))  # consumed now: the step's rest may follow at once
        batch = pack_plan(plan, {n: t.core for n, t in self.tasks.items()}, self.device)
        meta = {
            "mb": self.next_mb,
            "batch": _batch_meta(batch),
            "step_norms": {item.task: self.tasks[item.task].core.step_norm for item in plan},
            "ends": [item.task for item in plan if item.ends_step],
        }
        self.next_mb += 1
        self._run_forward(meta, batch, batch.input_ids)
        return True

    def _forward_received(self, msg: _Message) -> None:
        x = self.transport.fetch(msg, self.device)
        batch = _batch_from_meta(msg.meta["batch"], self.device)
        if "eval" in msg.meta:
            self._run_eval_forward(msg.meta, batch, x)
        else:
            self._run_forward(msg.meta, batch, x.requires_grad_(True))

    def _run_forward(self, meta: dict[str, Any], batch: FusedBatch, x: torch.Tensor) -> None:
        tasks = tuple(dict.fromkeys(s.task for s in batch.sequences if s.task is not None))
        ends = tuple(meta["ends"])
        for name in tasks:
            if name in self.tasks:
                self.tasks[name].inflight += 1
                if self.tasks[name].core.started_at is None:
                    self.tasks[name].core.started_at = time.perf_counter()
                if meta["step_norms"].get(name) is not None:
                    self.tasks[name].core.step_norm = meta["step_norms"][name]
        if self.topo.is_last:
            self._forward_backward_last(meta, batch, x, tasks, ends)
            return
        tic = time.time()
        y = self.model.forward_packed(x, batch, apply_head=False)
        self._span("forward", tic, meta["mb"], tasks)
        self._send_forward(meta, y)
        self.inflight[meta["mb"]] = _InFlight(
            meta["mb"], tasks, ends, x if not self.topo.is_first else None, y
        )

    def _send_forward(self, meta: dict[str, Any], y: torch.Tensor) -> None:
        """Send a forward message on; the first stage adds its announcements, later stages pass them on."""
        fwd_meta = {k: meta[k] for k in ("mb", "batch", "step_norms", "ends")}
        fwd_meta.update({k: meta[k] for k in ("eval", "eval_ends") if k in meta})
        if self.topo.is_first:
            fwd_meta["announce_norms"], self.announce_norms = self.announce_norms, {}
            fwd_meta["announce_retired"], self.announce_retired = self.announce_retired, {}
        else:
            fwd_meta["announce_norms"] = meta.get("announce_norms", {})
            fwd_meta["announce_retired"] = meta.get("announce_retired", {})
        self._send("next", "fwd", fwd_meta, y)

    # -- evaluation ---------------------------------------------------------------------------------------------

    def _evaluating(self) -> bool:
        return bool(self.eval_queue) or any(t.awaiting_eval for t in self.tasks.values())

    def _queue_eval(self, t: _StageTask) -> None:
        """First stage: the held-out set of t in fused batches, as the engine's ``evaluate`` packs it."""
        limit = self.cfg.dispatcher.max_tokens_per_micro_batch
        batches = list(eval_batches([t.core.eval_job()], limit, self.device))
        for i, (names, batch) in enumerate(batches):
            self.eval_queue.append((names, batch, [t.core.name] if i == len(batches) - 1 else []))

    def _run_eval_forward(self, meta: dict[str, Any], batch: FusedBatch, x: torch.Tensor) -> None:
        """An evaluation batch: forward without gradients, in eval mode (no dropout); the last stage adds
        the loss shares and, after a task's last batch, hands its result back."""
        tic = time.time()
        self.model.eval()
        try:
            with torch.no_grad():
                y = self.model.forward_packed(x, batch, apply_head=False)
                if self.topo.is_last:
                    for name in meta["eval"]:
                        if name not in self.eval_sums:
                            self.eval_sums[name] = EvalSums([self.tasks[name].core.eval_job()])
                        self.eval_sums[name].add(self.model.lm_head, y, batch, [name])
        finally:
            self.model.train()
        self._span("eval", tic, -1, meta["eval"])
        if not self.topo.is_last:
            self._send_forward(meta, y)
            return
        for name in meta["eval_ends"]:
            self._eval_result(name, self.eval_sums.pop(name).results()[name])

    def _eval_result_received(self, msg: _Message) -> None:
        for name, reason in msg.meta.get("failed", {}).items():
            self._note_failure(name, reason)
        for name, slices in msg.meta.get("exports", {}).items():
            self._note_exports(name, slices)
        self._eval_result(msg.meta["task"], msg.meta["result"])

    def _eval_result(self, name: str, result: EvalResult) -> None:
        """Every stage: the task's evaluation after its step (early stopping alike everywhere), then the
        rest of the step; relayed towards the first stage."""
        t = self.tasks[name]
        t.awaiting_eval = False
        if _live(t):
            events = t.core.record_eval(result)
            if self.metrics is not None:
                for event in events:
                    self.metrics.write(event.record())
            self._end_step(t)
        if not self.topo.is_first:
            meta = {"task": name, "result": result}
            meta["failed"], self.out_failed = self.out_failed, {}
            meta["exports"], self.out_exports = self.out_exports, {}
            self._send("prev", "evr", meta)
        self._remove_retired()

    def _forward_backward_last(self, meta, batch: FusedBatch, x: torch.Tensor, tasks, ends) -> None:
        """Last stage: forward, every task's loss, backward; the input gradient goes straight back."""
        tic = time.time()
        hidden = self.model.forward_packed(x, batch, apply_head=False)
        total = None
        for name in tasks:
            t = self.tasks.get(name)
            if t is None or not _live(t):
                continue
            share = t.core.kind.loss(self.model.lm_head, hidden, batch, name, t.core.step_norm)
            failure = t.core.add_share(share)
            if failure is not None:
                self._report_failure(t, failure)
                continue
            total = share.loss if total is None else total + share.loss
        if total is not None and total.requires_grad:
            total.backward()
        self._span("forward+backward", tic, meta["mb"], tasks)
        rec = _InFlight(meta["mb"], tasks, ends, x, hidden)
        self._finish_backward(rec, {}, None if self.topo.is_first else x.grad)

    # -- backward -----------------------------------------------------------------------------------------------

    def _backward(self, msg: _Message) -> None:
        mb, rec = self.inflight.popitem(last=False)
        assert mb == msg.meta["mb"], f"backward of micro-batch {msg.meta['mb']} arrived, expected {mb}"
        grad = self.transport.fetch(msg, self.device)
        tic = time.time()
        if rec.y_TE.requires_grad:
            rec.y_TE.backward(grad)
        self._span("backward", tic, mb, rec.tasks)
        for name, reason in msg.meta.get("failed", {}).items():
            self._note_failure(name, reason)
        for name, slices in msg.meta.get("exports", {}).items():
            self._note_exports(name, slices)
        grad_in = (
            None
            if self.topo.is_first
            else (rec.x_TE.grad if rec.x_TE.grad is not None else torch.zeros_like(rec.x_TE))
        )
        self._finish_backward(rec, msg.meta.get("grad_sq", {}), grad_in)

    def _finish_backward(self, rec: _InFlight, grad_sq_after: dict[str, float], grad_in) -> None:
        """After a micro-batch's backward here: pass the gradient (and norms) back, then step what it ends.

        ``grad_sq_after``: per clipped task ending its step, the squared gradient norm of the later stages.
        """
        norms = dict(grad_sq_after)
        clipped = []
        for name in rec.ends:
            t = self.tasks.get(name)
            if t is not None and _live(t) and t.core.clips:
                norms[name] = norms.get(name, 0.0) + t.core.grad_norm_sq()
                clipped.append(name)
        if not self.topo.is_first:
            meta = {"mb": rec.mb, "grad_sq": norms}
            meta["failed"], self.out_failed = self.out_failed, {}
            meta["exports"], self.out_exports = self.out_exports, {}
            self._send("prev", "bwd", meta, grad_in)
        for name in rec.tasks:
            if name in self.tasks:
                self.tasks[name].inflight -= 1
        for name in rec.ends:
            t = self.tasks.get(name)
            if t is None or not _live(t):
                continue
            if name not in clipped:
                self._step(t, None)
            elif self.topo.is_first:
                self.announce_norms[name] = norms[name]
                self._step(t, math.sqrt(norms[name]))
            else:
                t.awaiting_norm = True
        self._remove_retired()

    def _apply_announcements(self, meta: dict[str, Any]) -> None:
        """A forward or stop message from the first stage: total norms to step with, tasks that stopped."""
        for name, total_sq in meta.get("announce_norms", {}).items():
            t = self.tasks.get(name)
            if t is not None and t.awaiting_norm:
                t.awaiting_norm = False
                self._step(t, math.sqrt(total_sq))
        for name, (status, error) in meta.get("announce_retired", {}).items():
            t = self.tasks.get(name)
            if t is not None and not t.retired:
                t.awaiting_norm = False
                self._retire(t, status, error)
        self._remove_retired()

    # -- optimizer steps, failures, exports ----------------------------------------------------------------------

    def _step(self, t: _StageTask, grad_norm: float | None) -> None:
        """Step task t's optimizer for this stage's slice (``grad_norm``: the total over every stage)."""
        tic = time.time()
        core = t.core
        out = core.optimizer_step(grad_norm)
        self._span("step", tic, -1, (core.name,))
        if not isinstance(out, StepEvent):
            self._report_failure(t, out)
            return
        if self.topo.is_last:
            self._log_step(out)
        if core.eval_due():
            t.awaiting_eval = True
            if self.topo.is_first:
                self._queue_eval(t)
            return
        self._end_step(t)

    def _end_step(self, t: _StageTask) -> None:
        """After a step (and its evaluation): checkpoint; finish the task or queue its next step."""
        core = t.core
        if core.save_due():
            core.save()
        if core.done:
            self._queue_export(t)
            self._retire(t, "succeeded", None)
        else:
            core.begin_step()

    def _log_step(self, event: StepEvent) -> None:
        self.metrics.write(event.record())
        if self.progress:
            core = self.tasks[event.task].core
            print(
                f"[stage {self.topo.stage}] {event.task} step {event.step}/{core.state.total_steps} "
                f"loss {event.loss:.4f}",
                flush=True,
            )

    def _report_failure(self, t: _StageTask, reason: str) -> None:
        """A failure seen here: the first stage decides, the others tell it with the next backward message."""
        if self.topo.is_first:
            self._note_failure(t.core.cfg.name, reason)
        else:
            self.out_failed[t.core.cfg.name] = reason
            t.core.state.status, t.core.state.error = "failed", reason

    def _note_failure(self, name: str, reason: str) -> None:
        """First stage: task ``name`` failed (here or on a later stage); relayed on other stages."""
        t = self.tasks.get(name)
        if t is None:
            return
        if not self.topo.is_first:
            self.out_failed[name] = reason
            return
        if t.core.state.status in ("queued", "running"):
            self._retire(t, "failed", reason)
        elif t.core.state.status == "succeeded" and name not in self.exported:
            t.core.state.status, t.core.state.error = "failed", reason
            self.collected.pop(name, None)

    def _retire(self, t: _StageTask, status: str, error: str | None) -> None:
        """No later micro-batch contains t; its adapter leaves this stage once none in flight does."""
        if t.retired:
            return
        t.retired = True
        t.finished_at = time.time()
        t.core.state.status, t.core.state.error = status, error
        t.core.pending = []
        if self.topo.is_first:
            self.announce_retired[t.core.cfg.name] = (status, error)
            if t.core.started_at is not None:  # its wall time in the pipeline: tokens/s in the summary
                t.core.state.busy_s = time.perf_counter() - t.core.started_at

    def _remove_retired(self) -> None:
        for t in self.tasks.values():
            if t.retired and t.inflight == 0 and t.core.params:
                t.core.release(self.model)

    def _queue_export(self, t: _StageTask) -> None:
        state = t.core.final_state()
        if self.topo.is_first:
            self._note_exports(t.core.cfg.name, {0: state})
        else:
            self.out_exports.setdefault(t.core.cfg.name, {})[self.topo.stage] = state

    def _note_exports(self, name: str, slices: dict[int, dict[str, torch.Tensor]]) -> None:
        """Slices of a finished adapter: relayed towards the first stage, which writes the PEFT folder."""
        if not self.topo.is_first:
            self.out_exports.setdefault(name, {}).update(slices)
            return
        got = self.collected.setdefault(name, {})
        got.update(slices)
        if len(got) == self.topo.num_stages:
            t = self.tasks[name]
            merged = {k: v for s in sorted(got) for k, v in got[s].items()}
            t.core.export(self.output_dir / "adapters" / t.core.spec.name, merged)
            del self.collected[name]
            self.exported.add(name)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        """Every stage of a replica restarts each task from the newest step all of them have saved."""
        mine = {name: t.core.saved_steps() for name, t in self.tasks.items()}
        everyone: list[Any] = [None] * self.topo.world_size
        dist.all_gather_object(everyone, (self.topo.replica, mine))
        for name, t in self.tasks.items():
            sets = [set(m.get(name, [])) for r, m in everyone if r == self.topo.replica]
            common = set.intersection(*sets) if sets else set()
            if common and t.core.resume(max(common)) and t.core.done:
                self._queue_export(t)
                self._retire(t, "succeeded", None)
                continue
            t.core.begin_step()
        self.announce_retired = {}  # every stage resumed the same, nothing to announce
        self._remove_retired()

    # -- the end of the run and faults -----------------------------------------------------------------------------

    def _stop(self) -> None:
        """First stage: no work left and nothing in flight; tell the others and collect what they hold."""
        meta = {"announce_norms": self.announce_norms, "announce_retired": self.announce_retired}
        if not self.topo.is_last:
            self._send("next", "stop", meta)
            self._await_stop_ack()

    def _on_stop(self, msg: _Message) -> None:
        if not self.topo.is_last:
            self._send("next", "stop", msg.meta)
            self._await_stop_ack()
        self._remove_retired()
        self._send("prev", "stop_ack", {"failed": self.out_failed, "exports": self.out_exports})
        self.transport.flush()

    def _await_stop_ack(self) -> None:
        while not self._stop_ack:
            self._drain(block=True)
        ack = self._stop_ack[0]
        for name, reason in ack.meta.get("failed", {}).items():
            self._note_failure(name, reason)
        for name, slices in ack.meta.get("exports", {}).items():
            self._note_exports(name, slices)

    def _fail_from_neighbour(self, msg: _Message) -> None:
        side = msg.origin
        peer_stage = self.topo.stage - 1 if side == "prev" else self.topo.stage + 1
        peer_rank = self.topo.rank_of(peer_stage)
        if msg.kind == "abort":
            text = msg.meta["error"]
        else:
            text = (
                f"stage {peer_stage} (rank {peer_rank}) stopped answering: the process died or its link broke "
                f"({msg.meta['error']})"
            )
        self._abort(text, skip=side)

    def _abort(self, text: str, skip: str | None = None) -> None:
        """Tell the neighbours (but ``skip``) that the run stops, then raise; best effort, bounded."""
        for side in ("prev", "next"):
            if (
                side == skip
                or (side == "prev" and self.topo.is_first)
                or (side == "next" and self.topo.is_last)
            ):
                continue
            self.transport.send_abort(side, text)
        raise PipelineError(text)

    def _send(self, to: str, kind: str, meta: dict[str, Any], tensor: torch.Tensor | None = None) -> None:
        try:
            self.transport.send(to, kind, meta, tensor)
        except Exception as e:
            peer_stage = self.topo.stage + (1 if to == "next" else -1)
            self._abort(
                f"stage {peer_stage} (rank {self.topo.rank_of(peer_stage)}) stopped answering: the process died or "
                f"its link broke ({type(e).__name__}: {e})",
                skip=to,
            )

    def _span(self, name: str, start: float, mb: int, tasks) -> None:
        self.trace.append(
            {
                "name": name,
                "start": start,
                "end": time.time(),
                "mb": mb,
                "tasks": list(tasks),
                "stage": self.topo.stage,
            }
        )


def _live(t: _StageTask) -> bool:
    return not t.retired and t.core.state.status in ("queued", "running")


# -- the run -------------------------------------------------------------------------------------------------


def run_pipeline(cfg: RunConfig, progress: bool = False, timeout_s: float = 1800.0) -> PipelineResult:
    """Run this process's stage of ``cfg`` under torchrun (RANK, WORLD_SIZE, ... in the environment).

    Every rank returns when the whole pipeline is done; rank 0's result holds every task's final state
    and the merged trace (also written to ``OUTPUT_DIR/trace.json``). A failed or dead stage makes every
    other stage raise ``PipelineError`` naming it. ``timeout_s`` bounds any single wait on a live peer.
    """
    from ..metrics import plot_curves, read_metrics
    from ..models.tokenizer import load_tokenizer

    device = resolve_device(cfg.base_model.device)
    model_cfg = read_model_config(cfg.base_model.path)
    topo = Topology.from_env(model_cfg, cfg.pipeline, device=device.type)
    if topo.num_replicas > len(cfg.tasks):
        raise ValueError(
            f"{topo.num_replicas} pipeline replicas (WORLD_SIZE {topo.world_size} / pipeline.stages "
            f"{topo.num_stages}) but only {len(cfg.tasks)} tasks: each replica trains whole tasks, so run at most "
            f"{len(cfg.tasks)} x {topo.num_stages} = {len(cfg.tasks) * topo.num_stages} processes"
        )
    if device.type == "cuda":
        torch.cuda.set_device(topo.local_rank)
    links = topo.connect(timeout_s)
    if topo.rank == 0:
        print(topo.describe(model_cfg), flush=True)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.base_model.dtype]
    first, last = topo.layers
    model = load_model(cfg.base_model.path, dtype, topo.torch_device, first, last)
    if cfg.base_model.quantize is not None:  # as the engine does: the stage's projections, before adapters
        from ..models.quant import quantize_model

        quantize_model(model, cfg.base_model.quantize)
    model.train()  # as the engine: adapter dropout is active in training mode only
    if cfg.recompute:  # per-layer activation checkpointing; parameter names (PEFT keys) unchanged
        from ..models.recompute import apply_recompute

        apply_recompute(model)
    base_params = _param_count(model)
    stage = _Stage(cfg, topo, links, model, load_tokenizer(cfg.base_model.path), progress)
    print(_memory_line(topo, model_cfg, dtype, base_params, _param_count(model) - base_params), flush=True)
    tic = time.time()
    try:
        stage.run()
    except PipelineError:
        raise
    except Exception as e:
        traceback.print_exc()
        try:
            stage._abort(f"stage {topo.stage} (rank {topo.rank}) failed: {type(e).__name__}: {e}")
        except PipelineError as pe:
            raise pe from e
    wall = time.time() - tic
    if stage.metrics is not None:
        stage.metrics.close()
    finish = {n: t.finished_at - stage.t_start for n, t in stage.tasks.items() if t.finished_at is not None}
    mine = (
        topo.replica,
        topo.stage,
        {n: asdict(t.core.state) for n, t in stage.tasks.items()},
        stage.trace,
        finish,
    )
    gathered: list[Any] = [None] * topo.world_size if topo.rank == 0 else []
    dist.gather_object(mine, gathered if topo.rank == 0 else None, dst=0)
    states: dict[str, TaskState] = {}
    events: list[dict[str, Any]] = []
    finish_s: dict[str, float] = {}
    if topo.rank == 0:
        states = _merge_states(gathered, topo.num_stages, [t.name for t in cfg.tasks])
        for replica, s, _, trace, finished in gathered:
            events.extend({**e, "replica": replica} for e in trace)
            finish_s.update(finished if s == 0 else {})
        out = Path(cfg.output_dir)
        (out / "trace.json").write_text(json.dumps(_chrome_trace(events, topo)))
        records = read_metrics(out / "metrics.jsonl")
        if records:
            plot_curves(records, out / "loss.png")
    dist.barrier()
    dist.destroy_process_group()
    return PipelineResult(states=states, trace=events, finish_s=finish_s, topology=topo, wall_s=wall)


def _param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _memory_line(topo: Topology, model_cfg, dtype: torch.dtype, base: int, adapters: int) -> str:
    """This stage's resident parameters against the whole model's (counted on the meta device, no memory)."""
    whole = _param_count(Decoder(model_cfg, dtype=dtype, device="meta"))
    a, b = topo.layers
    nbytes = base * torch.finfo(dtype).bits // 8
    return (
        f"stage {topo.stage} (rank {topo.rank}): layers [{a}, {b}) hold {base:,} base parameters "
        f"({nbytes / 2**20:.1f} MiB) = {100 * base / whole:.1f}% of the model's {whole:,} "
        f"(1/{topo.num_stages} = {100 / topo.num_stages:.1f}%), plus {adapters:,} adapter parameters"
    )


def _merge_states(gathered: list[Any], num_stages: int, order: list[str]) -> dict[str, TaskState]:
    """Each task's state: status and steps from its first stage, loss and tokens from its last."""
    first = {n: st for _, s, states, *_ in gathered if s == 0 for n, st in states.items()}
    last = {n: st for _, s, states, *_ in gathered if s == num_stages - 1 for n, st in states.items()}
    out = {}
    for name in order:
        st = TaskState(**first[name])
        st.last_loss, st.tokens = last[name]["last_loss"], last[name]["tokens"]
        out[name] = st
    return out


def _chrome_trace(events: list[dict[str, Any]], topo: Topology) -> dict[str, Any]:
    """Chrome trace format: one process per replica, one thread per stage, one complete event per span."""
    t0 = min((e["start"] for e in events), default=0.0)
    out: list[dict[str, Any]] = []
    for r in range(topo.num_replicas):
        out.append({"name": "process_name", "ph": "M", "pid": r, "args": {"name": f"replica {r}"}})
        for s in range(topo.num_stages):
            name = f"stage {s} (rank {topo.rank_of(s, r)})"
            out.append({"name": "thread_name", "ph": "M", "pid": r, "tid": s, "args": {"name": name}})
    for e in events:
        label = e["name"] if e["mb"] < 0 else f"{e['name']} #{e['mb']}"
        out.append(
            {
                "name": label,
                "cat": e["name"],
                "ph": "X",
                "ts": round((e["start"] - t0) * 1e6, 1),
                "dur": round((e["end"] - e["start"]) * 1e6, 1),
                "pid": e["replica"],
                "tid": e["stage"],
                "args": {"tasks": e["tasks"]},
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": {"summary": trace_summary(events)}}


def trace_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Busy and idle time per stage, over the whole run and in steady state.

    Steady state (per replica) runs from the moment the last stage starts its first micro-batch (the
    pipeline is full) to the end of the first stage's last forward (the drain begins). Idle fraction =
    1 - busy / window, busy being the union of the stage's forward, backward and step spans.
    """
    out: dict[str, Any] = {}
    for replica in sorted({e.get("replica", 0) for e in events}):
        evs = [e for e in events if e.get("replica", 0) == replica]
        stages = sorted({e["stage"] for e in evs})
        last = [e["start"] for e in evs if e["stage"] == stages[-1]]
        first_fwd = [e["end"] for e in evs if e["stage"] == stages[0] and e["name"].startswith("forward")]
        lo, hi = (min(last), max(first_fwd)) if last and first_fwd else (0.0, 0.0)
        run_lo, run_hi = min(e["start"] for e in evs), max(e["end"] for e in evs)
        for s in stages:
            spans = [(e["start"], e["end"]) for e in evs if e["stage"] == s]
            busy_all = _union(spans, run_lo, run_hi)
            busy_steady = _union(spans, lo, hi)
            out[f"replica {replica} stage {s}"] = {
                "busy_s": round(busy_all, 4),
                "idle_fraction": round(1 - busy_all / max(1e-9, run_hi - run_lo), 4),
                "steady_window_s": round(max(0.0, hi - lo), 4),
                "steady_idle_fraction": round(1 - busy_steady / (hi - lo), 4) if hi > lo else None,
            }
    return out


def _union(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length of the union of ``spans`` clipped to ``[lo, hi]``."""
    total, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total
