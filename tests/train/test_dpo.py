"""Preference losses (DPO sigmoid / IPO with label smoothing, ORPO) against HF PEFT + the textbook formula.

Oracle: a ``transformers`` model with the same adapters loaded by PEFT; each sequence's log-probability is
computed on its own (no packing), the reference log-probabilities with PEFT's ``disable_adapter()``, and the
loss is written out directly from the papers' formulas. lorafleet computes the same losses from ONE fused
batch that holds two preference tasks, their base-model reference rows and an SFT task, with one backward.
Also: the bad-input path (a preference row without ``rejected`` names file:line).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorafleet.data.formats import Example, PreferenceExample
from lorafleet.data.packing import pack
from lorafleet.lora import (
    AdapterSpec,
    adapter_names,
    adapter_parameters,
    add_adapter,
    remove_adapter,
    save_peft,
)
from lorafleet.models import load_model
from lorafleet.train.tasks import DPOKind, ORPOKind, SFTKind, pack_groups

TARGETS = ("q_proj", "v_proj", "o_proj", "up_proj")


def _random_pairs(n: int, seed: int) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> tuple[int, ...]:
        return tuple(int(t) for t in torch.randint(3, 300, (k,), generator=g))

    out = []
    for _ in range(n):
        lp, lc, lr = (int(x) for x in torch.randint(2, 9, (3,), generator=g))
        out.append(PreferenceExample(ids(lp), ids(lc), ids(lr)))
    return out


def _sft_examples(n: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(4, 12, (1,), generator=g))
        tokens = tuple(int(t) for t in torch.randint(3, 300, (k,), generator=g))
        out.append(Example(tokens, (False,) * (k // 2) + (True,) * (k - k // 2)))
    return out


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Our model with three adapters (random, non-zero A and B) and the same adapters saved for PEFT."""
    model = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("dpo_adapters")
    g = torch.Generator().manual_seed(7)
    for name, rank in (("pref_a", 4), ("pref_b", 2), ("sft_c", 4)):
        spec = AdapterSpec(name=name, rank=rank, alpha=8.0, target_modules=TARGETS)
        add_adapter(model, spec)
        params = adapter_parameters(model, name)
        with torch.no_grad():
            for p in params.values():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        save_peft(out / name, spec, {k: p.detach() for k, p in params.items()})
    return model, out


def _peft_model(model_dir: Path, adapters: Path, name: str):
    import transformers as tf
    from peft import PeftModel

    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, adapters / name, adapter_name=name, is_trainable=True)
    pm.eval()  # no dropout (the adapters have none anyway)
    return pm


def _logp(model, prompt, answer) -> tuple[torch.Tensor, int]:
    """Sum of the answer tokens' log-probs given the prompt, one unpadded sequence; and the answer length."""
    ids = torch.tensor([list(prompt) + list(answer)])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logp[len(prompt) - 1 :].sum(), len(answer)


def _oracle_preference(pm, pairs, kind: str, beta: float, ls: float = 0.0, ipo: bool = False):
    """(loss, grads by PEFT key without the adapter name, margin, accuracy) written out plainly."""
    name = pm.active_adapter
    pm.zero_grad(set_to_none=True)
    losses, margins, wins = [], [], []
    nll_sum, nll_count = 0.0, 0
    for ex in pairs:
        (pc, nc), (pr, nr) = _logp(pm, ex.prompt, ex.chosen), _logp(pm, ex.prompt, ex.rejected)
        if kind == "orpo":
            ac, ar = pc / nc, pr / nr
            log_odds = (ac - ar) - (torch.log(1 - torch.exp(ac)) - torch.log(1 - torch.exp(ar)))
            losses.append(-beta * F.logsigmoid(log_odds))
            nll_sum, nll_count = nll_sum - pc, nll_count + nc
            margins.append(beta * (ac - ar).detach())
            wins.append(float(ac > ar))
            continue
        with torch.no_grad(), pm.disable_adapter():
            (rc, _), (rr, _) = _logp(pm, ex.prompt, ex.chosen), _logp(pm, ex.prompt, ex.rejected)
        if ipo:
            pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
        h = (pc - rc) - (pr - rr)
        if ipo:
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            losses.append(-(1 - ls) * F.logsigmoid(beta * h) - ls * F.logsigmoid(-beta * h))
        margins.append(beta * h.detach())
        wins.append(float((pc - rc) > (pr - rr)))
    loss = torch.stack(losses).mean()
    if kind == "orpo":
        loss = nll_sum / nll_count + loss
    loss.backward()
    grads = {
        n.replace(f".{name}.", "."): p.grad.clone()
        for n, p in pm.named_parameters()
        if "lora_" in n and p.grad is not None
    }
    return loss.detach(), grads, float(torch.stack(margins).mean()), sum(wins) / len(wins)


