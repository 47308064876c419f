"""One pipeline stage's loop: dispatch (first stage), forward, backward, steps, evaluation, checkpoints.

See ``parallel/pipeline.py`` for the schedule and its guarantees; each stage holds ``Task`` objects for its
slice of every adapter (``train/task.py``), so a step means the same as in the single-process engine.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..batch import FusedBatch
from ..config import RunConfig
from ..metrics import MetricsWriter
from ..models import Decoder
from ..train.engine import pack_plan, plan_micro_batch
from ..train.evaluate import EvalResult, EvalSums, eval_batches
from ..train.events import StepEvent
from ..train.task import Task
from .topology import Links, Topology
from .transport import Message, PipelineError, Transport, batch_from_meta, batch_meta

__all__ = ["Stage", "StageTask"]


@dataclass
class _InFlight:
    """A micro-batch between its forward and its backward on this stage."""

    mb: int
    tasks: tuple[str, ...]  # tasks with a segment in it
    ends: tuple[str, ...]  # tasks whose optimizer step it completes
    x_TE: torch.Tensor | None  # the received activations (leaf with grad); None on the first stage
    y_TE: torch.Tensor  # this stage's output, sent on


@dataclass
class StageTask:
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


class Stage:
    """The loop of one stage (see the module docstring); ``run()`` returns when the whole pipeline is done."""

    def __init__(
        self, cfg: RunConfig, topo: Topology, links: Links, model: Decoder, tokenizer, progress: bool
    ) -> None:
        self.cfg, self.topo, self.model = cfg, topo, model
        self.device = topo.torch_device
        self.progress = progress
        self.output_dir = Path(cfg.output_dir)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=True) if topo.is_last else None
        self.tasks: dict[str, StageTask] = {}
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
            self.tasks[task.name] = StageTask(core=core)
        self.inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self.fwd_ready: deque[Message] = deque()
        self.bwd_ready: deque[Message] = deque()
        self.next_mb = 0
        # Announcements for the next forward message (first stage): total squared norms, retired tasks.
        self.announce_norms: dict[str, float] = {}
        self.announce_retired: dict[str, tuple[str, str | None]] = {}
        # Travelling back with the next backward message (stages after the first): slices, failures.
        self.out_exports: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        self.out_failed: dict[str, str] = {}
        self.collected: dict[str, dict[int, dict[str, torch.Tensor]]] = {}  # first stage: slices per stage
        self.exported: set[str] = set()
        self._stop_ack: list[Message] = []
        self.trace: list[dict[str, Any]] = []
        self.waited: dict[str, int] = {}  # dispatcher fairness, as the engine keeps it
        # Evaluation: batches still to send (first stage), loss sums of running evaluations (last stage).
        self.eval_queue: deque[tuple[list[str], FusedBatch, list[str]]] = deque()
        self.eval_sums: dict[str, EvalSums] = {}
        # Last: every mistake in data or adapters is raised above, before any thread waits on a link.
        self.transport = Transport(topo, links)

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
            meta = {"mb": -1, "eval": names, "eval_ends": ends, "batch": batch_meta(batch), "ends": []}
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
            "batch": batch_meta(batch),
            "step_norms": {item.task: self.tasks[item.task].core.step_norm for item in plan},
            "ends": [item.task for item in plan if item.ends_step],
        }
        self.next_mb += 1
        self._run_forward(meta, batch, batch.input_ids)
        return True

    def _forward_received(self, msg: Message) -> None:
        x = self.transport.fetch(msg, self.device)
        batch = batch_from_meta(msg.meta["batch"], self.device)
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

    def _queue_eval(self, t: StageTask) -> None:
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

    def _eval_result_received(self, msg: Message) -> None:
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

    def _backward(self, msg: Message) -> None:
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

    def _step(self, t: StageTask, grad_norm: float | None) -> None:
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

    def _end_step(self, t: StageTask) -> None:
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

    def _report_failure(self, t: StageTask, reason: str) -> None:
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

    def _retire(self, t: StageTask, status: str, error: str | None) -> None:
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

    def _queue_export(self, t: StageTask) -> None:
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
            resumed = bool(common) and t.core.resume(max(common))
            if self.metrics is not None:  # the steps after the common checkpoint are logged again
                self.metrics.truncate(name, t.core.state.step)
            if resumed and t.core.done:
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

    def _on_stop(self, msg: Message) -> None:
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

    def _fail_from_neighbour(self, msg: Message) -> None:
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
        self.abort(text, skip=side)

    def abort(self, text: str, skip: str | None = None) -> None:
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
            self.abort(
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


def _live(t: StageTask) -> bool:
    return not t.retired and t.core.state.status in ("queued", "running")
