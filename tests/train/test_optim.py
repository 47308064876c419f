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


# -- lorafleet's AdamW and schedule against torch.optim.AdamW + LambdaLR (the oracle) -------------------------


def _groups(gen: torch.Generator, params: list[torch.nn.Parameter]) -> list[dict]:
    """Three groups with their own lr and weight decay (one with weight decay 0, one with the defaults)."""
    return [
        {"params": params[0:2], "lr": 3e-2, "weight_decay": 0.1},
        {"params": params[2:4], "lr": 1e-2, "weight_decay": 0.0},
        {"params": params[4:6]},
    ]


def _twins(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 5), (5, 2), (7,), (1, 1)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return g, ours, theirs


def _pair(ours, theirs, warmup=2, total=9, name="cosine"):
    kw = {"lr": 2e-2, "weight_decay": 0.01, "betas": (0.8, 0.95), "eps": 1e-6}
    g = torch.Generator()
    opt = build_optimizer(_groups(g, ours), "adamw", kw["lr"], kw["weight_decay"], kw["betas"], kw["eps"])
    sched = build_scheduler(opt, name, warmup, total)
    ref = torch.optim.AdamW(_groups(g, theirs), **kw)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lambda s: lr_factor(name, s, warmup, total))
    return opt, sched, ref, ref_sched


def _step_both(gen, ours, theirs, opt, sched, ref, ref_sched, step):
    for i, (p, q) in enumerate(zip(ours, theirs, strict=True)):
        if (i + step) % 3 == 0:  # some parameters have no gradient in some steps (and #5 never gets one)
            continue
        if i == 5:
            continue
        gr = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = gr.clone(), gr.clone()
    assert sched.get_last_lr() == ref_sched.get_last_lr()
    opt.step()
    ref.step()
    sched.step()
    ref_sched.step()
    opt.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)


def _assert_same(ours, theirs, opt, ref):
    for p, q in zip(ours, theirs, strict=True):
        assert torch.equal(p, q)
        assert p.grad is None and q.grad is None
    mine, torch_sd = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == torch_sd["param_groups"]  # every key, lr and initial_lr included
    assert mine["state"].keys() == torch_sd["state"].keys()
    for k, s in mine["state"].items():
        assert s.keys() == torch_sd["state"][k].keys()
        for name, t in s.items():
            ref_t = torch_sd["state"][k][name]
            assert t.dtype == ref_t.dtype and t.device == ref_t.device and torch.equal(t, ref_t), (k, name)


