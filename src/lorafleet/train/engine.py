"""The explicit multi-task training loop for one process.

    lorafleet train examples/demo.yaml          # CPU, the bundled SmolLM2 and four chatterbot adapters

One ``Engine`` holds the frozen base model once and any number of tasks, each with its own adapter, data,
batch size, optimizer, schedule and checkpoints. Each call of ``run_once``:

1. asks the dispatcher (pure policy, ``train/dispatcher.py``) which tasks' next examples form the fused
   micro-batch, within the token budget and the concurrency limit;
2. packs them into one ``FusedBatch`` (each task's sequences contiguous, so each adapter owns one segment);
3. runs the base model once over the whole batch, computes each task's loss on its own sequences only
   (``train/tasks.py``: sft, dpo with the base model as reference rows of the same batch, orpo), and runs
   one backward for the sum (adapters share no parameters, so each adapter's gradient is exactly the one
   it would get alone);
4. steps the optimizer of every task whose optimizer step is now complete and logs it; evaluates, in fused
   batches, the tasks whose evaluation is due (``eval_every_steps``, and after the last step) and applies
   early stopping; checkpoints, and finishes tasks that reached their last step or ran out of patience
   (their adapter is written in PEFT's format: with early stopping, the one of the best evaluation).

Exactness: a task's step loss is the same whatever the split into micro-batches, because its denominators
(e.g. the supervised tokens of the whole step) are known when the step starts and each micro-batch adds
its share. A task whose loss or weights become NaN/inf fails alone; the others go on.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batch import FusedBatch
from ..config import AdapterConfig, DatasetConfig, RunConfig, TaskConfig, steps_for
from ..data.formats import Example, load_examples
from ..data.packing import pack
from ..export.base_ref import adapter_base
from ..lora import (
    AdapterSpec,
    adapter_parameters,
    add_adapter,
    load_peft,
    lora_plus_param_groups,
    read_peft,
    remove_adapter,
    save_peft,
)
from ..metrics import MetricsWriter
from ..models import Decoder, load_model
from ..models.recompute import apply_recompute, remove_recompute
from ..models.tokenizer import load_tokenizer
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .dispatcher import PlanItem, TaskView, next_waited, plan_next
from .evaluate import EarlyStopping, EvalJob, TaskEvaluation, eval_record, evaluate
from .optim import build_optimizer, build_scheduler
from .tasks import StepNorm, TaskKind, pack_groups, task_kind

__all__ = [
    "Engine",
    "TaskState",
    "adapter_spec",
    "build_task",
    "pack_plan",
    "plan_micro_batch",
    "resolve_device",
]

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def resolve_device(device: str) -> torch.device:
    """The torch device of ``base_model.device``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "base_model.device is 'cuda' but no CUDA device is available; use device: cpu or auto"
        )
    return torch.device(device)


def adapter_spec(cfg: AdapterConfig) -> AdapterSpec:
    return AdapterSpec(
        name=cfg.name,
        kind=cfg.type,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=tuple(cfg.target_modules),
    )


def _seed_for(seed: int, *parts: Any) -> int:
    return (seed * 1_000_003 + zlib.crc32(repr(parts).encode())) % (2**63)


@dataclass
class TaskState:
    """What the outside world sees of a task."""

    name: str
    status: str = "queued"
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    last_loss: float | None = None
    tokens: int = 0
    busy_s: float = 0.0  # wall time of the micro-batches this task took part in