def _oracle_sft(pm, examples):
    pm.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([list(ex.tokens)])
        logits = pm(input_ids=ids).logits[0].float()
        sup = torch.tensor(ex.mask[1:])
        total = total + F.cross_entropy(logits[:-1][sup], ids[0, 1:][sup], reduction="sum")
        count += int(sup.sum())
    loss = total / count
    loss.backward()
    name = pm.active_adapter
    return loss.detach(), {
        n.replace(f".{name}.", "."): p.grad.clone() for n, p in pm.named_parameters() if "lora_" in n
    }


@pytest.mark.parametrize(
    "kind_a, kind_b",
    [
        (DPOKind(beta=0.1, loss_type="sigmoid", label_smoothing=0.1), DPOKind(beta=0.5, loss_type="ipo")),
        (DPOKind(beta=0.3), ORPOKind(beta=0.25)),
    ],
    ids=["sigmoid_ls+ipo", "sigmoid+orpo"],
)
def test_preference_losses_and_grads_match_peft(setup, tiny_model_dir, kind_a, kind_b):
    model, adapters = setup
    pairs_a, pairs_b, sft = _random_pairs(3, 1), _random_pairs(4, 2), _sft_examples(2, 3)
    kinds = {"pref_a": (kind_a, pairs_a), "pref_b": (kind_b, pairs_b), "sft_c": (SFTKind(), sft)}
    own, refs = [], []
    for name, (kind, exs) in kinds.items():
        g_own, g_ref = pack_groups(name, name, kind, list(enumerate(exs)))
        own.append(g_own)
        if g_ref is not None:
            refs.append(g_ref)
    batch = pack(own + refs)
    assert batch.segments[-1].adapter is None  # the reference rows run on the base, at the end
    model.zero_grad(set_to_none=True)
    hidden = model.forward_packed(batch.input_ids, batch, apply_head=False)
    outs = {
        name: kind.loss(model.lm_head, hidden, batch, name, kind.step_norm(exs))
        for name, (kind, exs) in kinds.items()
    }
    sum(o.loss for o in outs.values()).backward()

    for name, (kind, exs) in kinds.items():
        pm = _peft_model(tiny_model_dir, adapters, name)
        if isinstance(kind, SFTKind):
            loss, grads = _oracle_sft(pm, exs)
        else:
            ipo = isinstance(kind, DPOKind) and kind.loss_type == "ipo"
            ls = getattr(kind, "label_smoothing", 0.0)
            loss, grads, margin, acc = _oracle_preference(pm, exs, kind.name, kind.beta, ls, ipo)
            assert outs[name].metrics["reward_margin"] == pytest.approx(margin, rel=1e-4, abs=1e-6)
            assert outs[name].metrics["reward_accuracy"] == pytest.approx(acc)
        torch.testing.assert_close(outs[name].loss.detach(), loss, rtol=1e-5, atol=1e-6)
        ours = adapter_parameters(model, name)
        assert set(grads) == set(ours)
        for key, g in grads.items():
            assert g.abs().max() > 0, key
            torch.testing.assert_close(ours[key].grad, g, rtol=1e-4, atol=1e-6, msg=f"{name} {key}")


