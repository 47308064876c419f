"""One fine-tuning task: its data order, step semantics, evaluation, checkpoints and events.

The single-process engine (``train/engine.py``) and every pipeline stage (``parallel/pipeline.py``) hold
``Task`` objects and only decide which micro-batch runs where; what a step *is* lives here, once:

- **Data order.** The task's examples form an endless stream of epochs (file order, or a seeded permutation
  per epoch with ``shuffle``); step n takes positions ``[n * batch_size, (n + 1) * batch_size)``. The
  permutation is a function of the run's seed, the task's name and the epoch only.
- **A step.** ``begin_step`` queues the step's positions and fixes its denominators (``StepNorm``) before any
  micro-batch runs, so each micro-batch's loss share (``add_share``) is already divided by them and the step's
  loss and gradient do not depend on how the step is split. ``optimizer_step(grad_norm)`` clips with the
  global norm its caller gives (the engine computes it here, a pipeline adds up every stage's slice), steps
  AdamW and the LR schedule, and checks the weights; a non-finite loss or weight fails this task only.
- **Evaluation and early stopping** (``eval_dataset``): ``eval_due`` after a step, ``eval_job`` to run,
  ``record_eval`` to log the result, keep the best adapter and decide to stop.
- **Checkpoints and exact resume**: ``save`` writes adapter, optimizer, schedule and bookkeeping atomically
  (``train/checkpoint.py``); ``resume`` restores them, refusing a checkpoint of an incompatible run.
- **Events** are typed (``train/events.py``).
- **The reference** of a dpo/kto task (``train/reference.py``): a frozen adapter put on the model with the
  task's own (``reference``: its name, None for the bare base), packed as the reference rows of its
  micro-batches and evaluations, and taken off with it in ``release``.

A task holds its adapter on the model it was built on: all layers in one process, a stage's layer range in a
pipeline (the adapter, optimizer and checkpoints then hold that slice).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import AdapterConfig, DatasetConfig, RunConfig, TaskConfig, steps_for
from ..data.formats import Example, load_examples
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
from ..masks import sequence_key
from .checkpoint import (
    CorruptCheckpointError,
    SkippedCheckpoint,
    load_checkpoint,
    save_checkpoint,
    saved_steps,
    scan_checkpoints,
    set_aside,
)
from .dispatcher import TaskView
from .evaluate import EarlyStopping, EvalJob, EvalResult, TaskEvaluation
from .events import CheckpointEvent, EarlyStopEvent, EvalEvent, Event, StepEvent
from .optim import build_optimizer, build_scheduler, grad_norm_sq
from .reference import attach_reference, detach_reference
from .tasks import StepNorm, TaskKind, TaskLoss, task_kind

__all__ = ["STATUSES", "Task", "TaskState", "keyed_seed", "spec_from_config"]

_log = logging.getLogger("lorafleet.train")

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def keyed_seed(seed: int, *parts: Any) -> int:
    """A 63-bit seed that depends only on the run's ``seed`` and ``parts`` (e.g. a task name and an epoch)."""
    return (seed * 1_000_003 + zlib.crc32(repr(parts).encode())) % (2**63)


def spec_from_config(cfg: AdapterConfig) -> AdapterSpec:
    """The adapter's spec (kind, rank, alpha, dropout, targets) from its config section."""
    return AdapterSpec(
        name=cfg.name,
        kind=cfg.type,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        use_rslora=cfg.use_rslora,
        target_modules=tuple(cfg.target_modules),
    )


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
    resumed_from: int | None = None  # the checkpoint step this run resumed from (None: from scratch)


