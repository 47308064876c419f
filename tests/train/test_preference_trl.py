"""Preference training against TRL (the oracle): DPO from a trained starting adapter, a reference adapter
from a folder, IPO and label smoothing, and KTO, each trained by ``lorafleet train`` beside other tasks and
compared step by step with TRL's ``DPOTrainer`` / ``KTOTrainer`` on a PEFT model holding the same adapter.

Both sides see the same token ids: our loader tokenizes the rows, and TRL gets those ids through a
tokenizer stand-in (``_ids_tokenize``) that reads them back from the text, so only the training math is
compared (TRL appends the eos token itself, as our loader does). TRL runs with sequential sampling,
constant LR, AdamW without weight decay and no clipping; ``per_device_train_batch_size`` is our
``micro_batch_size`` and ``gradient_accumulation_steps`` is ``batch_size / micro_batch_size``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from lorafleet.cli import main as cli_main
from lorafleet.config import load_config
from lorafleet.data.formats import load_examples
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, read_peft, save_peft
from lorafleet.models import load_model
from lorafleet.models.tokenizer import load_tokenizer

LR = 2e-2
# Adam's first steps move every weight by about sign(grad) * LR: a larger epsilon keeps the weights whose
# gradient is at float-noise level (in either implementation) from taking full steps in random directions.
EPS = 1e-4
PROMPTS = ["What is the capital of France?", "Hello world.", "The quick brown fox", "def add(a, b):"]
GOOD = ["The capital of France is Paris.", "hello World.", "jumps over the lazy dog", "return a + b"]
BAD = ["12345 times!", "caf\u00e9, na\u00efve", "they'll see.", "HELLO, it's a tiny tokenizer"]


@pytest.fixture(scope="module")
def inits(tiny_model_dir, tmp_path_factory):
    """Starting adapters (random, non-zero A and B, as after SFT), saved in PEFT's format."""
    out = tmp_path_factory.mktemp("pref_inits")
    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(11)
    specs = {
        "init_a": AdapterSpec("init_a", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
        "init_b": AdapterSpec("init_b", rank=2, alpha=4.0, target_modules=("o_proj", "up_proj", "down_proj")),
    }
    for name, spec in specs.items():
        add_adapter(model, spec)
        params = adapter_parameters(model, name)
        with torch.no_grad():
            for p in params.values():
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        save_peft(out / name, spec, {k: p.detach() for k, p in params.items()})
    return out


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(n: int, shift: int = 0) -> list[dict]:
    return [
        {
            "prompt": PROMPTS[(i + shift) % 4],
            "chosen": GOOD[(i + shift) % 4],
            "rejected": BAD[(i + 3 * shift + 1) % 4],
        }
        for i in range(n)
    ]


def _unpaired(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        good = i % 3 != 1
        rows.append(
            {"prompt": PROMPTS[i % 4], "completion": (GOOD if good else BAD)[(i * 3) % 4], "label": good}
        )
    return rows


def _train(tmp: Path, model_dir: Path, adapters: list[dict], tasks: list[dict], datasets: list[dict]) -> Path:
    cfg = {
        "base_model": {"path": str(model_dir)},
        "output_dir": str(tmp / "run"),
        "datasets": datasets,
        "adapters": [{"dropout": 0.0, **a} for a in adapters],
        "tasks": [
            {"shuffle": False, "max_seq_len": 64, "optimizer": {"lr": LR, "eps": EPS}, **t} for t in tasks
        ],
        "dispatcher": {"max_tokens_per_micro_batch": 2048},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path), "--no-progress"]) == 0
    return path


def _losses(run: Path, task: str) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("task") == task and r.get("kind", "train") == "train"]


# ---------------------------------------------------------------------------------------------------------
# TRL side.


def _ids_text(ids) -> str:
    return "".join(f" {int(t)}" for t in ids)


