"""Held-out evaluation of adapters in fused batches, early stopping, and ``lorafleet eval``.

    lorafleet eval examples/sweep.yaml                    # every task's saved adapter on its eval_dataset
    lorafleet eval CONFIG.yaml --adapter science=runs/demo/adapters/science --with-base

Legend: T tokens of a fused batch, E hidden size.

``evaluate(model, jobs, max_tokens)`` packs the examples of several adapters (jobs) back to back into fused
batches of at most ``max_tokens`` tokens (each job's sequences contiguous, so each adapter owns one
segment; DPO's and KTO's reference rows run under the job's frozen reference adapter, or the base, in the
same batch; KTO's KL groups are never split), runs the model once per batch without
gradients and in eval mode (no dropout), and returns per job exactly what the task's training loss is on
the whole set at once: for SFT the token-weighted mean cross-entropy over every supervised token of the
set (``perplexity = exp(loss)``), for DPO and ORPO the mean over pairs (plus their reward margin and
accuracy; ORPO's ``perplexity`` is that of the chosen answers). The split into batches does not change
the numbers: each batch adds its share (see ``train/tasks.py``).

``EarlyStopping`` is the pure bookkeeping the engine uses: the best eval loss so far, at which step, and
how many evaluations in a row failed to beat it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batch import FusedBatch
from ..data.packing import pack
from .tasks import TaskKind, order_groups, pack_groups

__all__ = [
    "EarlyStopping",
    "EvalJob",
    "EvalResult",
    "EvalSums",
    "TaskEvaluation",
    "cli_eval",
    "eval_batches",
    "evaluate",
]


@dataclass(frozen=True)
class EvalJob:
    """One adapter on one evaluation set: ``name`` keys the result, ``adapter`` None means the base model.

    ``reference``: the frozen reference adapter of a dpo/kto job (``train/reference.py``; None: the base).
    """

    name: str
    adapter: str | None
    kind: TaskKind
    examples: Sequence[Any]
    reference: str | None = None


@dataclass(frozen=True)
class EvalResult:
    """Loss and metrics of one job over its whole evaluation set (see the module docstring).

    ``perplexity``: exp of the mean token cross-entropy (SFT: of its loss; ORPO: of the chosen answers'
    NLL); None for DPO, whose loss is not a likelihood.
    """

    loss: float
    metrics: dict[str, float]
    num_examples: int
    tokens: int
    perplexity: float | None


def _perplexity(kind: str, loss: float, metrics: dict[str, float]) -> float | None:
    mean_ce = loss if kind == "sft" else metrics.get("nll") if kind == "orpo" else None
    if mean_ce is None:
        return None
    return math.exp(mean_ce) if mean_ce < 700 else math.inf


class EvalSums:
    """Adds up the loss shares of evaluation jobs over fused batches; ``results()`` when every batch ran.

    Each job's denominators are those of its whole set, so the split into batches changes nothing.
    """

    def __init__(self, jobs: Sequence[EvalJob]) -> None:
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluation jobs need distinct names, got {names}")
        empty = [j.name for j in jobs if not j.examples]
        if empty:
            raise ValueError(
                f"evaluation jobs {empty} have no example; give each eval dataset at least one row"
            )
        self.jobs = {j.name: j for j in jobs}
        self.norms = {j.name: j.kind.step_norm(j.examples) for j in jobs}
        self.loss = {j.name: 0.0 for j in jobs}
        self.metrics: dict[str, dict[str, float]] = {j.name: {} for j in jobs}
        self.tokens = {j.name: 0 for j in jobs}

    def add(self, lm_head, hidden_TE: torch.Tensor, batch, names: Sequence[str]) -> None:
        """Add the shares of jobs ``names`` in ``batch`` (whose final hidden states are ``hidden_TE``)."""
        for name in names:
            job = self.jobs[name]
            out = job.kind.loss(lm_head, hidden_TE, batch, name, self.norms[name])
            self.loss[name] += float(out.loss)
            self.tokens[name] += out.tokens
            for k, v in out.metrics.items():
                self.metrics[name][k] = self.metrics[name].get(k, 0.0) + v

    def results(self) -> dict[str, EvalResult]:
        return {
            n: EvalResult(
                self.loss[n],
                self.metrics[n],
                len(j.examples),
                self.tokens[n],
                _perplexity(j.kind.name, self.loss[n], self.metrics[n]),
            )
            for n, j in self.jobs.items()
        }


def evaluate(model, jobs: Sequence[EvalJob], max_tokens: int) -> dict[str, EvalResult]:
    """Evaluate every job in fused batches of at most ``max_tokens`` tokens (an example longer than that
    gets a batch of its own); returns ``{job.name: EvalResult}``. The model's train/eval mode is restored.
    """
    sums = EvalSums(jobs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for names, batch in eval_batches(jobs, max_tokens, model.device):
                hidden_TE = model.forward_packed(batch.input_ids, batch, apply_head=False)
                sums.add(model.lm_head, hidden_TE, batch, names)
    finally:
        model.train(was_training)
    return sums.results()


def eval_batches(jobs: Sequence[EvalJob], max_tokens: int, device) -> Iterator[tuple[list[str], FusedBatch]]:
    """The fused batches of an evaluation, each with the names of the jobs it holds (see ``evaluate``)."""
    for batch_items in _batches(jobs, max_tokens):
        own, refs = [], []
        for job, items in batch_items:
            g_own, g_ref = pack_groups(job.name, job.adapter, job.kind, items, reference=job.reference)
            own.append(g_own)
            if g_ref is not None:
                refs.append(g_ref)
        yield [job.name for job, _ in batch_items], pack(order_groups(own, refs), device)


def _batches(jobs: Sequence[EvalJob], max_tokens: int):
    """Greedy fill: jobs in order, examples in order, a new batch when the next example would not fit."""
    current: list[tuple[EvalJob, list[tuple[int, Any]]]] = []
    used = 0
    for job in jobs:
        group = job.kind.group  # KTO's KL groups stay in one batch
        for i, ex in enumerate(job.examples):
            n = job.kind.num_tokens(ex)
            if current and used + n > max_tokens and i % group == 0:
                yield current
                current, used = [], 0
            if not current or current[-1][0] is not job:
                current.append((job, []))
            current[-1][1].append((i, ex))
            used += n
    if current:
        yield current


@dataclass
class EarlyStopping:
    """Best eval loss so far and the evaluations since it; ``patience`` None never stops.

    ``update(loss, step)`` returns ``(improved, stop)``: improved when ``loss`` is strictly below the best
    (a NaN never improves), stop when ``patience`` evaluations in a row did not improve.
    """

    patience: int | None = None
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, loss: float, step: int) -> tuple[bool, bool]:
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.bad_evals = loss, step, 0
            return True, False
        self.bad_evals += 1
        return False, self.patience is not None and self.bad_evals >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "history": [list(h) for h in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        best = state.get("best_loss")
        self.best_loss = math.inf if best is None else float(best)
        self.best_step = int(state.get("best_step", 0))
        self.bad_evals = int(state.get("bad_evals", 0))
        self.history = [(int(s), float(v)) for s, v in state.get("history", [])]


@dataclass
class TaskEvaluation:
    """A training task's held-out examples and early-stopping state (one per task with an eval_dataset).

    ``best_state`` holds the adapter's tensors at the best evaluation so far, kept only when the task
    early-stops (its saved adapter is then that one); ``stopped_early`` is set when patience runs out.
    """

    examples: list[Any]
    every: int | None
    early: EarlyStopping
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after this step: every ``every`` steps, and always after the last step."""
        return step >= total_steps or (self.every is not None and step % self.every == 0)