class Task:
    """A task ready to train on ``model`` (see the module docstring).

    Args:
        run: the whole run's config (its ``seed`` and base model path are used).
        model: the decoder (all layers, or a pipeline stage's) the adapter is added to.
        dataset, adapter, task: the task's sections of the config; ``eval_dataset`` its held-out set.
        arrival: order of arrival (the dispatcher's tie-break).
        checkpoint_dir: where this task's checkpoints go (a pipeline stage passes its own sub-folder).
        layers: the decoder layers this task's adapter covers, recorded in checkpoints (None: all).

    The held-out set and the training data are read before the adapter is added, and a reference that
    cannot be attached takes the adapter off again, so a bad file leaves nothing on the model.
    """

    def __init__(
        self,
        run: RunConfig,
        model,
        tokenizer,
        dataset: DatasetConfig,
        adapter: AdapterConfig,
        task: TaskConfig,
        arrival: int,
        *,
        checkpoint_dir: Path,
        eval_dataset: DatasetConfig | None = None,
        layers: tuple[int, int] | None = None,
    ) -> None:
        held_out = load_examples(eval_dataset, tokenizer, task.max_seq_len) if eval_dataset else None
        self.examples: list[Example] = load_examples(dataset, tokenizer, task.max_seq_len)
        self.cfg, self.arrival = task, arrival
        # every random choice of the task is keyed by this seed alone (see TaskConfig.seed)
        self.seed = task.seed if task.seed is not None else keyed_seed(run.seed, task.name)
        self.base_path = adapter_base(run.base_model)  # what other tools resolve (a hub id or a path)
        self.checkpoint_dir, self.layers = Path(checkpoint_dir), layers
        self.kind: TaskKind = task_kind(task)
        self.spec = spec_from_config(adapter)
        self.state = TaskState(task.name, total_steps=steps_for(task, len(self.examples)))
        self.evaluation: TaskEvaluation | None = None
        if held_out is not None:
            self.evaluation = TaskEvaluation(
                held_out, task.eval_every_steps, EarlyStopping(task.early_stopping_patience)
            )
        if adapter.init_from:
            load_peft(model, adapter.init_from, self.spec.name, expect=self.spec)
        else:
            gen = torch.Generator().manual_seed(keyed_seed(self.seed, "init"))
            add_adapter(model, self.spec, generator=gen)
        try:
            self.reference: str | None = attach_reference(model, task, adapter, self.spec.name)
        except BaseException:
            remove_adapter(model, self.spec.name)
            raise
        self.params: dict[str, torch.nn.Parameter] = adapter_parameters(model, self.spec.name)
        opt = task.optimizer
        groups = lora_plus_param_groups(self.params, opt.lr, adapter.lora_plus_ratio)
        self.optimizer = build_optimizer(groups, opt.name, opt.lr, opt.weight_decay, opt.betas, opt.eps)
        sched = task.lr_scheduler
        self.scheduler = build_scheduler(
            self.optimizer, sched.name, sched.warmup_steps, self.state.total_steps
        )
        self.pending: list[int] = []  # stream positions of the current step still to run
        self.step_norm: StepNorm | None = None
        self.step_loss, self.step_tokens, self.step_metrics = 0.0, 0, {}
        self.started_at: float | None = None  # time.perf_counter() when it first ran
        self.skipped_checkpoints: list[SkippedCheckpoint] = []  # what the last resume passed over, and why
        self._best_unsaved = False  # a better evaluated adapter than the one in checkpoint_dir/best

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def live(self) -> bool:
        return self.state.status in ("queued", "running")

    # -- data order -------------------------------------------------------------------------------------

    def example_at(self, position: int) -> Example:
        """The example at ``position`` of the task's endless stream (epochs back to back)."""
        n = len(self.examples)
        epoch, i = divmod(position, n)
        if self.cfg.shuffle:
            g = torch.Generator().manual_seed(keyed_seed(self.seed, "shuffle", epoch))
            i = int(torch.randperm(n, generator=g)[i])
        return self.examples[i]

    def dropout_key(self, position: int, role: str) -> int:
        """The dropout key (``masks.sequence_key``) of the ``role`` sequence of the example at ``position``.

        A pure function of the run's seed, the task's name, the example's epoch and place in the task's
        data order and the role: a task's masks are the same alone, beside others, on any pipeline stage
        and after a resume.
        """
        epoch, index = divmod(position, len(self.examples))
        return sequence_key(keyed_seed(self.seed, "dropout"), epoch, index, role)

    def begin_step(self) -> None:
        """Queue the examples of the next optimizer step; its denominators are known from now on."""
        bs = self.cfg.batch_size
        self.pending = list(range(self.state.step * bs, (self.state.step + 1) * bs))
        self.step_norm = self.kind.step_norm([self.example_at(p) for p in self.pending])
        self.step_loss, self.step_tokens, self.step_metrics = 0.0, 0, {}

    def view(self, waited: int = 0) -> TaskView:
        """What the dispatcher sees of this task (``waited``: micro-batches it was left out of)."""
        return TaskView(
            name=self.cfg.name,
            priority=self.cfg.priority,
            arrival=self.arrival,
            micro_batch_size=self.cfg.micro_batch_size,
            pending=tuple((p, self.kind.num_tokens(self.example_at(p))) for p in self.pending),
            started=self.state.status == "running",
            waited=waited,
            group=self.kind.group,
        )

    @property
    def mid_step(self) -> bool:
        """Some, not all, of the current optimizer step's micro-batches have run."""
        return bool(self.pending) and len(self.pending) < self.cfg.batch_size

    def start(self) -> bool:
        """Mark the task running when its first micro-batch is planned; True when it was queued."""
        if self.state.status != "queued":
            return False
        self.state.status = "running"
        self.started_at = time.perf_counter()
        return True

    def consume(self, n: int) -> None:
        """The next ``n`` pending positions were planned into a micro-batch."""
        del self.pending[:n]

    # -- the step ---------------------------------------------------------------------------------------

    def add_share(self, share: TaskLoss) -> str | None:
        """Add a micro-batch's loss share to the step; the failure reason when the loss is not finite."""
        value = float(share.loss.detach())
        if not torch.isfinite(share.loss):
            return f"loss became {value} at step {self.state.step + 1}"
        self.step_loss += value
        self.step_tokens += share.tokens
        for k, v in share.metrics.items():
            self.step_metrics[k] = self.step_metrics.get(k, 0.0) + v
        return None

    @property
    def clips(self) -> bool:
        """Whether the step clips the gradient (and so needs the global norm over every slice)."""
        return self.cfg.max_grad_norm is not None

    def grad_norm_sq(self) -> float:
        """Squared gradient norm of this task's parameters here (slices of a pipeline add up)."""
        return float(grad_norm_sq(list(self.params.values())))

    def optimizer_step(self, grad_norm: float | None = None) -> StepEvent | str:
        """Clip (with the global ``grad_norm`` when the task clips), step, log; a failure reason on NaN/inf.

        ``grad_norm`` None with clipping on: the norm of this task's own parameters (one process).
        """
        params = list(self.params.values())
        if self.clips:
            total = grad_norm if grad_norm is not None else self.grad_norm_sq() ** 0.5
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.max_grad_norm, torch.tensor(total))
            grad_norm = total
        lr = self.scheduler.get_last_lr()[0]
        try:
            self.optimizer.step()
        except RuntimeError as e:  # e.g. an update that overflows float32
            return f"optimizer step {self.state.step + 1} failed: {e}"
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.last_loss = self.step_loss
        self.state.tokens += self.step_tokens
        if not all(torch.isfinite(p).all() for p in params):
            return f"adapter weights became NaN/inf at step {self.state.step}"
        now = time.perf_counter()
        return StepEvent(
            task=self.cfg.name,
            step=self.state.step,
            loss=self.step_loss,
            lr=lr,
            tokens=self.step_tokens,
            elapsed_s=round(now - (self.started_at if self.started_at is not None else now), 4),
            grad_norm=grad_norm if self.clips else None,
            metrics=dict(self.step_metrics),
        )

    # -- evaluation and the end of a step ---------------------------------------------------------------

    def eval_due(self) -> bool:
        ev = self.evaluation
        return ev is not None and ev.due(self.state.step, self.state.total_steps)

    def eval_job(self) -> EvalJob:
        return EvalJob(self.cfg.name, self.spec.name, self.kind, self.evaluation.examples, self.reference)

    def record_eval(self, result: EvalResult) -> list[Event]:
        """Log an evaluation after the current step; keep the best adapter; stop when patience runs out."""
        ev, step = self.evaluation, self.state.step
        out: list[Event] = [
            EvalEvent(
                self.cfg.name, step, result.loss, result.num_examples, result.perplexity, result.metrics
            )
        ]
        improved, stop = ev.early.update(result.loss, step)
        if improved and ev.early.patience is not None:
            ev.best_state = {k: p.detach().cpu().clone() for k, p in self.params.items()}
            self._best_unsaved = True  # written with the next checkpoint, which holds this evaluation
        if stop and step < self.state.total_steps:
            ev.stopped_early = True
            out.append(EarlyStopEvent(self.cfg.name, step, ev.early.best_step, ev.early.best_loss))
        return out

    @property
    def done(self) -> bool:
        """The last step ran, or early stopping ended the task."""
        stopped = self.evaluation is not None and self.evaluation.stopped_early
        return self.state.step >= self.state.total_steps or stopped

    def save_due(self) -> bool:
        return self.done or self.state.step % self.cfg.save_every_steps == 0

    # -- checkpoints ------------------------------------------------------------------------------------

    def fingerprint(self) -> dict[str, Any]:
        """What must not change between a checkpoint and the run that resumes from it."""
        s = self.spec
        out = {
            "adapter": [s.name, s.kind, s.rank, s.alpha, s.use_rslora, sorted(s.target_modules)],
            "task_type": self.cfg.type,
            "num_examples": len(self.examples),
            "batch_size": self.cfg.batch_size,
            "shuffle": self.cfg.shuffle,
            "seed": self.seed,
            "max_seq_len": self.cfg.max_seq_len,
        }
        if self.layers is not None:
            out["layers"] = list(self.layers)
        # a configured reference changes the objective (only when set, so older checkpoints stay valid)
        if self.cfg.reference is not None:
            out["reference"] = self.cfg.reference
        return out

    def save(self) -> CheckpointEvent:
        """Checkpoint the current step (adapter, optimizer, schedule, bookkeeping), atomically; the best
        evaluated adapter (``checkpoint_dir/best``) is written first when it changed, so ``best`` always
        matches the early-stopping state of the newest checkpoint. An ``OSError`` leaves the task as it was
        (the engine tries again: ``train/storage.py``)."""
        ev = self.evaluation
        if self._best_unsaved and ev is not None and ev.best_state is not None:
            save_peft(self.checkpoint_dir / "best", self.spec, ev.best_state, self.base_path)
            self._best_unsaved = False
        state: dict[str, Any] = {
            "fingerprint": self.fingerprint(),
            "status": self.state.status,
            "tokens": self.state.tokens,
            "last_loss": self.state.last_loss,
            "busy_s": self.state.busy_s,  # so tokens/s after a resume counts the earlier run's time too
        }
        if self.evaluation is not None:
            state["early_stopping"] = self.evaluation.early.state_dict()
            state["stopped_early"] = self.evaluation.stopped_early
        optim = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        tensors = {k: p.detach() for k, p in self.params.items()}
        path = save_checkpoint(self.checkpoint_dir, self.state.step, tensors, optim, state)
        return CheckpointEvent(self.cfg.name, self.state.step, str(path))

    def saved_steps(self) -> list[int]:
        return saved_steps(self.checkpoint_dir)

    def resume(self, step: int | None = None) -> bool:
        """Restore the checkpoint of ``step`` (None: the newest intact one); False when there is none.

        With ``step`` None, checkpoints that fail their manifest (``check_checkpoint``) or cannot be read are
        passed over, newest first, until one loads: each one skipped is logged (warning, logger
        ``lorafleet.train``) with its folder and reason, listed in ``skipped_checkpoints`` and renamed to
        ``step-N.corrupt``. When none is intact the task starts from scratch (False), after saying so.
        A checkpoint of an incompatible run is never skipped: ``CheckpointMismatchError``.
        An explicit ``step`` (a pipeline's common step) must load, or ``CorruptCheckpointError`` is raised.
        """
        self.skipped_checkpoints = []
        if step is not None:
            return self._restore(self.checkpoint_dir / f"step-{step:06d}")
        good, bad = scan_checkpoints(self.checkpoint_dir)
        self.skipped_checkpoints += bad
        restored = False
        for s in reversed(good):
            path = self.checkpoint_dir / f"step-{s:06d}"
            try:
                restored = self._restore(path)
                break
            except CorruptCheckpointError as e:
                self.skipped_checkpoints.append(SkippedCheckpoint(path, s, str(e)))
        for skipped in sorted(self.skipped_checkpoints, key=lambda k: k.step):
            _log.warning("task %s: %s", self.name, skipped.message())
            set_aside(skipped)
        if not restored and self.skipped_checkpoints:
            _log.warning("task %s: no intact checkpoint left; it starts from scratch", self.name)
        elif restored and self.skipped_checkpoints:
            _log.warning("task %s: resumed from step %d", self.name, self.state.step)
        return restored

    def _restore(self, path: Path) -> bool:
        tensors, optim, state = load_checkpoint(path, self.fingerprint())
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[k].to(p.device, p.dtype))
        self.optimizer.load_state_dict(optim["optimizer"])
        self.scheduler.load_state_dict(optim["scheduler"])
        self.state.step, self.state.tokens = state["step"], state.get("tokens", 0)
        self.state.resumed_from, self.state.busy_s = state["step"], state.get("busy_s", 0.0)
        self.state.last_loss = state.get("last_loss")
        ev = self.evaluation
        if ev is not None and "early_stopping" in state:
            ev.early.load_state_dict(state["early_stopping"])
            ev.stopped_early = bool(state.get("stopped_early", False))
            best = self.checkpoint_dir / "best"
            if ev.early.patience is not None and (best / "adapter_config.json").is_file():
                ev.best_state = read_peft(best, self.spec.name)[1]
        return True

    # -- the end ----------------------------------------------------------------------------------------

    def final_state(self) -> dict[str, torch.Tensor]:
        """The tensors to export: the best evaluated adapter with early stopping, else the current one."""
        if self.evaluation is not None and self.evaluation.best_state is not None:
            return self.evaluation.best_state
        return {k: p.detach().cpu().clone() for k, p in self.params.items()}

    def export(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter (``tensors``, e.g. a pipeline's merged slices; default ``final_state``) as PEFT."""
        save_peft(folder, self.spec, tensors if tensors is not None else self.final_state(), self.base_path)

    def release(self, model) -> None:
        """Take the adapter and its reference off ``model`` and drop the optimizer; the task keeps its state
        and examples."""
        if self.params:
            remove_adapter(model, self.spec.name)
        detach_reference(model, self.reference)
        self.params, self.optimizer, self.pending = {}, None, []
