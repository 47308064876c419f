"""One pipeline stage: its messages, forward, backward and evaluation batches.

See ``parallel/pipeline.py`` for the schedule and its guarantees. Each stage holds ``Task`` objects for its
slice of every adapter (``train/task.py``), so a step means the same as in the single-process engine; the
task bookkeeping (adds, steps, checkpoints, failures, exports) is ``TaskBook`` (``stage_tasks.py``). Stage 0
is the coordinator (``coordinator.py`` drives it through ``dispatch`` and ``work_once``); the other stages
run ``follow`` until the coordinator stops them.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..batch import FusedBatch
from ..config import RunConfig
from ..models import Decoder
from ..train.engine import pack_plan, plan_micro_batch
from ..train.evaluate import EvalResult, EvalSums, eval_batches
from ..train.events import Event, StatusEvent
from .messages import (
    BACKWARD_KINDS,
    FORWARD_KINDS,
    Abort,
    Backward,
    BatchMeta,
    Control,
    EvalDone,
    Forward,
    Relay,
    StepResult,
    Stop,
    StopAck,
    Sync,
    SyncAck,
)
from .stage_tasks import StageTask, TaskBook, live
from .topology import Links, Topology
from .transport import Envelope, PipelineError, Transport

__all__ = ["Stage", "StageTask"]

_TRACE_SPANS = 50_000  # the newest spans kept (a long-lived service worker must not grow)


@dataclass
class _InFlight:
    """A micro-batch between its forward and its backward on this stage."""

    mb: int
    tasks: tuple[str, ...]  # tasks with a segment in it
    ends: tuple[str, ...]  # tasks whose optimizer step it completes
    x_TE: torch.Tensor | None  # the received activations (leaf with grad); None on the first stage
    y_TE: torch.Tensor  # this stage's output, sent on


class Stage(TaskBook):
    """One stage (see the module docstring). ``emit`` receives the coordinator's events (stage 0 only)."""

    def __init__(
        self, cfg: RunConfig, topo: Topology, links: Links, model: Decoder, tokenizer, progress: bool,
        emit: Callable[[Event], None] | None = None,
    ) -> None:  # fmt: skip
        self.cfg, self.topo, self.model, self.tokenizer = cfg, topo, model, tokenizer
        self.device = topo.torch_device
        self.progress = progress
        self.emit = emit if topo.is_first else None
        self.output_dir = Path(cfg.output_dir)
        self.tasks: dict[str, StageTask] = {}
        self._init_book()
        self.inflight: OrderedDict[int, _InFlight] = OrderedDict()
        self.fwd_ready: deque[Envelope] = deque()
        self.bwd_ready: deque[Envelope] = deque()
        self.next_mb = 0
        self.control = Control()
        self.relay = Relay()
        self.syncs_acked = 0  # coordinator: SyncAck messages received
        self.stopped = False
        self._stop_ack: list[StopAck] = []
        self.trace: deque[dict[str, Any]] = deque(maxlen=_TRACE_SPANS)
        self.waited: dict[str, int] = {}  # dispatcher fairness, as the engine keeps it
        # Evaluation: batches still to send (first stage), loss sums of running evaluations (last stage).
        self.eval_queue: deque[tuple[list[str], FusedBatch, list[str]]] = deque()
        self.eval_sums: dict[str, EvalSums] = {}
        self.t_start = time.time()
        self.transport = Transport(topo, links)

    # -- the loop -----------------------------------------------------------------------------------------

    def follow(self) -> None:
        """Every stage but the coordinator: run what arrives until the coordinator stops the pipeline."""
        while not self.stopped:
            if not self.work_once():
                self.drain(block=True)

    def work_once(self) -> bool:
        """Handle one arrived message (a ready backward first); False when none can be handled now."""
        self.drain(block=False)
        if self.bwd_ready:
            self._handle_backward(self.bwd_ready.popleft())
            return True
        limit = self.cfg.pipeline.max_in_flight
        if self.fwd_ready and (
            self.topo.is_last or len(self.inflight) < limit or not isinstance(self.fwd_ready[0].body, Forward)
        ):
            self._handle_forward(self.fwd_ready.popleft())
            return True
        return False

    def drain(self, block: bool) -> None:
        """Sort arrived messages into the ready queues (waiting for one first when ``block``)."""
        env = self.transport.get(block)
        while env is not None:
            body = env.body
            if isinstance(body, FORWARD_KINDS):
                self.fwd_ready.append(env)
            elif isinstance(body, BACKWARD_KINDS):
                self.bwd_ready.append(env)
            elif isinstance(body, StopAck):
                self._stop_ack.append(body)
            else:  # Abort or Lost
                self._fail_from_neighbour(env)
            env = self.transport.get(False)

    def _handle_forward(self, env: Envelope) -> None:
        body = env.body
        # Applied in order: every earlier micro-batch has passed its forward here by now.
        self.apply(body.control)
        if isinstance(body, Forward):
            x = self.transport.fetch(env, self.device)
            batch = body.batch.batch(self.device)
            if body.eval is not None:
                self._run_eval_forward(body, batch, x)
            else:
                self._run_forward(body, batch, x.requires_grad_(True))
        elif isinstance(body, Sync):
            if self.topo.is_last:
                self.send("prev", SyncAck(self.take_relay()))
            else:
                self.send("next", body)
        else:
            self._on_stop(body)

    def _handle_backward(self, env: Envelope) -> None:
        body = env.body
        if isinstance(body, Backward):
            self._backward(env)
            return
        self.absorb(body.relay)
        if isinstance(body, EvalDone):
            self._eval_result(body.task, body.result)
        elif self.topo.is_first:
            self.syncs_acked += 1
        else:
            self.send("prev", SyncAck(self.take_relay()))

    # -- forward --------------------------------------------------------------------------------------------

    def dispatch(self) -> bool:
        """Coordinator: plan, pack and forward the next micro-batch; False when no task can run now."""
        if self.eval_queue:
            names, batch, ends = self.eval_queue.popleft()
            meta = Forward(-1, BatchMeta.of(batch), {}, (), Control(), tuple(names), tuple(ends))
            self._run_eval_forward(meta, batch, batch.input_ids)
            return True
        plan, self.waited = plan_micro_batch(
            [t.core for t in self.tasks.values() if live(t)], self.cfg, self.waited
        )
        if not plan:
            return False
        for item in plan:
            t = self.tasks[item.task]
            if t.core.start() and self.emit is not None:
                self.emit(StatusEvent(item.task, "running"))
            t.core.consume(len(item.examples))  # consumed now: the step's rest may follow at once
        batch = pack_plan(plan, {n: t.core for n, t in self.tasks.items()}, self.device)
        meta = Forward(
            mb=self.next_mb,
            batch=BatchMeta.of(batch),
            step_norms={item.task: self.tasks[item.task].core.step_norm for item in plan},
            ends=tuple(item.task for item in plan if item.ends_step),
            control=Control(),
        )
        self.next_mb += 1
        self._run_forward(meta, batch, batch.input_ids)
        return True

    def _run_forward(self, meta: Forward, batch: FusedBatch, x: torch.Tensor) -> None:
        tasks = tuple(dict.fromkeys(s.task for s in batch.sequences if s.task is not None))
        for name in tasks:
            t = self.tasks.get(name)
            if t is not None:
                t.inflight += 1
                if t.core.started_at is None:
                    t.core.started_at = time.perf_counter()
                if meta.step_norms.get(name) is not None:
                    t.core.step_norm = meta.step_norms[name]
        if self.topo.is_last:
            self._forward_backward_last(meta, batch, x, tasks)
            return
        tic = time.time()
        y = self.model.forward_packed(x, batch, apply_head=False)
        self.span("forward", tic, meta.mb, tasks)
        self._send_forward(meta, y)
        self.inflight[meta.mb] = _InFlight(
            meta.mb, tasks, meta.ends, x if not self.topo.is_first else None, y
        )

    def _send_forward(self, meta: Forward, y: torch.Tensor) -> None:
        """Send a forward message on; the coordinator adds its announcements, later stages pass them on."""
        if self.topo.is_first:
            meta.control = self.take_control()
        self.send("next", meta, y)

    def _forward_backward_last(self, meta: Forward, batch: FusedBatch, x: torch.Tensor, tasks) -> None:
        """Last stage: forward, every task's loss, backward; the input gradient goes straight back."""
        tic = time.time()
        hidden = self.model.forward_packed(x, batch, apply_head=False)
        total = None
        for name in tasks:
            t = self.tasks.get(name)
            if t is None or not live(t):
                continue
            share = t.core.kind.loss(self.model.lm_head, hidden, batch, name, t.core.step_norm)
            failure = t.core.add_share(share)
            if failure is not None:
                self._report_failure(t, failure)
                continue
            total = share.loss if total is None else total + share.loss
        if total is not None and total.requires_grad:
            total.backward()
        self.span("forward+backward", tic, meta.mb, tasks)
        results = {}
        for name in meta.ends:
            t = self.tasks.get(name)
            if t is not None and live(t):
                results[name] = StepResult(t.core.step_loss, t.core.step_tokens, dict(t.core.step_metrics))
        rec = _InFlight(meta.mb, tasks, meta.ends, x, hidden)
        self._finish_backward(rec, {}, results, None if self.topo.is_first else x.grad)

    # -- backward -------------------------------------------------------------------------------------------

    def _backward(self, env: Envelope) -> None:
        msg: Backward = env.body
        mb, rec = self.inflight.popitem(last=False)
        assert mb == msg.mb, f"backward of micro-batch {msg.mb} arrived, expected {mb}"
        grad = self.transport.fetch(env, self.device)
        tic = time.time()
        if rec.y_TE.requires_grad:
            rec.y_TE.backward(grad)
        self.span("backward", tic, mb, rec.tasks)
        self.absorb(msg.relay)
        self.set_results(msg.results)
        grad_in = (
            None
            if self.topo.is_first
            else (rec.x_TE.grad if rec.x_TE.grad is not None else torch.zeros_like(rec.x_TE))
        )
        self._finish_backward(rec, msg.grad_sq, msg.results, grad_in)

    def _finish_backward(self, rec: _InFlight, grad_sq_after: dict[str, float], results, grad_in) -> None:
        """After a micro-batch's backward here: pass the gradient (and norms) back, then step what it ends.

        ``grad_sq_after``: per clipped task ending its step, the squared gradient norm of the later stages.
        """
        norms = dict(grad_sq_after)
        clipped = []
        for name in rec.ends:
            t = self.tasks.get(name)
            if t is not None and live(t) and t.core.clips:
                norms[name] = norms.get(name, 0.0) + t.core.grad_norm_sq()
                clipped.append(name)
        if not self.topo.is_first:
            self.send("prev", Backward(rec.mb, norms, results, self.take_relay()), grad_in)
        for name in rec.tasks:
            if name in self.tasks:
                self.tasks[name].inflight -= 1
        for name in rec.ends:
            t = self.tasks.get(name)
            if t is None or not live(t):
                continue
            if name not in clipped:
                self._step(t, None)
            elif self.topo.is_first:
                if not self.topo.is_last:
                    self.control.norms[name] = norms[name]
                self._step(t, norms[name] ** 0.5)
            else:
                t.awaiting_norm = True
        self.remove_retired()

    # -- evaluation -----------------------------------------------------------------------------------------

    def evaluating(self) -> bool:
        return bool(self.eval_queue) or any(t.awaiting_eval for t in self.tasks.values())

    def queue_eval(self, t: StageTask) -> None:
        """Coordinator: the held-out set of t in fused batches, as the engine's ``evaluate`` packs it."""
        limit = self.cfg.dispatcher.max_tokens_per_micro_batch
        batches = list(eval_batches([t.core.eval_job()], limit, self.device))
        for i, (names, batch) in enumerate(batches):
            self.eval_queue.append((names, batch, [t.core.name] if i == len(batches) - 1 else []))

    def _run_eval_forward(self, meta: Forward, batch: FusedBatch, x: torch.Tensor) -> None:
        """An evaluation batch: forward without gradients, in eval mode (no dropout); the last stage adds
        the loss shares and, after a task's last batch, hands its result back."""
        tic = time.time()
        self.model.eval()
        try:
            with torch.no_grad():
                y = self.model.forward_packed(x, batch, apply_head=False)
                if self.topo.is_last:
                    for name in meta.eval:
                        if name not in self.eval_sums:
                            self.eval_sums[name] = EvalSums([self.tasks[name].core.eval_job()])
                        self.eval_sums[name].add(self.model.lm_head, y, batch, [name])
        finally:
            self.model.train()
        self.span("eval", tic, -1, meta.eval)
        if not self.topo.is_last:
            self._send_forward(meta, y)
            return
        for name in meta.eval_ends:
            self._eval_result(name, self.eval_sums.pop(name).results()[name])

    def _eval_result(self, name: str, result: EvalResult) -> None:
        """Every stage: the task's evaluation after its step (early stopping alike everywhere), then the
        rest of the step; relayed towards the coordinator, which emits its events."""
        t = self.tasks[name]
        t.awaiting_eval = False
        if live(t):
            events = t.core.record_eval(result)
            if self.emit is not None:
                for event in events:
                    self.emit(event)
            self._end_step(t)
        if not self.topo.is_first:
            self.send("prev", EvalDone(name, result, self.take_relay()))
        self.remove_retired()

    # -- the end of the run and faults ----------------------------------------------------------------------

    def sync(self) -> None:
        """Coordinator: send the announcements with nothing to run, and wait until every stage applied them
        (handling what arrives meanwhile); the answers to added tasks come back with it."""
        if self.topo.is_last:
            self.control = Control()
            return
        target = self.syncs_acked + 1
        self.send("next", Sync(self.take_control()))
        while self.syncs_acked < target:
            if not self.work_once():
                self.drain(block=True)

    def stop(self, spans: bool = False) -> list[dict[str, Any]]:
        """Coordinator: tell the others that the run ends and collect what they still hold; with ``spans``
        every stage's trace spans come back too (returned, this stage's first)."""
        out = list(self.trace) if spans else []
        if not self.topo.is_last:
            self.send("next", Stop(self.take_control(), spans))
            out += self._await_stop_ack()
        self.stopped = True
        return out

    def _on_stop(self, msg: Stop) -> None:
        later = []
        if not self.topo.is_last:
            self.send("next", msg)
            later = self._await_stop_ack()
        self.remove_retired()
        self.send("prev", StopAck(self.take_relay(), (list(self.trace) + later) if msg.spans else []))
        self.transport.flush()
        self.stopped = True

    def _await_stop_ack(self) -> list[dict[str, Any]]:
        while not self._stop_ack:
            self.drain(block=True)
        self.absorb(self._stop_ack[0].relay)
        return self._stop_ack[0].spans

    def _fail_from_neighbour(self, env: Envelope) -> None:
        side = env.origin
        peer_stage = self.topo.stage - 1 if side == "prev" else self.topo.stage + 1
        peer_rank = self.topo.rank_of(peer_stage)
        if isinstance(env.body, Abort):
            text = env.body.error
        else:
            text = (
                f"stage {peer_stage} (rank {peer_rank}) stopped answering: the process died or its link broke "
                f"({env.body.error})"
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

    def send(self, to: str, body: Any, tensor: torch.Tensor | None = None) -> None:
        try:
            self.transport.send(to, body, tensor)
        except Exception as e:
            peer_stage = self.topo.stage + (1 if to == "next" else -1)
            self.abort(
                f"stage {peer_stage} (rank {self.topo.rank_of(peer_stage)}) stopped answering: the process died or "
                f"its link broke ({type(e).__name__}: {e})",
                skip=to,
            )

    def span(self, name: str, start: float, mb: int, tasks) -> None:
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