def test_step_loss_does_not_depend_on_micro_batch_split(setup):
    """Shares of a step add up: two micro-batches give the loss and gradient of one."""
    model, _ = setup
    kind, pairs = DPOKind(beta=0.2, label_smoothing=0.05), _random_pairs(4, 5)
    norm = kind.step_norm(pairs)

    def run(chunks):
        model.zero_grad(set_to_none=True)
        total, metrics = 0.0, {}
        for chunk in chunks:
            own, ref = pack_groups("t", "pref_a", kind, chunk)
            batch = pack([own, ref])
            hidden = model.forward_packed(batch.input_ids, batch, apply_head=False)
            out = kind.loss(model.lm_head, hidden, batch, "t", norm)
            out.loss.backward()
            total += float(out.loss.detach())
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v
        grads = {k: p.grad.clone() for k, p in adapter_parameters(model, "pref_a").items()}
        return total, metrics, grads

    items = list(enumerate(pairs))
    one = run([items])
    two = run([items[:1], items[1:]])
    assert one[0] == pytest.approx(two[0], rel=1e-5)
    for k in one[1]:
        assert one[1][k] == pytest.approx(two[1][k], rel=1e-5, abs=1e-7)
    for k in one[2]:
        torch.testing.assert_close(one[2][k], two[2][k], rtol=1e-4, atol=1e-7)


