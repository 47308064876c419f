"""LR schedules against transformers' own schedulers; AdamW and the squared-norm helper."""

from __future__ import annotations

import pytest
import torch

from lorafleet.train.optim import build_optimizer, build_scheduler, grad_norm_sq, lr_factor


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (5, 5), (1, 1), (4, 37)])
def test_schedules_equal_transformers(name, warmup, total):
    import transformers as tf

    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=0.1)
        sched = make(opt)
        out = []
        for _ in range(total + 2):  # two steps past the end: the decay stays at 0
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    theirs = {
        "constant": lambda o: tf.get_constant_schedule_with_warmup(o, warmup),
        "linear": lambda o: tf.get_linear_schedule_with_warmup(o, warmup, total),
        "cosine": lambda o: tf.get_cosine_schedule_with_warmup(o, warmup, total),
    }[name]
    ours = lrs(lambda o: build_scheduler(o, name, warmup, total))
    assert ours == pytest.approx(lrs(theirs), abs=1e-12)
    assert ours[0] == (0.0 if warmup else 0.1)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown lr scheduler 'step'; use constant, linear or cosine"):
        lr_factor("step", 5, 0, 10)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'; use adamw"):
        build_optimizer(
            [{"params": [torch.nn.Parameter(torch.zeros(1))]}], "sgd", 1e-3, 0.0, (0.9, 0.99), 1e-8
        )


def test_adamw_with_lora_plus_groups_equals_torch():
    g = torch.Generator().manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(2))
    ref_a, ref_b = (torch.nn.Parameter(p.detach().clone()) for p in (a, b))
    groups = [{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 4e-2}]
    ours = build_optimizer(groups, "adamw", 1e-2, 0.01, (0.8, 0.95), 1e-6)
    ref = torch.optim.AdamW(
        [{"params": [ref_a], "lr": 1e-2}, {"params": [ref_b], "lr": 4e-2}],
        weight_decay=0.01,
        betas=(0.8, 0.95),
        eps=1e-6,
    )
    for _ in range(3):
        grads = [torch.randn(4, 3, generator=g) for _ in range(2)]
        for p, q, gr in zip((a, b), (ref_a, ref_b), grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, ref_a, rtol=0, atol=0)
    torch.testing.assert_close(b, ref_b, rtol=0, atol=0)


def test_grad_norm_sq_adds_up_over_slices():
    ps = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    for i, p in enumerate(ps):
        p.grad = torch.full((3,), float(i + 1))
    whole = float(grad_norm_sq(ps))
    assert whole == pytest.approx(3 * (1 + 4 + 9))
    assert float(grad_norm_sq(ps[:1])) + float(grad_norm_sq(ps[1:])) == pytest.approx(whole)
    assert float(torch.nn.utils.get_total_norm([p.grad for p in ps])) ** 2 == pytest.approx(whole)
    assert float(grad_norm_sq([torch.nn.Parameter(torch.zeros(2))])) == 0.0  # no gradient yet