@pytest.fixture
def ids_tokenizer(monkeypatch, tiny_model_dir):
    """The HF tokenizer for TRL, with TRL's tokenization replaced by reading ``_ids_text`` back."""
    import transformers as tf
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.kto_trainer as kto_mod

    tok = tf.AutoTokenizer.from_pretrained(tiny_model_dir)
    eos, eos_id = tok.eos_token, tok.eos_token_id

    def ids_tokenize(processing_class, text, **_):
        return {"input_ids": [int(x) for x in text.replace(eos, f" {eos_id}").split()]}

    monkeypatch.setattr(dpo_mod, "_tokenize", ids_tokenize)
    monkeypatch.setattr(kto_mod, "_tokenize", ids_tokenize)
    return tok


def _without_eos(ids, eos_id: int) -> tuple[int, ...]:
    assert ids[-1] == eos_id
    return tuple(ids[:-1])


def _trl_run(kind: str, model_dir, init: Path, rows, task: dict, tok, tmp: Path, ref: Path | None = None):
    """Train with TRL on a PEFT model holding ``init``; returns (step losses, final adapter weights)."""
    import transformers as tf
    from datasets import Dataset
    from peft import PeftModel, get_peft_model_state_dict
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    torch.manual_seed(0)
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, init, is_trainable=True)
    mbs = task.get("micro_batch_size", task["batch_size"])
    common = dict(
        output_dir=str(tmp / f"trl_{kind}"),
        per_device_train_batch_size=mbs,
        gradient_accumulation_steps=task["batch_size"] // mbs,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_steps=task["max_steps"],
        weight_decay=0.0,
        adam_epsilon=EPS,
        max_grad_norm=0.0,
        beta=task.get("beta", 0.1),
        train_sampling_strategy="sequential",
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        dataloader_drop_last=False,
        gradient_checkpointing=False,
        bf16=False,  # TRL's configs default to bf16 (CPU autocast): the oracle runs in float32 as we do
    )
    micro: list[float] = []
    if kind == "dpo":
        ls = task.get("label_smoothing", 0.0)
        if ls:
            # TRL 1.16's sigmoid loss has no label smoothing; cDPO's (1 - ls) a + ls b, with a = -logsig(beta h)
            # and b = -logsig(-beta h), is 2 (1 - ls) sigmoid - (1 - 2 ls) robust in TRL's own loss terms
            # (robust = ((1 - ls) a - ls b) / (1 - 2 ls)).
            losses = {"loss_type": ["sigmoid", "robust"], "loss_weights": [2 * (1 - ls), -(1 - 2 * ls)]}
        else:
            losses = {"loss_type": [task.get("loss_type", "sigmoid")]}
        args = DPOConfig(label_smoothing=ls, **losses, **common)
        cls = DPOTrainer
    else:
        args = KTOConfig(
            desirable_weight=task.get("desirable_weight", 1.0),
            undesirable_weight=task.get("undesirable_weight", 1.0),
            **common,
        )
        cls = KTOTrainer

    class Recording(cls):
        def compute_loss(self, model, inputs, *a, **k):
            loss = super().compute_loss(model, inputs, *a, **k)
            micro.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    trainer = Recording(model=pm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    if ref is not None:  # TRL's reference for a PEFT model is its adapter named "ref": make it the folder's
        trainer.model.delete_adapter("ref")
        trainer.model.load_adapter(str(ref), adapter_name="ref", is_trainable=False)
        trainer.model.set_adapter("default")
    assert "ref" in trainer.model.peft_config  # the starting adapter's copy (or the folder's), not the base
    trainer.train()
    g = task["batch_size"] // mbs
    steps = [sum(micro[i : i + g]) / g for i in range(0, len(micro), g)]
    state = get_peft_model_state_dict(trainer.model, adapter_name="default")
    return steps, {k: v.detach().float() for k, v in state.items()}


def _assert_same_weights(run: Path, adapter: str, trl_state: dict, init: Path) -> None:
    _, ours = read_peft(run / "adapters" / adapter, adapter)
    _, start = read_peft(init, "start")
    assert set(ours) == set(trl_state)
    moved = max(float((ours[k] - start[k]).abs().max()) for k in ours)
    assert moved > 10 * LR * 0.1, "training must move the adapter"
    # Relative to each tensor's norm at 1e-4; no single element beyond 1e-3 of the tensor's largest. Adam
    # divides every gradient by its own running RMS, so the float32 rounding of a near-zero gradient moves
    # its element by a visible fraction of the learning rate: the elementwise maximum is one element's noise
    # (measured 1.08e-4 of the largest weight on an AVX-512 CPU, where the norm error is far below it).
    for k, v in trl_state.items():
        d = ours[k] - v
        err = float(d.norm()) / max(float(v.norm()), 1e-12)
        worst = float(d.abs().max()) / max(float(v.abs().max()), 1e-12)
        print(f"{adapter} {k}: {err:.2e} relative (norm), worst element {worst:.2e}")
        assert err <= 1e-4, f"{adapter} {k}: {err:.2e} relative (norm)"
        assert worst <= 1e-3, f"{adapter} {k}: an element {worst:.2e} of the largest off"


def _dpo_rows(cfg_path: Path, dataset: str, task_name: str, tok) -> list[dict]:
    cfg = load_config(cfg_path)
    ds = next(d for d in cfg.datasets if d.name == dataset)
    task = next(t for t in cfg.tasks if t.name == task_name)
    exs = load_examples(ds, load_tokenizer(cfg.base_model.path), task.max_seq_len)
    eos = tok.eos_token_id
    if ds.format == "preference":
        return [
            {
                "prompt": _ids_text(e.prompt),
                "chosen": _ids_text(_without_eos(e.chosen, eos)),
                "rejected": _ids_text(_without_eos(e.rejected, eos)),
            }
            for e in exs
        ]
    return [
        {
            "prompt": _ids_text(e.prompt),
            "completion": _ids_text(_without_eos(e.completion, eos)),
            "label": e.label,
        }
        for e in exs
    ]


# ---------------------------------------------------------------------------------------------------------
# The checks.


@pytest.mark.slow
def test_dpo_from_starting_adapters_equals_trl(tmp_path, tiny_model_dir, inits, ids_tokenizer):
    """Two DPO tasks with different ranks and targets, each from a trained adapter (reference: its copy),
    one micro-batched and one with label smoothing, beside an SFT task: each equals TRL, and the first
    step's loss is log 2 (the policy starts equal to its reference)."""
    sft_rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, GOOD)]
    datasets = [
        {"name": "pa", "path": _write(tmp_path / "pa.jsonl", _pairs(6, 0)), "format": "preference"},
        {"name": "pb", "path": _write(tmp_path / "pb.jsonl", _pairs(4, 1)), "format": "preference"},
        {"name": "s", "path": _write(tmp_path / "s.jsonl", sft_rows), "format": "prompt_completion"},
    ]
    adapters = [
        {"name": "a", "rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_from": str(inits / "init_a")},
        {"name": "b", "rank": 2, "alpha": 4, "target_modules": ["o_proj", "up_proj", "down_proj"],
         "init_from": str(inits / "init_b")},
        {"name": "s", "rank": 4, "alpha": 8},
    ]  # fmt: skip
    tasks = [
        {"name": "a", "type": "dpo", "adapter": "a", "dataset": "pa", "beta": 0.2, "batch_size": 2,
         "micro_batch_size": 1, "max_steps": 3},
        {"name": "b", "type": "dpo", "adapter": "b", "dataset": "pb", "beta": 0.1, "label_smoothing": 0.1,
         "batch_size": 2, "max_steps": 3},
        {"name": "s", "adapter": "s", "dataset": "s", "batch_size": 2, "max_steps": 3},
    ]  # fmt: skip
    cfg = _train(tmp_path, tiny_model_dir, adapters, tasks, datasets)
    run = tmp_path / "run"
    for task, ds, init in ((tasks[0], "pa", "init_a"), (tasks[1], "pb", "init_b")):
        ours = _losses(run, task["name"])
        assert len(ours) == 3
        assert ours[0] == pytest.approx(math.log(2), abs=1e-6)
        rows = _dpo_rows(cfg, ds, task["name"], ids_tokenizer)
        trl_losses, trl_state = _trl_run(
            "dpo", tiny_model_dir, inits / init, rows, task, ids_tokenizer, tmp_path
        )
        assert trl_losses[0] == pytest.approx(math.log(2), abs=1e-6)
        assert ours == pytest.approx(trl_losses, rel=1e-4)
        _assert_same_weights(run, task["adapter"], trl_state, inits / init)


