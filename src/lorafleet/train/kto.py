"""KTO (Kahneman-Tversky optimisation, Ethayarajh et al. 2024) as TRL's ``KTOTrainer`` computes it.

Legend: N examples of one task in a micro-batch, G the KL group size (the task's ``micro_batch_size``).

Data: unpaired rows (``data/unpaired.py``), each a prompt, one completion and a label (desirable or not).
Per example ``r = logp_pi(y | x) - logp_ref(y | x)`` (sums over the completion's tokens; ``ref`` is the
task's frozen reference, ``train/reference.py``). The KL estimate ``z`` of a group of examples is

    z = max(0, mean over the group of (logp_pi(y' | x) - logp_ref(y' | x)))     (no gradient)

where ``y'`` is a *mismatched* completion: within each group of G consecutive examples (x_1, y_1) ..
(x_G, y_G), example k is paired with the completion of example k - 1 and the first with the last's, i.e.
(x_1, y_G), (x_2, y_1), ..., (x_G, y_{G-1}). The loss of an example is

    desirable:   desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable: undesirable_weight * (1 - sigmoid(beta * (z - r)))

and the step's loss is the mean over the step's examples.

Batch semantics, matching TRL exactly: TRL builds the mismatched pairs by rotating completions by one
within chunks of ``per_device_train_batch_size`` rows of the (sequentially sampled) dataset and estimates
``z`` per forward batch of that size; the step is ``gradient_accumulation_steps`` such batches. Here a KL
group is ``micro_batch_size`` consecutive examples of the task's stream (so ``micro_batch_size`` plays
``per_device_train_batch_size`` and ``batch_size / micro_batch_size`` the accumulation steps), and the
dispatcher never splits a group across micro-batches (``group``), so the loss does not depend on how the
engine splits a step. With ``shuffle: false`` and a dataset whose size is a multiple of
``micro_batch_size``, the groups are TRL's chunks. Evaluation groups the held-out set the same way.

Each example packs four sequences: prompt+completion under the adapter (with gradient) and under the
reference, and prompt+mismatched completion under the adapter (no gradient, as TRL) and the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..data.unpaired import UnpairedExample
from .logprobs import role_rows, sequence_logps
from .tasks import PackedSequence, StepNorm, TaskLoss

__all__ = ["KTOKind"]

# Roles: the completion under the adapter says the label; ref_* run under the reference.
DESIRABLE, UNDESIRABLE, KL = "desirable", "undesirable", "kl"
REF_DESIRABLE, REF_UNDESIRABLE, REF_KL = "ref_desirable", "ref_undesirable", "ref_kl"


def _sequence(role: str, prompt: tuple[int, ...], answer: tuple[int, ...], reference: bool) -> PackedSequence:
    mask = (False,) * len(prompt) + (True,) * len(answer)
    if mask and mask[0]:  # an empty prompt: nothing predicts the first answer token
        mask = (False, *mask[1:])
    return PackedSequence(role, prompt + answer, mask, reference)


class KTOKind:
    """KTO against the task's frozen reference (see the module docstring); ``group``: KL group size (>= 2)."""

    name = "kto"

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        group: int = 2,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"kto beta must be > 0, got {beta}; a typical value is 0.1")
        if not (desirable_weight > 0 and undesirable_weight > 0):
            raise ValueError("kto desirable_weight and undesirable_weight must be > 0")
        if group < 2:
            raise ValueError(f"kto needs KL groups of at least 2 examples (micro_batch_size), got {group}")
        self.beta, self.group = beta, group
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight

    def sequences(self, example: UnpairedExample) -> list[PackedSequence]:
        """One example alone (a group of one: its KL sequence is its own completion)."""
        return [s for _, s in self.group_sequences([(0, example)])]

    def group_sequences(
        self, items: Sequence[tuple[int, UnpairedExample]]
    ) -> list[tuple[int, PackedSequence]]:
        """``(example id, sequence)`` of whole KL groups (ids ``// group`` say which group an example is in)."""
        groups: dict[int, list[tuple[int, UnpairedExample]]] = {}
        for example_id, example in items:
            if not isinstance(example, UnpairedExample):
                raise ValueError(
                    f"a kto task needs UnpairedExample examples, got {type(example).__name__}; give the "
                    "task a dataset of format unpaired_preference"
                )
            groups.setdefault(example_id // self.group, []).append((example_id, example))
        out = []
        for members in groups.values():
            for k, (example_id, ex) in enumerate(members):
                other = members[k - 1][1].completion  # k = 0 takes the last one's: a rotation by one
                prompt, answer = tuple(ex.prompt), tuple(ex.completion)
                role = DESIRABLE if ex.label else UNDESIRABLE
                out += [
                    (example_id, _sequence(role, prompt, answer, False)),
                    (example_id, _sequence("ref_" + role, prompt, answer, True)),
                    (example_id, _sequence(KL, prompt, tuple(other), False)),
                    (example_id, _sequence(REF_KL, prompt, tuple(other), True)),
                ]
        return out

    def num_tokens(self, example: UnpairedExample) -> int:
        # The KL sequences use another example's completion; over a whole group the lengths add up the same.
        return 4 * (len(example.prompt) + len(example.completion))

    def step_norm(self, examples: Sequence[UnpairedExample]) -> StepNorm:
        return StepNorm(examples=len(examples), tokens=0)

    def loss(self, lm_head, hidden_TE, batch, task, norm) -> TaskLoss:
        rows = {
            r: role_rows(batch, task, r)
            for r in (DESIRABLE, UNDESIRABLE, KL, REF_DESIRABLE, REF_UNDESIRABLE, REF_KL)
        }
        tokens = sum(e - s for _, starts, ends in rows.values() for s, e in zip(starts, ends))

        def logps(role: str, grad: bool) -> torch.Tensor:
            _, starts, ends = rows[role]
            if not starts:
                return torch.zeros(0, device=hidden_TE.device)
            if grad:
                return sequence_logps(lm_head, hidden_TE, batch.labels, starts, ends)[0]
            with torch.no_grad():  # the reference, and the KL estimate (no gradient in TRL either)
                return sequence_logps(lm_head, hidden_TE.detach(), batch.labels, starts, ends)[0]

        for own, ref in ((DESIRABLE, REF_DESIRABLE), (UNDESIRABLE, REF_UNDESIRABLE), (KL, REF_KL)):
            assert rows[own][0] == rows[ref][0], f"task {task!r}: kto sequences are not packed per example"
        dev = hidden_TE.device
        # z of each KL group in this micro-batch (groups are whole: see the module docstring)
        kl_ids = rows[KL][0]
        kl_diff = (logps(KL, False) - logps(REF_KL, False)).tolist()
        sums: dict[int, list[float]] = {}
        for i, d in zip(kl_ids, kl_diff):
            sums.setdefault(i // self.group, []).append(d)
        z_of = {g: max(0.0, sum(v) / len(v)) for g, v in sums.items()}
        ids = rows[DESIRABLE][0] + rows[UNDESIRABLE][0]
        z_N = torch.tensor([z_of[i // self.group] for i in ids], device=dev, dtype=torch.float32)
        desirable_N = torch.tensor(
            [True] * len(rows[DESIRABLE][0]) + [False] * len(rows[UNDESIRABLE][0]), device=dev
        )
        pi_N = torch.cat([logps(DESIRABLE, True), logps(UNDESIRABLE, True)])
        ref_N = torch.cat([logps(REF_DESIRABLE, False), logps(REF_UNDESIRABLE, False)])
        r_N = pi_N - ref_N
        losses_N = torch.where(
            desirable_N,
            self.desirable_weight * (1 - F.sigmoid(self.beta * (r_N - z_N))),
            self.undesirable_weight * (1 - F.sigmoid(self.beta * (z_N - r_N))),
        )
        n = max(1, norm.examples)
        with torch.no_grad():
            right = torch.where(desirable_N, r_N > z_N, r_N < z_N)
            metrics = {"kl": float(z_N.sum()) / n, "reward_accuracy": float(right.float().sum()) / n}
        return TaskLoss(losses_N.sum() / n, metrics, tokens)