def test_preference_row_missing_rejected_names_file_and_line(tmp_path, tiny_model_dir):
    from lorafleet.data.formats import load_examples
    from lorafleet.data.sources import DataError
    from lorafleet.models.tokenizer import load_tokenizer

    path = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "Hello world.", "chosen": "hello World.", "rejected": "12345"},
        {"prompt": "The quick brown fox", "chosen": "jumps over the lazy dog"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class _DS:
        name, format, max_examples = "prefs", "preference", None

    _DS.path = str(path)
    with pytest.raises(DataError) as e:
        load_examples(_DS, load_tokenizer(tiny_model_dir), 64)
    assert f"{path}:2" in str(e.value) and "'rejected'" in str(e.value)


def _pref_rows(n: int, shift: int) -> list[dict]:
    prompts = ["What is the capital of France?", "Hello world.", "The quick brown fox", "def add(a, b):"]
    good = ["The capital of France is Paris.", "hello World.", "jumps over the lazy dog", "return a + b"]
    bad = ["12345 times!", "caf\u00e9, na\u00efve", "they'll see.", "HELLO, it's a tiny tokenizer"]
    return [
        {
            "prompt": prompts[(i + shift) % 4],
            "chosen": good[(i + shift) % 4],
            "rejected": bad[(i + 2 * shift) % 4],
        }
        for i in range(n)
    ]


def _pref_config(tmp: Path, model_dir: Path, train_rows: list[dict]) -> Path:
    import yaml

    def write(name, rows):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp / name)

    sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in _pref_rows(4, 0)]
    cfg = {
        "base_model": {"path": str(model_dir)},
        "output_dir": str(tmp / "run"),
        "datasets": [
            {"name": "prefs", "path": write("prefs.jsonl", train_rows), "format": "preference"},
            {
                "name": "prefs-eval",
                "path": write("prefs-eval.jsonl", _pref_rows(3, 1)),
                "format": "preference",
            },
            {"name": "sft", "path": write("sft.jsonl", sft_rows), "format": "prompt_completion"},
        ],
        "adapters": [{"name": n, "rank": 4, "alpha": 8, "dropout": 0.0} for n in ("d", "o", "s")],
        "tasks": [
            {
                "name": "d",
                "type": "dpo",
                "adapter": "d",
                "dataset": "prefs",
                "eval_dataset": "prefs-eval",
                "beta": 0.1,
                "label_smoothing": 0.1,
                "batch_size": 2,
                "micro_batch_size": 1,
                "max_steps": 2,
                "max_seq_len": 64,
            },
            {
                "name": "o",
                "type": "orpo",
                "adapter": "o",
                "dataset": "prefs",
                "beta": 0.2,
                "batch_size": 2,
                "max_steps": 2,
                "max_seq_len": 64,
            },
            {"name": "s", "adapter": "s", "dataset": "sft", "batch_size": 2, "max_steps": 2},
        ],  # fmt: skip
        "dispatcher": {"max_tokens_per_micro_batch": 512},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dpo_orpo_and_sft_train_together(tmp_path, tiny_model_dir):
    """Through ``lorafleet train``: at step 1 the adapter is zero (B = 0), so policy == reference and the DPO
    loss is exactly log 2 with zero margin; preference metrics are logged; the DPO eval has no perplexity."""
    import math

    from lorafleet.cli import main as cli_main

    cfg = _pref_config(tmp_path, tiny_model_dir, _pref_rows(4, 0))
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {(r["task"], r["step"]): r for r in recs if r.get("kind", "train") == "train"}
    assert set(train) == {(n, s) for n in "dos" for s in (1, 2)}
    d1 = train[("d", 1)]
    assert d1["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert d1["reward_margin"] == pytest.approx(0.0, abs=1e-6) and d1["reward_accuracy"] == 0.0
    assert abs(train[("d", 2)]["loss"] - math.log(2)) > 1e-4, "the first step must move the policy"
    assert {"nll", "or_loss", "reward_margin", "reward_accuracy"} <= set(train[("o", 1)])
    o1 = train[("o", 1)]
    assert o1["loss"] == pytest.approx(o1["nll"] + 0.2 * o1["or_loss"], rel=1e-6)
    evals = [r for r in recs if r.get("kind") == "eval"]
    assert [(r["task"], r["step"]) for r in evals] == [("d", 2)]
    assert "eval_reward_accuracy" in evals[0] and "eval_perplexity" not in evals[0]
    for name in "dos":
        assert (tmp_path / "run" / "adapters" / name / "adapter_model.safetensors").is_file()
    # lorafleet eval on the saved DPO adapter reproduces the last in-training evaluation.
    from lorafleet.config import load_config
    from lorafleet.data.formats import load_examples
    from lorafleet.lora import load_peft
    from lorafleet.models.tokenizer import load_tokenizer
    from lorafleet.train.evaluate import EvalJob, evaluate
    from lorafleet.train.tasks import task_kind

    cfg_obj = load_config(cfg)
    task = cfg_obj.tasks[0]
    model = load_model(tiny_model_dir)
    load_peft(model, tmp_path / "run" / "adapters" / "d", "d")
    held_out = load_examples(cfg_obj.datasets[1], load_tokenizer(tiny_model_dir), task.max_seq_len)
    again = evaluate(model, [EvalJob("d", "d", task_kind(task), held_out)], max_tokens=100)["d"]
    assert again.loss == pytest.approx(evals[0]["eval_loss"], rel=1e-6)
    assert again.metrics["reward_accuracy"] == pytest.approx(evals[0]["eval_reward_accuracy"])


def test_train_preference_row_missing_rejected(tmp_path, tiny_model_dir, capsys):
    from lorafleet.cli import main as cli_main

    rows = _pref_rows(3, 0)
    del rows[1]["rejected"]
    cfg = _pref_config(tmp_path, tiny_model_dir, rows)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'prefs.jsonl'}:2: missing field 'rejected'" in err, err
    assert "Traceback" not in err


def test_reference_lives_with_its_task(tmp_path, tiny_model_dir):
    """A reference folder is on the model, frozen, while its task trains and gone when it ends; a reference
    that cannot be read takes the task's own adapter off again (nothing is left on the model)."""
    from lorafleet.config import load_config
    from lorafleet.train.engine import Engine
    from lorafleet.train.reference import REFERENCE_SUFFIX

    model = load_model(tiny_model_dir)
    spec = AdapterSpec("r", rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    add_adapter(model, spec)
    save_peft(tmp_path / "ref", spec, {k: p.detach() for k, p in adapter_parameters(model, "r").items()})
    remove_adapter(model, "r")
    path = _pref_config(tmp_path, tiny_model_dir, _pref_rows(4, 0))
    cfg = load_config(path)
    cfg.tasks[0].reference = str(tmp_path / "ref")
    engine = Engine(cfg, model=model, tensorboard=False)
    ref = "d" + REFERENCE_SUFFIX
    assert ref in adapter_names(model)
    assert not any(p.requires_grad for p in adapter_parameters(model, ref).values())
    states = engine.run()
    assert states["d"].status == "succeeded"
    assert adapter_names(model) == []

    (tmp_path / "ref" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="reference"):
        Engine(cfg, model=model, tensorboard=False)
    assert adapter_names(model) == []