def test_adamw_and_schedule_are_bit_equal_to_torch_over_groups_warmup_and_cosine():
    gen, ours, theirs = _twins()
    opt, sched, ref, ref_sched = _pair(ours, theirs)
    for step in range(12):  # past the end of the cosine (total 9): lr 0 from then on
        _step_both(gen, ours, theirs, opt, sched, ref, ref_sched, step)
    _assert_same(ours, theirs, opt, ref)
    assert 5 not in opt.state_dict()["state"]  # never had a gradient: no state, as in torch
    assert sched.state_dict() == ref_sched.state_dict()
    assert opt.state_dict()["state"][0]["step"].dtype == torch.float32


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dicts_round_trip_both_ways_and_training_continues_equal(direction, tmp_path):
    gen, ours, theirs = _twins(1)
    opt, sched, ref, ref_sched = _pair(ours, theirs, name="linear")
    for step in range(4):
        _step_both(gen, ours, theirs, opt, sched, ref, ref_sched, step)
    # a checkpoint on disk, as train/checkpoint.py writes it
    src_opt, src_sched = (opt, sched) if direction == "ours_to_torch" else (ref, ref_sched)
    torch.save({"optimizer": src_opt.state_dict(), "scheduler": src_sched.state_dict()}, tmp_path / "o.pt")
    saved = torch.load(tmp_path / "o.pt", weights_only=False)
    # fresh optimizers of the other kind on the same parameters resume from it
    fresh_ours, fresh_theirs = ([torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in (ours, theirs))
    opt2, sched2, ref2, ref_sched2 = _pair(fresh_ours, fresh_theirs, name="linear")

    def disk(sd):  # a copy through a file: loaded state would otherwise alias the live tensors it came from
        torch.save(sd, tmp_path / "x.pt")
        return torch.load(tmp_path / "x.pt", weights_only=False)

    if direction == "ours_to_torch":  # torch loads ours, then ours loads torch's
        ref2.load_state_dict(saved["optimizer"])
        ref_sched2.load_state_dict(saved["scheduler"])
        opt2.load_state_dict(disk(ref2.state_dict()))
        sched2.load_state_dict(disk(ref_sched2.state_dict()))
    else:
        opt2.load_state_dict(saved["optimizer"])
        sched2.load_state_dict(saved["scheduler"])
        ref2.load_state_dict(disk(opt2.state_dict()))
        ref_sched2.load_state_dict(disk(sched2.state_dict()))
    _assert_same(fresh_ours, fresh_theirs, opt2, ref2)
    gen2 = torch.Generator()
    gen2.set_state(gen.get_state())  # both runs get the same gradients from here on
    for step in range(4, 10):
        _step_both(gen2, fresh_ours, fresh_theirs, opt2, sched2, ref2, ref_sched2, step)
        _step_both(gen, ours, theirs, opt, sched, ref, ref_sched, step)
    _assert_same(fresh_ours, fresh_theirs, opt2, ref2)
    _assert_same(ours, fresh_ours, opt, opt2)  # the resumed run equals the uninterrupted one
    assert sched2.state_dict() == ref_sched2.state_dict() == sched.state_dict()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": -1e-3}, "invalid learning rate -0.001"),
        ({"eps": -1.0}, "invalid epsilon value -1.0"),
        ({"weight_decay": -0.1}, "invalid weight_decay value -0.1"),
        ({"betas": (1.0, 0.99)}, "invalid beta parameter at index 0: 1.0"),
        ({"betas": (0.9, -0.5)}, "invalid beta parameter at index 1: -0.5"),
        ({"lr": float("nan")}, "lr must be a number, got nan"),
    ],
)
def test_bad_hyper_parameters_are_refused_like_torch(kwargs, match):
    from lorafleet.train.adamw import AdamW

    p = torch.nn.Parameter(torch.zeros(2))
    full = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, **kwargs}
    if "nan" not in match:
        with pytest.raises(ValueError):  # torch refuses it too
            torch.optim.AdamW([p], **full)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        AdamW([p], **full)
    with pytest.raises(ValueError, match=match):  # a group's own override is checked as well
        AdamW([{"params": [p], **kwargs}])


def test_bad_parameter_lists_and_state_dicts_are_refused():
    from lorafleet.train.adamw import AdamW

    p, q = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="empty parameter list"):
        AdamW([])
    with pytest.raises(ValueError, match="more than one parameter group"):
        AdamW([{"params": [p]}, {"params": [p, q]}])
    with pytest.raises(ValueError, match="non-leaf"):
        AdamW([p * 2])
    opt = AdamW([{"params": [p]}, {"params": [q]}])
    with pytest.raises(ValueError, match="1 parameter groups, the optimizer has 2"):
        opt.load_state_dict(AdamW([p, q]).state_dict())
    with pytest.raises(ValueError, match="group 1 has 2 parameters, the optimizer's has 1"):
        opt.load_state_dict(
            AdamW([{"params": [p]}, {"params": [q, torch.nn.Parameter(torch.zeros(1))]}]).state_dict()
        )
    amsgrad = torch.optim.AdamW([{"params": [p]}, {"params": [q]}], amsgrad=True).state_dict()
    with pytest.raises(ValueError, match="amsgrad=True is not supported"):
        opt.load_state_dict(amsgrad)
