"""Benchmark the fused multi-adapter linear against the frozen base, PEFT's mixed-adapter loop and separate runs.

Run from the repository root:

    .venv/bin/python benchmarks/fused_op.py --quick          # about 20 s on 2 CPU cores
    .venv/bin/python benchmarks/fused_op.py                  # T=4096, d=2048, r=16, K in {1,4,8,16}: minutes
    .venv/bin/python benchmarks/fused_op.py --device cuda    # on a GPU (default: cuda when present)
    .venv/bin/python benchmarks/fused_op.py --merge a.json b.json   # best of several runs, on a busy machine
    .venv/bin/python benchmarks/fused_op.py --quick --masks  # also: keyed dropout masks against bernoulli_

Each case times one forward+backward of a [T, d] x [d, d] projection whose T rows are split evenly among K
adapters of rank r (x requires grad, as inside a network; the base weight is frozen), for:

    base      the frozen linear alone: y = x W^T, dx = g W (the floor; LoRA overhead is measured against it)
    fused     lorafleet's FusedLoRALinear (one base matmul, per-segment low-rank updates, custom backward)
    dropout   the same layer with adapter dropout ``--dropout`` (default 0.1) on every adapter, training mode
              (keyed masks: computed in the forward, recomputed in the backward, nothing kept)
    peft      PEFT's own ``lora.Linear`` with K adapters called with ``adapter_names`` (its mixed-batch loop)
    separate  each adapter's rows run on their own, as K single-adapter jobs would (plain autograd), summed

The batch is packed sequences of 256 tokens (``FusedBatch``), so the dropout variant hashes real sequence
keys and positions. ``--masks`` adds a table of the mask alone: ``lorafleet.masks.keep_mask`` for [T, d]
against ``torch.empty(T, d, dtype=bool).bernoulli_`` (what the fused layer drew before keyed masks).

Timings are the minimum over ``--reps`` repetitions; the variants and the cases are interleaved (every
repetition visits every case), so load from other processes spreads over all of them. Every repetition is
in the JSON written to benchmarks/results/fused_op.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lorafleet.batch import FusedBatch, Segment, SequenceInfo
from lorafleet.lora import AdapterSpec, FusedLoRALinear
from lorafleet.models.decoder import Linear
from lorafleet.models.loading import BASE_DTYPES as _DTYPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _packed(t: int, segments: list[Segment], device: torch.device) -> FusedBatch:
    """T rows as packed sequences of up to 256 tokens, one SequenceInfo each; ``segments`` as given."""
    lens = [min(256, t - a) for a in range(0, t, 256)]
    cu = torch.tensor([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], device=device)
    return FusedBatch(
        input_ids=torch.zeros(t, dtype=torch.long, device=device),
        positions=torch.cat([torch.arange(n, device=device) for n in lens]),
        cu_seqlens=cu,
        segments=tuple(segments),
        sequences=tuple(SequenceInfo(task="bench", example=i, role="sft") for i in range(len(lens))),
    )


def _bounds(t: int, k: int) -> list[tuple[int, int]]:
    cuts = [round(i * t / k) for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class _Case:
    """The tensors and callables of one (dtype, K) case; each callable runs forward + backward once."""

    def __init__(
        self, t: int, d: int, r: int, k: int, dtype: torch.dtype, device: torch.device, dropout: float = 0.1
    ) -> None:
        g = torch.Generator().manual_seed(0)
        self.device = device
        self.weight = (torch.randn(d, d, generator=g) / d**0.5).to(device, dtype)
        self.x = torch.randn(t, d, generator=g).to(device, dtype).requires_grad_(True)
        self.grad = torch.randn(t, d, generator=g).to(device, dtype)
        self.bounds = _bounds(t, k)
        names = [f"a{i}" for i in range(k)]
        a = [torch.randn(r, d, generator=g) / d**0.5 for _ in names]
        b = [torch.randn(d, r, generator=g) / r**0.5 for _ in names]
        self.scaling = 2.0

        base = Linear(d, d, False, dtype, device)
        base.weight.data.copy_(self.weight)
        self.fused = FusedLoRALinear(base)
        self.dropped = FusedLoRALinear(base)
        for n, ai, bi in zip(names, a, b):
            spec = AdapterSpec(n, rank=r, alpha=self.scaling * r, target_modules=("q_proj",))
            self.fused.add(spec, ai.to(device, dtype), bi.to(device, dtype))
            spec = AdapterSpec(n, rank=r, alpha=self.scaling * r, dropout=dropout, target_modules=("q_proj",))
            self.dropped.add(spec, ai.to(device, dtype), bi.to(device, dtype))
        self.dropped.train()
        self.batch = _packed(t, [Segment(n, s, e) for n, (s, e) in zip(names, self.bounds)], device)

        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLinear

        lin = nn.Linear(d, d, bias=False, device=device, dtype=dtype)
        lin.weight.data.copy_(self.weight)
        lin.weight.requires_grad_(False)
        cfg = LoraConfig(r=r, lora_alpha=self.scaling * r, target_modules=["q_proj"])
        self.peft = PeftLinear(lin, names[0], config=cfg, r=r, lora_alpha=self.scaling * r)
        for n in names[1:]:
            self.peft.update_layer(n, r, lora_alpha=self.scaling * r, config=cfg)
        self.peft.set_adapter(names)
        for n, ai, bi in zip(names, a, b):
            self.peft.lora_A[n].weight.data.copy_(ai)
            self.peft.lora_B[n].weight.data.copy_(bi)
        self.peft_names = [n for n, (s, e) in zip(names, self.bounds) for _ in range(e - s)]

        self.sep_a = [ai.to(device, dtype).requires_grad_(True) for ai in a]
        self.sep_b = [bi.to(device, dtype).requires_grad_(True) for bi in b]
        self.params = [
            *self.fused.parameters(),
            *self.dropped.parameters(),
            *self.peft.parameters(),
            *self.sep_a,
            *self.sep_b,
        ]

    def _clear(self) -> None:
        self.x.grad = None
        for p in self.params:
            p.grad = None

    def check(self) -> None:
        """The three adapter variants compute the same output and input gradient (so no one does less work)."""
        outs = {}
        for name, fwd in [
            ("fused", lambda: self.fused(self.x, self.batch)),
            ("peft", lambda: self.peft(self.x, adapter_names=self.peft_names)),
            ("separate", lambda: torch.cat([self._separate_rows(k) for k in range(len(self.bounds))])),
        ]:
            self._clear()
            y = fwd()
            y.backward(self.grad)
            outs[name] = (y.detach().float(), self.x.grad.float())
        tol = 1e-4 if self.x.dtype == torch.float32 else 3e-2
        for name in ("peft", "separate"):
            for got, want in zip(outs[name], outs["fused"]):
                rel = ((got - want).norm() / want.norm()).item()
                if rel > tol:
                    raise AssertionError(f"{name} differs from fused by {rel:.2e} (relative)")

    def _separate_rows(self, k: int) -> torch.Tensor:
        (s, e), a, b = self.bounds[k], self.sep_a[k], self.sep_b[k]
        xk = self.x[s:e]
        return F.linear(xk, self.weight) + F.linear(F.linear(xk, a), b) * self.scaling

    def base(self) -> None:
        F.linear(self.x, self.weight).backward(self.grad)

    def run_fused(self) -> None:
        self.fused(self.x, self.batch).backward(self.grad)

    def run_dropout(self) -> None:
        self.dropped(self.x, self.batch).backward(self.grad)

    def run_peft(self) -> None:
        self.peft(self.x, adapter_names=self.peft_names).backward(self.grad)

    def separate(self) -> None:
        for (s, e), a, b in zip(self.bounds, self.sep_a, self.sep_b):
            xk = self.x[s:e].detach().requires_grad_(True)
            y = F.linear(xk, self.weight) + F.linear(F.linear(xk, a), b) * self.scaling
            y.backward(self.grad[s:e])

    def time(self, fn, clock) -> float:
        self._clear()
        _sync(self.device)
        t0 = clock()
        fn()
        _sync(self.device)
        return clock() - t0


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    # This process's CPU time leaves out the time other processes hold the cores (not their pressure on
    # caches and memory), but it counts every thread's time, spinning ones too: one thread only.
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    variants = ["base", "fused", "dropout", "peft", "separate"]
    cases = []
    for dname in args.dtypes:
        for k in args.ks:
            case = _Case(args.tokens, args.dim, args.rank, k, _DTYPES[dname], device, args.dropout)
            case.check()
            fns = {
                "base": case.base,
                "fused": case.run_fused,
                "dropout": case.run_dropout,
                "peft": case.run_peft,
                "separate": case.separate,
            }
            for _ in range(args.warmup):
                for v in variants:
                    case.time(fns[v], clock)
            cases.append((dname, k, case, fns, {v: [] for v in variants}))
    # Repetition-major order: each repetition visits every case, so a burst of load from other processes
    # spoils one sample of many cases rather than every sample of one.
    for _ in range(args.reps):
        for _, _, case, fns, times in cases:
            for v in variants:
                times[v].append(case.time(fns[v], clock))
    results = []
    for dname, k, _, _, times in cases:
        results.append(_row(dname, k, {v: [1e3 * t for t in ts] for v, ts in times.items()}))
        print(_format_row(results[-1]), flush=True)
    masks = _time_masks(args, device, clock) if args.masks else None
    return {
        "benchmark": "fused_op",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, {device}",
        "torch": torch.__version__,
        "tokens": args.tokens,
        "dim": args.dim,
        "rank": args.rank,
        "reps": args.reps,
        "clock": args.clock,
        "dropout": args.dropout,
        "results": results,
        **({"masks": masks} if masks is not None else {}),
    }


def _time_masks(args: argparse.Namespace, device: torch.device, clock) -> list[dict]:
    """ms per [T, d] keep-mask: keyed (``lorafleet.masks.keep_mask``) against ``bernoulli_``."""
    from lorafleet.masks import MaskSite, keep_mask

    rows = _packed(args.tokens, [], device).dropout_rows
    p, t, d = args.dropout, args.tokens, args.dim

    fns = {
        "keyed": lambda: keep_mask(rows, MaskSite(3, 1), d, p),
        "bernoulli_": lambda: torch.empty(t, d, dtype=torch.bool, device=device).bernoulli_(1.0 - p),
    }
    times: dict[str, list[float]] = {v: [] for v in fns}
    for rep in range(args.warmup + max(args.reps, 5)):
        for v, fn in fns.items():
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            if rep >= args.warmup:
                times[v].append(1e3 * (clock() - t0))
    out = [{"mask": v, "ms": min(ts), "median_ms": statistics.median(ts)} for v, ts in times.items()]
    print(f"\nmask [{t}, {d}], p = {p}: " + ", ".join(f"{r['mask']} {r['ms']:.2f} ms" for r in out))
    return out


def _row(dname: str, k: int, all_ms: dict[str, list[float]]) -> dict:
    best = {v: min(ts) for v, ts in all_ms.items()}
    return {
        "dtype": dname,
        "K": k,
        "ms": best,
        "median_ms": {v: statistics.median(ts) for v, ts in all_ms.items()},
        "all_ms": all_ms,
        "lora_overhead": best["fused"] / best["base"] - 1.0,
        "dropout_cost": best["dropout"] / best["fused"] - 1.0 if "dropout" in best else None,
        "speedup_vs_peft": best["peft"] / best["fused"],
        "speedup_vs_separate": best["separate"] / best["fused"],
    }


def merge(paths: list[Path]) -> dict:
    """One report from several runs' JSON (same shapes and clock): per case, the minimum over all their reps."""
    reports = [json.loads(p.read_text()) for p in paths]
    setups = {(r["tokens"], r["dim"], r["rank"], r.get("clock", "wall")) for r in reports}
    if len(setups) != 1:
        raise SystemExit(f"--merge needs runs of one setup (tokens, dim, rank, clock); got {sorted(setups)}")
    all_ms: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in reports:
        for row in r["results"]:
            case = all_ms.setdefault((row["dtype"], row["K"]), {})
            for v, ts in row["all_ms"].items():
                case.setdefault(v, []).extend(ts)
    results = [_row(dname, k, ms) for (dname, k), ms in all_ms.items()]
    for row in results:
        print(_format_row(row))
    runs = [
        {"file": str(p), "date": r["date"], "machine": r["machine"], "reps": r["reps"]}
        for p, r in zip(paths, reports)
    ]
    return {**reports[-1], "reps": sum(r["reps"] for r in reports), "merged_from": runs, "results": results}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_HEADER = (
    "| dtype | K | base ms | fused ms | fused, dropout ms | PEFT loop ms | separate ms | LoRA overhead "
    "| dropout cost | fused vs PEFT | fused vs separate |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def _format_row(row: dict) -> str:
    ms = row["ms"]
    return (
        f"| {row['dtype']} | {row['K']} | {ms['base']:.1f} | {ms['fused']:.1f} | {ms.get('dropout', float('nan')):.1f} | "
        f"{ms['peft']:.1f} | {ms['separate']:.1f} | {100 * row['lora_overhead']:+.1f}% | "
        f"{100 * (row.get('dropout_cost') or float('nan')):+.1f}% | {row['speedup_vs_peft']:.2f}x | "
        f"{row['speedup_vs_separate']:.2f}x |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--dtypes", nargs="+", choices=list(_DTYPES), default=list(_DTYPES))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dropout", type=float, default=0.1, help="adapter dropout of the 'dropout' variant")
    p.add_argument(
        "--masks", action="store_true", help="also time the dropout mask alone (keyed vs bernoulli_)"
    )
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: robust on a machine shared with other jobs)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fused_op.json")
    p.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="run nothing: combine earlier JSON reports (minimum over all their repetitions) into --out",
    )
    args = p.parse_args()
    if args.merge:
        print(_HEADER)
        report = merge(args.merge)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        p.error("--clock cpu needs --threads 1 (CPU time sums all threads, spinning ones too)")
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures CPU work; use the wall clock on a GPU")
    if args.quick:
        args.tokens, args.dim, args.ks, args.reps = 1024, 512, [1, 4, 8], 3
    print(
        f"T={args.tokens} d={args.dim} r={args.rank} on {args.device}, {torch.get_num_threads()} threads, "
        f"{args.clock} clock"
    )
    print(_HEADER, flush=True)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
