"""The engine's oracle: tasks written as a config through the CLI's format, and each adapter trained alone by
HF PEFT + torch AdamW on the same examples in the same order (loss = sum of token CE / supervised tokens).

``TASKS`` specs are ``(rank, alpha, targets, lr, batch_size, micro_batch_size, rows, rslora)``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

__all__ = ["STEPS", "TASKS", "engine_config", "peft_alone", "peft_init", "rel_diff", "write_data"]

PROMPTS = [
    "What is the capital of France?",
    "Hello world.",
    "The quick brown fox",
    "def add(a, b):",
    "caf\u00e9, na\u00efve",
    "HELLO, it's a tiny tokenizer",
    "jumps over the lazy dog",
    "12345 times!",
    "they'll see.",
    "Paris is",
]
COMPLETIONS = [
    "The capital of France is Paris.",
    "hello World.",
    "jumps over the lazy dog, 12345 times!",
    "return a + b",
    "\u65e5\u672c\u8a9e emoji",
    "for tests; they'll see.",
    "12345",
    "quick brown",
    "Hello",
    "the capital of France.",
]


def write_data(path: Path, shift: int, n: int) -> None:
    rows = [
        {"prompt": PROMPTS[(i + shift) % 10], "completion": COMPLETIONS[(i * 3 + shift) % 10]}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# adapter name -> (rank, alpha, targets, lr, batch_size, micro_batch_size, rows, rslora)
TASKS = {
    "a": (4, 8, ["q_proj", "v_proj"], 1e-2, 4, 4, 9, False),
    "b": (
        8,
        8,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        5e-3,
        4,
        2,
        7,
        True,
    ),
    "c": (2, 4, ["o_proj", "down_proj"], 2e-2, 2, 1, 5, False),
}
STEPS = 3


def peft_init(model_dir: Path, out: Path, name: str, rank, alpha, targets, rslora, seed, dora=False) -> None:
    """An adapter made by PEFT with random A and B (so every gradient is non-trivial), saved in out / name.

    MoE expert targets (``experts.gate_up_proj``, ``experts.down_proj``) go through PEFT's target_parameters.
    """
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    from lorafleet.lora.experts import EXPERT_TARGETS

    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    modules = [t for t in targets if t not in EXPERT_TARGETS]
    params = [f"mlp.{t}" for t in targets if t in EXPERT_TARGETS] or None
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=modules, target_parameters=params, lora_dropout=0.0,
        use_rslora=rslora, use_dora=dora,
    )  # fmt: skip
    pm = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(out / name)


def engine_config(tmp: Path, model_dir: Path, tasks: dict, **task_overrides) -> Path:
    cfg = {
        "base_model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "output_dir": str(tmp / "run"),
        "seed": 0,
        "datasets": [],
        "adapters": [],
        "tasks": [],
        "dispatcher": {"max_concurrent_tasks": 8, "max_tokens_per_micro_batch": 256},
    }
    for i, (name, (rank, alpha, targets, lr, bs, mbs, rows, rslora)) in enumerate(tasks.items()):
        write_data(tmp / f"{name}.jsonl", i, rows)
        cfg["datasets"].append(
            {"name": name, "path": str(tmp / f"{name}.jsonl"), "format": "prompt_completion"}
        )
        cfg["adapters"].append(
            {
                "name": name,
                "rank": rank,
                "alpha": alpha,
                "dropout": 0.0,
                "use_rslora": rslora,
                "target_modules": targets,
                "init_from": str(tmp / "init" / name),
            }
        )
        task = {
            "name": name,
            "adapter": name,
            "dataset": name,
            "batch_size": bs,
            "micro_batch_size": mbs,
            "max_steps": STEPS,
            "max_seq_len": 64,
            "shuffle": False,
            "optimizer": {"lr": lr, "weight_decay": 0.01},
            "save_every_steps": 1,
        }
        task.update(task_overrides.get(name, {}))
        cfg["tasks"].append(task)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def peft_alone(model_dir: Path, tmp: Path, name: str, spec: tuple, shift: int) -> dict[str, torch.Tensor]:
    """The oracle: one PEFT model, torch AdamW, the same examples in the same order, loss = sum CE / count."""
    import transformers as tf
    from peft import PeftModel

    rank, alpha, targets, lr, bs, mbs, rows, rslora = spec
    tok = tf.AutoTokenizer.from_pretrained(model_dir)
    data = [json.loads(line) for line in (tmp / f"{name}.jsonl").read_text().splitlines()]
    examples = []
    for r in data:
        p = tok(r["prompt"], add_special_tokens=True)["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = (p + c)[:64]
        labels = ([-100] * len(p) + c)[:64]
        examples.append((ids, labels))
    base = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, tmp / "init" / name, is_trainable=True)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    for step in range(STEPS):
        batch = [examples[(step * bs + j) % len(examples)] for j in range(bs)]
        count = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in batch)
        total = 0.0
        for ids, lab in batch:
            logits = pm(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(lab[1:])
            total = total + torch.nn.functional.cross_entropy(
                logits, target, ignore_index=-100, reduction="sum"
            )
        (total / count).backward()
        opt.step()
        opt.zero_grad()
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(pm).items()}


def rel_diff(a: dict, b: dict) -> float:
    """Relative L2 distance of two state dicts with the same keys: |a - b| / |b|."""
    assert set(a) == set(b), set(a) ^ set(b)
    num = sum(float((a[k].float() - b[k].float()).norm() ** 2) for k in a) ** 0.5
    den = sum(float(b[k].float().norm() ** 2) for k in b) ** 0.5
    return num / den