@pytest.mark.slow
def test_dpo_reference_path_ipo_equals_trl(tmp_path, tiny_model_dir, inits, ids_tokenizer):
    """``reference: PATH`` (another adapter, other rank and targets) with the IPO loss equals TRL with that
    adapter as its reference; the policy starts from init_a."""
    datasets = [{"name": "p", "path": _write(tmp_path / "p.jsonl", _pairs(4, 2)), "format": "preference"}]
    adapters = [
        {
            "name": "c",
            "rank": 4,
            "alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_from": str(inits / "init_a"),
        }
    ]
    task = {"name": "c", "type": "dpo", "adapter": "c", "dataset": "p", "beta": 0.5, "loss_type": "ipo",
            "reference": str(inits / "init_b"), "batch_size": 2, "max_steps": 3}  # fmt: skip
    cfg = _train(tmp_path, tiny_model_dir, adapters, [task], datasets)
    ours = _losses(tmp_path / "run", "c")
    rows = _dpo_rows(cfg, "p", "c", ids_tokenizer)
    trl_losses, trl_state = _trl_run(
        "dpo", tiny_model_dir, inits / "init_a", rows, task, ids_tokenizer, tmp_path, ref=inits / "init_b"
    )
    assert ours == pytest.approx(trl_losses, rel=1e-4)
    _assert_same_weights(tmp_path / "run", "c", trl_state, inits / "init_a")