@dataclass
class _Task:
    cfg: TaskConfig
    spec: AdapterSpec
    examples: list[Example]
    arrival: int
    state: TaskState
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    pending: list[int] = field(default_factory=list)  # stream positions still to run in this step
    step_norm: StepNorm | None = None  # denominators of the whole current step (train/tasks.py)
    step_loss: float = 0.0  # sum of the step's loss shares so far
    step_tokens: int = 0
    step_metrics: dict[str, float] = field(default_factory=dict)  # sums of the step's metric shares
    started_at: float | None = None
    kind: TaskKind | None = None
    evaluation: TaskEvaluation | None = None  # held-out set and early stopping (eval_dataset)

    def step_record(self, lr: float, grad_norm: float | None, now: float) -> dict[str, Any]:
        """After ``state.step`` was counted: add the step's loss and tokens to the state; its metrics record.

        ``now`` on the clock that ``started_at`` was read from."""
        self.state.last_loss = self.step_loss
        self.state.tokens += self.step_tokens
        record = {
            "task": self.cfg.name,
            "step": self.state.step,
            "loss": self.step_loss,
            "lr": lr,
            "tokens": self.step_tokens,
            **self.step_metrics,
            "elapsed_s": round(now - (self.started_at if self.started_at is not None else now), 4),
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        return record

    def example_at(self, position: int, seed: int) -> Example:
        """The example at position ``position`` of the task's endless stream (epochs back to back)."""
        n = len(self.examples)
        epoch, i = divmod(position, n)
        if self.cfg.shuffle:
            g = torch.Generator().manual_seed(_seed_for(seed, self.cfg.name, epoch))
            i = int(torch.randperm(n, generator=g)[i])
        return self.examples[i]

    def begin_step(self, seed: int) -> None:
        """Queue the examples of the next optimizer step; its denominator is known from now on."""
        bs = self.cfg.batch_size
        self.pending = list(range(self.state.step * bs, (self.state.step + 1) * bs))
        self.step_norm = self.kind.step_norm([self.example_at(p, seed) for p in self.pending])
        self.step_loss, self.step_tokens, self.step_metrics = 0.0, 0, {}

    def view(self, seed: int, waited: int = 0) -> TaskView:
        """What the dispatcher sees of this task (``waited``: micro-batches it was left out of)."""
        return TaskView(
            name=self.cfg.name,
            priority=self.cfg.priority,
            arrival=self.arrival,
            micro_batch_size=self.cfg.micro_batch_size,
            pending=tuple((p, self.kind.num_tokens(self.example_at(p, seed))) for p in self.pending),
            started=self.state.status == "running",
            waited=waited,
        )

    def fingerprint(self, seed: int) -> dict[str, Any]:
        """What must not change between a checkpoint and the run that resumes from it."""
        s = self.spec
        return {
            "adapter": [s.name, s.kind, s.rank, s.alpha, s.use_rslora, sorted(s.target_modules)],
            "task_type": self.cfg.type,
            "num_examples": len(self.examples),
            "batch_size": self.cfg.batch_size,
            "shuffle": self.cfg.shuffle,
            "seed": seed,
            "max_seq_len": self.cfg.max_seq_len,
        }


def plan_micro_batch(
    live: list[_Task], cfg: RunConfig, waited: dict[str, int]
) -> tuple[list[PlanItem], dict[str, int]]:
    """The dispatcher's next fused micro-batch over ``live`` tasks, and the updated fairness counts.

    Shared by the engine and the pipeline's first stage, so both schedule exactly alike.
    """
    views = [t.view(cfg.seed, waited.get(t.cfg.name, 0)) for t in live]
    limit = cfg.dispatcher.max_concurrent_tasks
    plan = plan_next(views, max_tokens=cfg.dispatcher.max_tokens_per_micro_batch, max_concurrent=limit)
    return plan, next_waited(views, plan, max_concurrent=limit)


def build_task(
    cfg: RunConfig,
    model: Decoder,
    tokenizer,
    dataset: DatasetConfig,
    adapter: AdapterConfig,
    task: TaskConfig,
    arrival: int,
) -> _Task:
    """A task ready to train: examples, adapter on ``model`` (all layers or a pipeline stage's), optimizer, schedule.

    Shared by the engine and every pipeline stage, so that both train exactly the same thing.
    """
    examples = load_examples(dataset, tokenizer, task.max_seq_len)
    spec = adapter_spec(adapter)
    if adapter.init_from:
        load_peft(model, adapter.init_from, spec.name, expect=spec)
    else:
        gen = torch.Generator().manual_seed(_seed_for(cfg.seed, "init", spec.name))
        add_adapter(model, spec, generator=gen)
    t = _Task(cfg=task, spec=spec, examples=examples, arrival=arrival, state=TaskState(task.name))
    t.kind = task_kind(task)
    t.state.total_steps = steps_for(task, len(examples))
    t.params = adapter_parameters(model, spec.name)
    opt = task.optimizer
    groups = lora_plus_param_groups(t.params, opt.lr, adapter.lora_plus_ratio)
    t.optimizer = build_optimizer(groups, opt.name, opt.lr, opt.weight_decay, opt.betas, opt.eps)
    sched = task.lr_scheduler
    t.scheduler = build_scheduler(t.optimizer, sched.name, sched.warmup_steps, t.state.total_steps)
    return t


def pack_plan(plan: list[PlanItem], tasks: dict[str, _Task], seed: int, device) -> FusedBatch:
    """The fused micro-batch of a dispatcher plan: one segment per task, in plan order, then base-only rows.

    Each task kind says which sequences an example becomes (``train/tasks.py``); reference rows (a DPO
    task's frozen-base pass) go after every task's own segment.
    """
    own, refs = [], []
    for item in plan:
        t = tasks[item.task]
        items = [(p, t.example_at(p, seed)) for p in item.examples]
        group, ref = pack_groups(t.cfg.name, t.spec.name, t.kind, items)
        own.append(group)
        refs += [ref] if ref is not None else []
    return pack(own + refs, device)


class Engine:
    """Trains every task of a ``RunConfig`` together on one base model (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        model: Decoder | None = None,
        tokenizer=None,
        tensorboard: bool = True,
    ) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.base_model.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.base_model.dtype]
        self.model = model if model is not None else load_model(cfg.base_model.path, dtype, self.device)
        if model is None and cfg.base_model.quantize is not None:
            from ..models.quant import quantize_model

            quantize_model(self.model, cfg.base_model.quantize)
        self.model.train()  # adapter dropout is active in training mode only (evaluation switches to eval)
        # adapter dropout draws from torch's RNG: the config's seed fixes it (a resumed task restores the
        # RNG state of its checkpoint)
        torch.manual_seed(cfg.seed)
        # per-layer activation checkpointing as the config says (also on a model the caller passed in)
        (apply_recompute if cfg.recompute else remove_recompute)(self.model)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.base_model.path)
        self.output_dir = Path(cfg.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=tensorboard)
        self._tasks: dict[str, _Task] = {}
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._arrivals = 0
        self._waited: dict[str, int] = {}  # micro-batches each task was left out of (dispatcher fairness)
        datasets = {d.name: d for d in cfg.datasets}
        adapters = {a.name: a for a in cfg.adapters}
        for task in cfg.tasks:
            eval_dataset = datasets[task.eval_dataset] if task.eval_dataset else None
            self.add_task(datasets[task.dataset], adapters[task.adapter], task, eval_dataset)

    # -- public API -------------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """``callback(event)`` for every step, status change and checkpoint."""
        self._subscribers.append(callback)

    def state(self, name: str) -> TaskState:
        return self._tasks[name].state

    @property
    def states(self) -> dict[str, TaskState]:
        return {n: t.state for n, t in self._tasks.items()}

    def add_task(
        self,
        dataset: DatasetConfig,
        adapter: AdapterConfig,
        task: TaskConfig,
        eval_dataset: DatasetConfig | None = None,
    ) -> None:
        """Add a task (also while others train). Resumes from its checkpoints when the output folder has them.

        ``eval_dataset`` (the dataset ``task.eval_dataset`` names) is the held-out set it is evaluated on.
        """
        if task.name in self._tasks:
            raise ValueError(f"a task named {task.name!r} already exists; task names must be unique")
        # The held-out set first: a bad eval file must not leave the task's adapter on the model.
        held_out = load_examples(eval_dataset, self.tokenizer, task.max_seq_len) if eval_dataset else None
        t = build_task(self.cfg, self.model, self.tokenizer, dataset, adapter, task, self._arrivals)
        if held_out is not None:
            early = EarlyStopping(task.early_stopping_patience)
            t.evaluation = TaskEvaluation(held_out, task.eval_every_steps, early)
        self._arrivals += 1
        self._tasks[task.name] = t
        self._resume(t)
        if t.state.status == "queued":
            self._begin_step(t)
        self._emit({"type": "status", "task": task.name, "status": t.state.status, "error": None})

    def cancel_task(self, name: str) -> None:
        t = self._tasks[name]
        if t.state.status in ("queued", "running"):
            self._finish(t, "cancelled", None, export=False)

    def forget(self, name: str) -> TaskState:
        """Drop a finished task (its examples and state) so a long-lived engine does not grow; returns its state."""
        t = self._tasks[name]
        if t.state.status in ("queued", "running"):
            raise ValueError(
                f"task {name!r} is {t.state.status}; cancel it or let it finish before forgetting it"
            )
        del self._tasks[name]
        self._waited.pop(name, None)
        return t.state

    def run_once(self) -> bool:
        """One fused micro-batch and the optimizer steps it completes; False when no task has work."""
        live = [t for t in self._tasks.values() if t.state.status in ("queued", "running")]
        plan, self._waited = plan_micro_batch(live, self.cfg, self._waited)
        if not plan:
            return False
        tic = time.perf_counter()
        for item in plan:
            t = self._tasks[item.task]
            if t.state.status == "queued":
                t.state.status = "running"
                t.started_at = time.perf_counter()
                self._emit({"type": "status", "task": t.cfg.name, "status": "running", "error": None})
        batch = pack_plan(plan, self._tasks, self.cfg.seed, self.device)
        hidden = self.model.forward_packed(batch.input_ids.to(self.device), batch, apply_head=False)
        total = None
        for item in plan:
            t = self._tasks[item.task]
            share = t.kind.loss(self.model.lm_head, hidden, batch, t.cfg.name, t.step_norm)
            if not torch.isfinite(share.loss):
                msg = f"loss became {float(share.loss.detach())} at step {t.state.step + 1}"
                self._finish(t, "failed", msg, export=False)
                continue
            t.step_loss += float(share.loss.detach())
            t.step_tokens += share.tokens
            for k, v in share.metrics.items():
                t.step_metrics[k] = t.step_metrics.get(k, 0.0) + v
            total = share.loss if total is None else total + share.loss
        if total is not None and total.requires_grad:
            total.backward()
        elapsed = time.perf_counter() - tic
        stepped = []
        for item in plan:
            t = self._tasks[item.task]
            if t.state.status != "running":
                continue
            t.state.busy_s += elapsed
            del t.pending[: len(item.examples)]
            if not t.pending and self._optimizer_step(t):
                stepped.append(t)
        due = [t for t in stepped if t.evaluation and t.evaluation.due(t.state.step, t.state.total_steps)]
        self._evaluate(due)
        for t in stepped:
            self._end_step(t)
        return True

    def run(self, progress: bool = False) -> dict[str, TaskState]:
        """Train until every task has finished; writes the summary table and the loss plot."""
        from ..progress import ProgressView

        view = ProgressView(self) if progress else None
        try:
            while self.run_once():
                if view is not None:
                    view.refresh()
        finally:
            if view is not None:
                view.close()
            self.close()
        return self.states

    def close(self) -> None:
        from ..metrics import plot_curves, read_metrics

        records = read_metrics(self.metrics.path)
        if records:
            plot_curves(records, self.output_dir / "loss.png")
        self.metrics.close()

    # -- internals --------------------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        for cb in self._subscribers:
            cb(event)

    def _begin_step(self, t: _Task) -> None:
        t.begin_step(self.cfg.seed)

    def _optimizer_step(self, t: _Task) -> bool:
        """Step, log and check the task; False when it failed (then it is finished already)."""
        params = list(t.params.values())
        grad_norm = None
        if t.cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.cfg.max_grad_norm))
        lr = t.scheduler.get_last_lr()[0]
        try:
            t.optimizer.step()
        except RuntimeError as e:  # e.g. an update that overflows float32
            self._finish(t, "failed", f"optimizer step {t.state.step + 1} failed: {e}", export=False)
            return False
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        t.state.step += 1
        record = t.step_record(lr, grad_norm, time.perf_counter())
        self.metrics.write(record)
        self._emit({"type": "step", **record})
        if not all(torch.isfinite(p).all() for p in params):
            self._finish(t, "failed", f"adapter weights became NaN/inf at step {t.state.step}", export=False)
            return False
        return True

    def _evaluate(self, tasks: list[_Task]) -> None:
        """Evaluate ``tasks`` on their held-out sets together (fused batches); log; apply early stopping."""
        if not tasks:
            return
        jobs = [EvalJob(t.cfg.name, t.spec.name, t.kind, t.evaluation.examples) for t in tasks]
        results = evaluate(self.model, jobs, self.cfg.dispatcher.max_tokens_per_micro_batch)
        for t in tasks:
            record = eval_record(t.cfg.name, t.state.step, results[t.cfg.name])
            self.metrics.write(record)
            self._emit({"type": "eval", **record})
            ev = t.evaluation
            improved, stop = ev.early.update(record["eval_loss"], t.state.step)
            if improved and ev.early.patience is not None:
                ev.best_state = {k: p.detach().cpu().clone() for k, p in t.params.items()}
                save_peft(
                    self._ckpt_root(t) / "best", t.spec, ev.best_state, adapter_base(self.cfg.base_model)
                )
            if stop and t.state.step < t.state.total_steps:
                ev.stopped_early = True
                early = {"task": t.cfg.name, "step": t.state.step, "kind": "early_stop"}
                early.update(best_step=ev.early.best_step, best_eval_loss=ev.early.best_loss)
                self.metrics.write(early)
                self._emit({"type": "early_stop", **early})

    def _end_step(self, t: _Task) -> None:
        """After a step (and its evaluation): checkpoint; finish the task or queue its next step."""
        stopped = t.evaluation is not None and t.evaluation.stopped_early
        done = t.state.step >= t.state.total_steps or stopped
        if done or t.state.step % t.cfg.save_every_steps == 0:
            self._save(t)
        if done:
            self._finish(t, "succeeded", None, export=True)
        else:
            self._begin_step(t)

    def _fingerprint(self, t: _Task) -> dict[str, Any]:
        return t.fingerprint(self.cfg.seed)

    def _ckpt_root(self, t: _Task) -> Path:
        return self.output_dir / "checkpoints" / t.cfg.name

    def _save(self, t: _Task) -> None:
        state = {"fingerprint": self._fingerprint(t), "status": t.state.status, "tokens": t.state.tokens}
        if t.evaluation is not None:
            state["early_stopping"] = t.evaluation.early.state_dict()
            state["stopped_early"] = t.evaluation.stopped_early
        optim = {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict()}
        tensors = {k: p.detach() for k, p in t.params.items()}
        path = save_checkpoint(self._ckpt_root(t), t.state.step, tensors, optim, state)
        self._emit({"type": "checkpoint", "task": t.cfg.name, "step": t.state.step, "path": str(path)})

    def _resume(self, t: _Task) -> None:
        path = latest_checkpoint(self._ckpt_root(t))
        if path is None:
            return
        tensors, optim, state = load_checkpoint(path, self._fingerprint(t))
        with torch.no_grad():
            for k, p in t.params.items():
                p.copy_(tensors[k].to(p.device, p.dtype))
        t.optimizer.load_state_dict(optim["optimizer"])
        t.scheduler.load_state_dict(optim["scheduler"])
        t.state.step, t.state.tokens = state["step"], state.get("tokens", 0)
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        ev = t.evaluation
        if ev is not None and "early_stopping" in state:
            ev.early.load_state_dict(state["early_stopping"])
            ev.stopped_early = bool(state.get("stopped_early", False))
            best = self._ckpt_root(t) / "best"
            if ev.early.patience is not None and (best / "adapter_config.json").is_file():
                ev.best_state = read_peft(best, t.spec.name)[1]
        if t.state.step >= t.state.total_steps or (ev is not None and ev.stopped_early):
            self._finish(t, "succeeded", None, export=True)

    def _finish(self, t: _Task, status: str, error: str | None, export: bool) -> None:
        t.state.status, t.state.error = status, error
        if export:
            state = {k: p.detach().cpu() for k, p in t.params.items()}
            if t.evaluation is not None and t.evaluation.best_state is not None:
                state = t.evaluation.best_state  # early stopping keeps the best evaluated adapter
            save_peft(
                self.output_dir / "adapters" / t.spec.name, t.spec, state, adapter_base(self.cfg.base_model)
            )
        remove_adapter(self.model, t.spec.name)
        t.params, t.optimizer, t.pending = {}, None, []
        self._emit({"type": "status", "task": t.cfg.name, "status": status, "error": error})
