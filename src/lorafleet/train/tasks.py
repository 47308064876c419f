"""Task kinds (sft, dpo, orpo; kto in ``train/kto.py``) and their losses, each computed over the task's own sequences of a fused batch.

Legend: T tokens of the fused batch, E hidden size, V vocabulary, M supervised rows of one task, N sequences
of one task, P preference pairs.

A task kind answers three questions for the engine (and for evaluation, which runs the same code without
a backward):

1. ``sequences(example)``: which sequences one example becomes, with a role and whether it runs under the
   task's adapter or under its reference. SFT: the example itself. DPO: prompt+chosen and
   prompt+rejected under the adapter, and the same two again under the task's frozen reference (a frozen
   adapter segment, or rows with no adapter when the reference is the bare base; ``train/reference.py``
   says which), computed in the same fused batch, so the reference costs no second model and no second
   pass. ORPO: prompt+chosen and prompt+rejected under the adapter (ORPO has no reference model).
2. ``step_norm(examples)``: the denominators of a whole optimizer step (supervised tokens, pairs), known
   when the step starts, so that a step's loss is the same whatever its split into micro-batches.
3. ``loss(lm_head, hidden_TE, batch, task, norm)``: this micro-batch's share of the step loss (already
   divided by the step's denominators, so shares add up to the step's loss) and of every logged metric.

Losses (``logp(y | x)`` is the sum of the answer tokens' log-probabilities, ``avg_logp`` that sum divided
by the number of answer tokens; ``pi`` under the adapter, ``ref`` under the task's reference):

- ``sft``: sum of token cross-entropies over supervised tokens / supervised tokens of the step.
- ``dpo`` with ``loss_type: sigmoid`` (Rafailov et al. 2023; label smoothing as in cDPO / TRL):
  ``h = (pi(c) - pi(r)) - (ref(c) - ref(r))``,
  ``loss = -(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)``, mean over pairs.
- ``dpo`` with ``loss_type: ipo`` (Azar et al. 2023, as TRL computes it: length-averaged log-probs):
  ``h`` as above with ``avg_logp``; ``loss = (h - 1 / (2 * beta)) ** 2``, mean over pairs.
  DPO logs ``reward_margin`` = mean of ``beta * ((pi(c) - ref(c)) - (pi(r) - ref(r)))`` and
  ``reward_accuracy`` = share of pairs whose chosen reward is higher.
- ``orpo`` (Hong et al. 2024, as TRL computes it): ``nll`` = cross-entropy of the chosen answers' tokens
  (mean over the step's chosen answer tokens); ``log_odds = (a_c - a_r) - (log(1 - exp(a_c)) -
  log(1 - exp(a_r)))`` with ``a = avg_logp``; ``loss = nll - beta * mean(logsigmoid(log_odds))``.
  Logs ``nll``, ``or_loss`` (= ``-mean(logsigmoid(log_odds))``), ``reward_margin`` (mean of
  ``beta * (a_c - a_r)``) and ``reward_accuracy``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import IGNORE_INDEX, FusedBatch
from ..data.formats import Example, PreferenceExample
from .logprobs import role_rows as _rows
from .logprobs import sequence_logps as _supervised_logps
from .logprobs import target_logprobs

__all__ = [
    "TASK_TYPES",
    "DPOKind",
    "ORPOKind",
    "PackedSequence",
    "SFTKind",
    "StepNorm",
    "TaskKind",
    "TaskLoss",
    "order_groups",
    "pack_groups",
    "task_kind",
]

TASK_TYPES = ("sft", "dpo", "orpo", "kto")

# Roles of packed sequences (``SequenceInfo.role``).
SFT, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED = "sft", "chosen", "rejected", "ref_chosen", "ref_rejected"


@dataclass(frozen=True)
class PackedSequence:
    """One sequence an example becomes: its role, tokens, supervision mask, and whether it runs under the reference."""

    role: str
    tokens: tuple[int, ...]
    mask: tuple[bool, ...]
    reference: bool = False


@dataclass(frozen=True)
class StepNorm:
    """Denominators of one optimizer step (or of a whole evaluation set).

    ``examples``: examples (SFT) or preference pairs; ``tokens``: supervised tokens (SFT: all of them;
    ORPO: the chosen answers' tokens, the NLL's denominator; DPO: unused).
    """

    examples: int
    tokens: int


@dataclass
class TaskLoss:
    """One task's share of a step: ``loss`` (scalar tensor, in the graph) and ``metrics`` (floats).

    Both are already divided by the step's denominators, so summing the shares of all micro-batches of a
    step gives the step's loss and metrics. ``tokens`` counts the tokens the task put in this micro-batch.
    """

    loss: torch.Tensor
    metrics: dict[str, float]
    tokens: int


class TaskKind(Protocol):
    """What the engine and evaluation need of a task type (see the module docstring).

    ``group``: its examples depend on each other in runs of this many consecutive ones (KTO's KL groups):
    the dispatcher and evaluation never split such a run, and ``pack_groups`` packs them through
    ``group_sequences``. 1 for independent examples.
    """

    name: str
    group: int

    def sequences(self, example: Any) -> list[PackedSequence]: ...

    def num_tokens(self, example: Any) -> int: ...

    def step_norm(self, examples: Sequence[Any]) -> StepNorm: ...

    def loss(
        self,
        lm_head: nn.Module,
        hidden_TE: torch.Tensor,
        batch: FusedBatch,
        task: str,
        norm: StepNorm,
    ) -> TaskLoss: ...


def pack_groups(
    task: str,
    adapter: str | None,
    kind: TaskKind,
    items: Sequence[tuple[int, Any]],
    *,
    key: Callable[[int, str], int] | None = None,
    reference: str | None = None,
) -> tuple[tuple, tuple | None]:
    """The task's groups for ``data.packing.pack``: (its adapter's group, its reference group or None).

    ``items`` are ``(example id, example)``. Each group lists ``(example id, tokens, mask, role)``, plus
    ``key(example id, role)`` (the sequence's dropout key, ``masks.sequence_key``) when ``key`` is given;
    the reference group (DPO, KTO) runs under the frozen adapter ``reference`` (None: the bare base). Put every
    task's own group first and the reference groups after them (``order_groups``: base-only rows last), so
    that each reference is one segment. A kind whose examples depend on each other (KTO's KL pairs,
    ``group > 1``) gets the whole list at once: its examples come in whole groups (the dispatcher keeps them
    together).
    """
    own, ref = [], []
    if kind.group > 1:
        pairs = kind.group_sequences(items)
    else:
        pairs = [(example_id, s) for example_id, example in items for s in kind.sequences(example)]
    for example_id, s in pairs:
        entry = (example_id, s.tokens, s.mask, s.role)
        (ref if s.reference else own).append(entry if key is None else (*entry, key(example_id, s.role)))
    return (task, adapter, own), ((task, reference, ref) if ref else None)


def order_groups(own: list[tuple], refs: list[tuple]) -> list[tuple]:
    """Groups in batch order: every task's own group, then reference adapters' groups, then base-only rows."""
    return own + [g for g in refs if g[1] is not None] + [g for g in refs if g[1] is None]


# ---------------------------------------------------------------------------------------------------------
# Shared pieces.


def _pair_sequences(example: PreferenceExample, reference: bool) -> list[PackedSequence]:
    """prompt+chosen and prompt+rejected, every answer token supervised (roles ref_* under the base)."""
    out = []
    prompt = tuple(example.prompt)
    for role, answer in ((CHOSEN, example.chosen), (REJECTED, example.rejected)):
        tokens = prompt + tuple(answer)
        mask = (False,) * len(prompt) + (True,) * len(answer)
        if mask and mask[0]:  # an empty prompt: nothing predicts the first answer token
            mask = (False, *mask[1:])
        out.append(PackedSequence(("ref_" + role) if reference else role, tokens, mask, reference))
    return out


def _check_pairs(task: str, chosen: list[int], rejected: list[int]) -> None:
    assert chosen == rejected, f"task {task!r}: chosen and rejected sequences are not packed pairwise"


def _preference_norm(examples: Sequence[PreferenceExample]) -> StepNorm:
    return StepNorm(examples=len(examples), tokens=sum(len(e.chosen) for e in examples))


def _preference_tokens(example: PreferenceExample) -> int:
    return 2 * len(example.prompt) + len(example.chosen) + len(example.rejected)


def _require(example: Any, cls: type, kind: str) -> None:
    if not isinstance(example, cls):
        raise ValueError(
            f"a {kind} task needs {cls.__name__} examples, got {type(example).__name__}; "
            f"give the task a dataset of a format that {kind} trains on"
        )


# ---------------------------------------------------------------------------------------------------------
# The kinds.


class SFTKind:
    """Supervised fine-tuning: next-token cross-entropy on the supervised tokens."""

    name = "sft"
    group = 1

    def sequences(self, example: Example) -> list[PackedSequence]:
        _require(example, Example, self.name)
        return [PackedSequence(SFT, tuple(example.tokens), tuple(example.mask))]

    def num_tokens(self, example: Example) -> int:
        return len(example.tokens)

    def step_norm(self, examples: Sequence[Example]) -> StepNorm:
        return StepNorm(examples=len(examples), tokens=sum(sum(e.mask) for e in examples))

    def loss(self, lm_head, hidden_TE, batch, task, norm) -> TaskLoss:
        _, starts, ends = _rows(batch, task, SFT)
        # The task's sequences are one contiguous range (one packing group): slice, do not gather.
        lo, hi = starts[0], ends[-1]
        labels_T = batch.labels[lo:hi].to(hidden_TE.device)
        sup = labels_T != IGNORE_INDEX
        ce_sum = -target_logprobs(lm_head, hidden_TE[lo:hi][sup], labels_T[sup]).sum()
        share = ce_sum / max(1, norm.tokens)
        return TaskLoss(share, {}, hi - lo)


class DPOKind:
    """Direct preference optimisation against the task's frozen reference (sigmoid or IPO loss)."""

    name = "dpo"
    group = 1

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        if loss_type not in ("sigmoid", "ipo"):
            raise ValueError(f"dpo loss_type {loss_type!r} is not supported; use sigmoid or ipo")
        if not beta > 0:
            raise ValueError(f"dpo beta must be > 0, got {beta}; a typical value is 0.1")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def sequences(self, example: PreferenceExample) -> list[PackedSequence]:
        _require(example, PreferenceExample, self.name)
        return _pair_sequences(example, reference=False) + _pair_sequences(example, reference=True)

    def num_tokens(self, example: PreferenceExample) -> int:
        return 2 * _preference_tokens(example)

    def step_norm(self, examples: Sequence[PreferenceExample]) -> StepNorm:
        return _preference_norm(examples)

    def loss(self, lm_head, hidden_TE, batch, task, norm) -> TaskLoss:
        logps = {}
        ids = {}
        tokens = 0
        for role in (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED):
            ids[role], starts, ends = _rows(batch, task, role)
            tokens += sum(e - s for s, e in zip(starts, ends))
            if role.startswith("ref_"):
                # The reference is frozen: no gradient, and its logits need not be kept.
                with torch.no_grad():
                    sums, counts = _supervised_logps(lm_head, hidden_TE.detach(), batch.labels, starts, ends)
            else:
                sums, counts = _supervised_logps(lm_head, hidden_TE, batch.labels, starts, ends)
            logps[role] = sums / counts.clamp(min=1) if self.loss_type == "ipo" else sums
        _check_pairs(task, ids[CHOSEN], ids[REJECTED])
        _check_pairs(task, ids[CHOSEN], ids[REF_CHOSEN])
        _check_pairs(task, ids[CHOSEN], ids[REF_REJECTED])
        chosen_P = logps[CHOSEN] - logps[REF_CHOSEN]
        rejected_P = logps[REJECTED] - logps[REF_REJECTED]
        h_P = chosen_P - rejected_P
        if self.loss_type == "ipo":
            losses_P = (h_P - 1.0 / (2.0 * self.beta)) ** 2
        else:
            ls = self.label_smoothing
            losses_P = -(1.0 - ls) * F.logsigmoid(self.beta * h_P) - ls * F.logsigmoid(-self.beta * h_P)
        n = max(1, norm.examples)
        with torch.no_grad():
            margin = float((self.beta * h_P).sum()) / n
            accuracy = float((chosen_P > rejected_P).float().sum()) / n
        return TaskLoss(losses_P.sum() / n, {"reward_margin": margin, "reward_accuracy": accuracy}, tokens)


class ORPOKind:
    """Odds-ratio preference optimisation: SFT on the chosen answer plus an odds-ratio penalty (no reference)."""

    name = "orpo"
    group = 1

    def __init__(self, beta: float = 0.1) -> None:
        if not beta > 0:
            raise ValueError(f"orpo beta must be > 0, got {beta}; a typical value is 0.1")
        self.beta = beta

    def sequences(self, example: PreferenceExample) -> list[PackedSequence]:
        _require(example, PreferenceExample, self.name)
        return _pair_sequences(example, reference=False)

    def num_tokens(self, example: PreferenceExample) -> int:
        return _preference_tokens(example)

    def step_norm(self, examples: Sequence[PreferenceExample]) -> StepNorm:
        return _preference_norm(examples)

    def loss(self, lm_head, hidden_TE, batch, task, norm) -> TaskLoss:
        ids_c, starts_c, ends_c = _rows(batch, task, CHOSEN)
        ids_r, starts_r, ends_r = _rows(batch, task, REJECTED)
        _check_pairs(task, ids_c, ids_r)
        sums_c, counts_c = _supervised_logps(lm_head, hidden_TE, batch.labels, starts_c, ends_c)
        sums_r, counts_r = _supervised_logps(lm_head, hidden_TE, batch.labels, starts_r, ends_r)
        avg_c, avg_r = sums_c / counts_c.clamp(min=1), sums_r / counts_r.clamp(min=1)
        # log(1 - exp(a)) for a < 0, written with expm1 so that it stays accurate when exp(a) is near 1.
        log_odds_P = (avg_c - avg_r) - (torch.log(-torch.expm1(avg_c)) - torch.log(-torch.expm1(avg_r)))
        ratio_P = F.logsigmoid(log_odds_P)
        n = max(1, norm.examples)
        nll = -sums_c.sum() / max(1, norm.tokens)
        or_term = -ratio_P.sum() / n
        share = nll + self.beta * or_term
        with torch.no_grad():
            metrics = {
                "nll": float(nll),
                "or_loss": float(or_term),
                "reward_margin": float((self.beta * (avg_c - avg_r)).sum()) / n,
                "reward_accuracy": float((avg_c > avg_r).float().sum()) / n,
            }
        tokens = sum(e - s for s, e in zip(starts_c + starts_r, ends_c + ends_r))
        return TaskLoss(share, metrics, tokens)


def task_kind(task: Any) -> TaskKind:
    """The kind of a ``TaskConfig`` (its ``type`` and, for preference tasks, ``beta`` and friends)."""
    if task.type == "sft":
        return SFTKind()
    if task.type == "dpo":
        return DPOKind(task.beta, task.loss_type, task.label_smoothing)
    if task.type == "orpo":
        return ORPOKind(task.beta)
    if task.type == "kto":
        from .kto import KTOKind

        return KTOKind(task.beta, task.desirable_weight, task.undesirable_weight, task.micro_batch_size)
    raise ValueError(f"task {task.name!r}: type {task.type!r} is not one of {', '.join(TASK_TYPES)}")
