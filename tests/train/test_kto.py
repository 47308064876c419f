"""KTO's kind: the KL groups (rotation by one within ``micro_batch_size`` consecutive examples), the loss
written out from TRL's formula on a PEFT model (the multi-step equality with TRL's KTOTrainer is in
``test_preference_trl.py``), and evaluation that does not depend on the batch split."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.data.packing import pack
from lorafleet.data.unpaired import UnpairedExample
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter
from lorafleet.models import load_model
from lorafleet.train.evaluate import EvalJob, evaluate
from lorafleet.train.kto import KTOKind
from lorafleet.train.tasks import order_groups, pack_groups


def _examples(n: int, seed: int) -> list[UnpairedExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(int(t) for t in torch.randint(3, 300, (k,), generator=g))

    return [UnpairedExample(ids(3 + i % 3), ids(2 + (i * 2) % 5), i % 3 != 1) for i in range(n)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(5)
    for name in ("pol", "ref"):
        add_adapter(m, AdapterSpec(name, rank=2, alpha=4.0, target_modules=("q_proj", "v_proj")))
        with torch.no_grad():
            for p in adapter_parameters(m, name).values():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    for p in adapter_parameters(m, "ref").values():
        p.requires_grad_(False)
    return m


def _logp(m, batch, hidden, rows):
    from lorafleet.train.logprobs import sequence_logps

    return sequence_logps(m.lm_head, hidden, batch.labels, *rows)[0]


def test_kl_pairs_are_a_rotation_within_each_group():
    exs = _examples(6, 1)
    kind = KTOKind(group=3)
    seqs = kind.group_sequences(list(enumerate(exs)))
    kl = {i: s.tokens[len(exs[i].prompt) :] for i, s in seqs if s.role == "kl"}
    assert [kl[i] for i in range(6)] == [exs[j].completion for j in (2, 0, 1, 5, 3, 4)]


def test_loss_equals_trl_formula(model):
    """Loss and gradient against the formula of TRL's KTOTrainer computed from plain per-sequence passes."""
    exs, beta, wd, wu = _examples(6, 2), 0.3, 1.0, 1.5
    kind = KTOKind(beta, wd, wu, group=3)
    own, ref = pack_groups("k", "pol", kind, list(enumerate(exs)), reference="ref")
    batch = pack(order_groups([own], [ref]))
    model.zero_grad(set_to_none=True)
    hidden = model.forward_packed(batch.input_ids, batch, apply_head=False)
    out = kind.loss(model.lm_head, hidden, batch, "k", kind.step_norm(exs))
    out.loss.backward()
    ours = {k: p.grad.clone() for k, p in adapter_parameters(model, "pol").items()}

    def logp(adapter, prompt, answer, grad):
        from lorafleet.batch import FusedBatch
        from lorafleet.data.packing import pack as pack1

        b = pack1([("x", adapter, [(0, prompt + answer, (False,) * len(prompt) + (True,) * len(answer))])])
        with torch.set_grad_enabled(grad):
            h = model.forward_packed(b.input_ids, b, apply_head=False)
            assert isinstance(b, FusedBatch)
            return _logp(model, b, h, ([0], [len(prompt + answer)]))[0]

    model.zero_grad(set_to_none=True)
    losses = []
    for g0 in (0, 3):
        group = exs[g0 : g0 + 3]
        kl = [
            logp("pol", e.prompt, group[k - 1].completion, False)
            - logp("ref", e.prompt, group[k - 1].completion, False)
            for k, e in enumerate(group)
        ]
        z = torch.stack(kl).mean().clamp(min=0)
        for e in group:
            r = logp("pol", e.prompt, e.completion, True) - logp("ref", e.prompt, e.completion, False)
            losses.append(
                wd * (1 - F.sigmoid(beta * (r - z))) if e.label else wu * (1 - F.sigmoid(beta * (z - r)))
            )
    loss = torch.stack(losses).mean()
    loss.backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach(), rtol=1e-5, atol=1e-7)
    for k, p in adapter_parameters(model, "pol").items():
        assert p.grad.abs().max() > 0
        torch.testing.assert_close(ours[k], p.grad, rtol=1e-4, atol=1e-7)


def test_evaluation_keeps_groups_whole_and_does_not_depend_on_the_split(model):
    exs = _examples(8, 3)
    job = EvalJob("k", "pol", KTOKind(0.2, group=4), exs, reference="ref")
    whole = evaluate(model, [job], max_tokens=100_000)["k"]
    split = evaluate(model, [job], max_tokens=1)["k"]  # one group per batch (a group is never split)
    assert split.loss == pytest.approx(whole.loss, rel=1e-6)
    assert split.metrics == pytest.approx(whole.metrics, rel=1e-6)
    assert whole.perplexity is None and "kl" in whole.metrics
