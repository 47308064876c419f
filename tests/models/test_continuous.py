"""Continuous batching: rows that join and leave between decode steps, each with its own adapter, give the
tokens ``generate`` gives for that prompt and adapter alone (greedy), and sampled rows do not depend on the
other rows in their steps."""

from __future__ import annotations

import torch

from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter
from lorafleet.models import load_model
from lorafleet.models.continuous import ContinuousBatcher, GenRow
from lorafleet.models.generate import generate
from lorafleet.models.tokenizer import load_tokenizer


def _model_with_adapters(path):
    model = load_model(path)
    g = torch.Generator().manual_seed(5)
    for name, rank, targets in [("a", 4, ("q_proj", "v_proj")), ("b", 2, ("q_proj", "o_proj", "down_proj"))]:
        add_adapter(model, AdapterSpec(name=name, rank=rank, alpha=8.0, target_modules=targets))
        with torch.no_grad():
            for p in adapter_parameters(model, name).values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_rows_join_and_leave_and_equal_generate_alone(tiny_model_dir):
    model = _model_with_adapters(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    texts = [
        "What is the capital of France?",
        "Hello",
        "The quick brown fox",
        "12345 678",
        "a b c",
        "Hi there",
    ]
    adapters = ["a", None, "b", "a", "b", None]
    lengths = [9, 3, 12, 6, 1, 7]
    prompts = [tok.encode(t, add_special_tokens=True) for t in texts]
    alone = [
        generate(model, tok, [p], n, adapters=[a], stop_ids=[])[0]
        for p, a, n in zip(prompts, adapters, lengths)
    ]
    batcher = ContinuousBatcher(model)
    rows = [GenRow(p, n, adapter=a) for p, a, n in zip(prompts, adapters, lengths)]
    done: list[tuple[int, str]] = []
    for i, r in enumerate(rows):
        r.on_done = lambda row, reason, i=i: done.append((i, reason))
    joins = {0: [0, 1], 2: [2], 3: [3, 4], 5: [5]}  # rows arrive at different steps
    shared = []
    for step in range(40):
        for i in joins.get(step, []):
            batcher.add(rows[i])
        if not batcher.busy:
            break
        report = batcher.step()
        shared.append(report.decoded)
    assert [r.tokens for r in rows] == alone
    assert sorted(done) == [(i, "length") for i in range(6)]
    assert max(shared) >= 4 and not batcher.busy  # rows of several adapters shared decode steps


def test_sampled_row_does_not_depend_on_its_neighbours(tiny_model_dir):
    model = _model_with_adapters(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    p = tok.encode("Hello there", add_special_tokens=True)

    def run(extra: int) -> list[int]:
        b = ContinuousBatcher(model)
        row = GenRow(p, 10, adapter="a", temperature=0.9, top_p=0.8, seed=11)
        b.add(row)
        for k in range(extra):
            b.add(
                GenRow(
                    tok.encode(f"other {k}", add_special_tokens=True),
                    10,
                    adapter="b",
                    temperature=1.0,
                    seed=k,
                )
            )
        while b.busy:
            b.step()
        return row.tokens

    assert run(0) == run(3)
    assert (
        run(0)
        == generate(model, tok, [p], 10, temperature=0.9, top_p=0.8, seed=11, adapters=["a"], stop_ids=[])[0]
    )