@pytest.mark.slow
def test_kto_beside_sft_equals_trl(tmp_path, tiny_model_dir, inits, ids_tokenizer):
    """KTO (KL groups of micro_batch_size, two per step, unequal weights) from a starting adapter, trained
    beside an SFT task, equals TRL's KTOTrainer step by step."""
    sft_rows = [{"prompt": p, "completion": c} for p, c in zip(PROMPTS, GOOD)]
    datasets = [
        {"name": "u", "path": _write(tmp_path / "u.jsonl", _unpaired(8)), "format": "unpaired_preference"},
        {"name": "s", "path": _write(tmp_path / "s.jsonl", sft_rows), "format": "prompt_completion"},
    ]
    adapters = [
        {"name": "k", "rank": 2, "alpha": 4, "target_modules": ["o_proj", "up_proj", "down_proj"],
         "init_from": str(inits / "init_b")},
        {"name": "s", "rank": 4, "alpha": 8},
    ]  # fmt: skip
    task = {"name": "k", "type": "kto", "adapter": "k", "dataset": "u", "beta": 0.3, "undesirable_weight": 1.5,
            "batch_size": 4, "micro_batch_size": 2, "max_steps": 2}  # fmt: skip
    sft = {"name": "s", "adapter": "s", "dataset": "s", "batch_size": 2, "max_steps": 2}
    cfg = _train(tmp_path, tiny_model_dir, adapters, [task, sft], datasets)
    ours = _losses(tmp_path / "run", "k")
    rows = _dpo_rows(cfg, "u", "k", ids_tokenizer)
    trl_losses, trl_state = _trl_run(
        "kto", tiny_model_dir, inits / "init_b", rows, task, ids_tokenizer, tmp_path
    )
    assert ours == pytest.approx(trl_losses, rel=1e-4)
    _assert_same_weights(tmp_path / "run", "k", trl_state, inits / "init_b")
