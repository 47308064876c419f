"""Adapter dropout in the fused operator: keyed masks (today) against the bernoulli_ masks they replaced.

Run from the repository root (needs the git history: the old operator is read from it):

    .venv/bin/python benchmarks/dropout_cost.py                    # T=1024, d=512, K=4 (fused_op --quick's shape)
    .venv/bin/python benchmarks/dropout_cost.py --tokens 4096 --dim 2048 --ks 8 --reps 8   # the full shape

Before keyed masks (commit ``BEFORE``, the parent of the commit that introduced them) the fused layer drew
each segment's mask once with ``bernoulli_`` and kept it for the backward; now it computes a keyed mask in
the forward and again in the backward and keeps nothing (``lorafleet.masks``). This script loads that old
``fused.py`` from git into this process beside today's, gives both layers the same weights and inputs, and
times one forward + backward of each with adapter dropout ``--dropout`` and with dropout 0 (the same code
path on both sides without masks: its ratio is the noise floor of the comparison). Repetitions interleave
the four variants; one torch thread, this process's CPU time (other processes on a shared machine disturb
it least). Reported: per variant the minimum and median ms, the ratios new / old with and without dropout,
and the dropout ratio normalised by the no-dropout one (the cost of keyed masks over bernoulli_ masks).
Writes ``benchmarks/results/dropout_cost.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused_op import _bounds, _cpu_name, _packed
from lorafleet.batch import Segment
from lorafleet.lora import AdapterSpec, FusedLoRALinear
from lorafleet.models.decoder import Linear

BEFORE = "3126bf7^"  # the fused operator with bernoulli_ masks kept for the backward
REPO = Path(__file__).resolve().parent.parent


def _old_module():
    src = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BEFORE}:src/lorafleet/lora/fused.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    name = "lorafleet.lora._fused_before_keyed_masks"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "lorafleet.lora"
    sys.modules[name] = mod
    exec(compile(src, f"{BEFORE}:fused.py", "exec"), mod.__dict__)
    return mod


def _layers(old_cls, t: int, d: int, r: int, k: int, p: float):
    g = torch.Generator().manual_seed(0)
    base = Linear(d, d, False, torch.float32, "cpu")
    base.weight.data.copy_(torch.randn(d, d, generator=g) / d**0.5)
    names = [f"a{i}" for i in range(k)]
    ab = [(torch.randn(r, d, generator=g) / d**0.5, torch.randn(d, r, generator=g) / r**0.5) for _ in names]
    layers = {}
    for variant, cls, drop in [
        ("keyed", FusedLoRALinear, p),
        ("bernoulli", old_cls, p),
        ("new, dropout 0", FusedLoRALinear, 0.0),
        ("old, dropout 0", old_cls, 0.0),
    ]:
        layer = cls(base)
        for n, (a, b) in zip(names, ab):
            layer.add(AdapterSpec(n, rank=r, alpha=2 * r, dropout=drop, target_modules=("q_proj",)), a, b)
        layers[variant] = layer.train()
    batch = _packed(t, [Segment(n, s, e) for n, (s, e) in zip(names, _bounds(t, k))], torch.device("cpu"))
    x = torch.randn(t, d, generator=g).requires_grad_(True)
    return layers, batch, x, torch.randn(t, d, generator=g)


def run(args: argparse.Namespace) -> dict:
    old = _old_module()
    cases = []
    for k in args.ks:
        layers, batch, x, grad = _layers(
            old.FusedLoRALinear, args.tokens, args.dim, args.rank, k, args.dropout
        )
        times: dict[str, list[float]] = {v: [] for v in layers}
        for rep in range(args.warmup + args.reps):
            for v, layer in layers.items():
                x.grad = None
                for q in layer.parameters():
                    q.grad = None
                t0 = time.process_time()
                layer(x, batch).backward(grad)
                if rep >= args.warmup:
                    times[v].append(1e3 * (time.process_time() - t0))
        best = {v: min(ts) for v, ts in times.items()}
        med = {v: statistics.median(ts) for v, ts in times.items()}
        row = {"K": k, "ms": best, "median_ms": med, "all_ms": times}
        for stat, vals in (("min", best), ("median", med)):
            drop = vals["keyed"] / vals["bernoulli"]
            floor = vals["new, dropout 0"] / vals["old, dropout 0"]
            row[stat] = {
                "dropout_new_over_old": drop,
                "no_dropout_new_over_old": floor,
                "normalised": drop / floor,
            }
        cases.append(row)
        print(_line(args, row), flush=True)
    return {
        "benchmark": "dropout_cost",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_name()}, 1 torch thread, CPU time",
        "torch": torch.__version__,
        "before": BEFORE,
        "tokens": args.tokens,
        "dim": args.dim,
        "rank": args.rank,
        "dropout": args.dropout,
        "reps": args.reps,
        "cases": cases,
    }


def _line(args: argparse.Namespace, row: dict) -> str:
    ms, mn, md = row["ms"], row["min"], row["median"]
    return (
        f"| T = {args.tokens}, d = {args.dim}, K = {row['K']} | {ms['keyed']:.1f} / {ms['bernoulli']:.1f} "
        f"| {mn['dropout_new_over_old']:.3f}, {md['dropout_new_over_old']:.3f} "
        f"| {mn['no_dropout_new_over_old']:.3f}, {md['no_dropout_new_over_old']:.3f} "
        f"| {100 * (mn['normalised'] - 1):+.1f}% (min), {100 * (md['normalised'] - 1):+.1f}% (median) |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ks", type=int, nargs="+", default=[4])
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "dropout_cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        "| case | min ms keyed / bernoulli | dropout: new / old (min, median) "
        "| dropout 0: new / old (noise floor) | keyed masks' cost, normalised |\n|---|---|---|---|---|"
    )
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