# ---------------------------------------------------------------------------------------------------------
# lorafleet eval


def _adapter_overrides(values: list[str], task_names: list[str]) -> dict[str, Path]:
    """``--adapter TASK=PATH`` (or a bare ``PATH`` when the config has a single task) -> {task: folder}."""
    out: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            if len(task_names) != 1:
                raise ValueError(
                    f"--adapter {value!r}: the config has {len(task_names)} tasks ({', '.join(task_names)}); "
                    "say which one this adapter is for: --adapter TASK=PATH"
                )
            name, path = task_names[0], value
        if name not in task_names:
            raise ValueError(
                f"--adapter {value!r}: no task named {name!r} in the config; tasks: {', '.join(task_names)}"
            )
        out[name] = Path(path)
    return out


def _short_path(folder: Path) -> str:
    """``folder`` relative to the working folder when it is inside it (shorter in the table), else as given."""
    try:
        return str(Path(folder).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def cli_eval(args: argparse.Namespace) -> int:
    """``lorafleet eval CONFIG.yaml``: each task's saved adapter on its ``eval_dataset``, in fused batches."""
    from rich.console import Console
    from rich.table import Table

    from ..config import load_config
    from ..data.formats import load_examples
    from ..devices import resolve_device
    from ..lora import load_peft
    from ..models import base_dtype, load_model
    from ..models.tokenizer import load_tokenizer
    from .reference import attach_reference
    from .tasks import task_kind

    cfg = load_config(args.config)
    console = Console()
    output_dir = Path(args.output_dir) if args.output_dir else Path(cfg.output_dir)
    overrides = _adapter_overrides(args.adapter or [], [t.name for t in cfg.tasks])
    datasets = {d.name: d for d in cfg.datasets}
    adapters = {a.name: a for a in cfg.adapters}
    chosen, notes = [], []
    for t in cfg.tasks:
        if t.eval_dataset is None:
            notes.append(f"{t.name}: no eval_dataset in the config; skipped")
            continue
        folder = overrides.get(t.name, output_dir / "adapters" / t.adapter)
        if not (folder / "adapter_config.json").is_file():
            notes.append(
                f"{t.name}: no saved adapter at {folder} (train it first, or pass --adapter); skipped"
            )
            continue
        chosen.append((t, folder))
    if not chosen:
        detail = "; ".join(notes) or "the config has no task"
        raise ValueError(
            f"nothing to evaluate in {args.config}: {detail}. Give tasks an eval_dataset and train them "
            "(lorafleet train CONFIG.yaml), or point at adapter folders with --adapter TASK=PATH"
        )
    device = resolve_device(cfg.base_model.device)
    dtype = base_dtype(cfg.base_model.dtype)
    model = load_model(cfg.base_model.path, dtype, device)
    tokenizer = load_tokenizer(cfg.base_model.path)
    jobs: list[EvalJob] = []
    rows: list[tuple[str, str, str]] = []
    for t, folder in chosen:
        kind = task_kind(t)
        examples = load_examples(datasets[t.eval_dataset], tokenizer, t.max_seq_len)
        load_peft(model, folder, t.adapter)
        # the task's training reference (its starting adapter, a folder, or the base): train/reference.py
        reference = attach_reference(model, t, adapters[t.adapter], t.adapter)
        jobs.append(EvalJob(t.name, t.adapter, kind, examples, reference))
        rows.append((t.name, _short_path(folder), t.eval_dataset))
        if args.with_base and kind.name == "sft":
            jobs.append(EvalJob(f"{t.name} (base)", None, kind, examples))
            rows.append((f"{t.name} (base)", "base model", t.eval_dataset))
    results = evaluate(model, jobs, cfg.dispatcher.max_tokens_per_micro_batch)
    # Fits 80 columns: the figures never wrap; names and the adapter path fold onto more lines instead.
    table = Table(title=f"lorafleet eval: {args.config}", title_justify="left")
    for col in ("task", "adapter", "dataset"):
        table.add_column(col, overflow="fold", ratio=2 if col == "adapter" else 1)
    for col in ("examples", "eval loss", "perplexity", "reward acc"):
        table.add_column(col, justify="right", no_wrap=True, min_width=len(col.split()[-1]))
    for name, folder, ds in rows:
        r = results[name]
        ppl = f"{r.perplexity:.3f}" if r.perplexity is not None else "-"
        acc = f"{r.metrics['reward_accuracy']:.3f}" if "reward_accuracy" in r.metrics else "-"
        table.add_row(name, folder, ds, str(r.num_examples), f"{r.loss:.4f}", ppl, acc)
    console.print(table)
    for note in notes:
        console.print(f"[yellow]{note}[/yellow]")
    return 0
