"""Benchmark the fused multi-adapter expert operator against a per-expert, per-adapter loop.

Run from the repository root:

    .venv/bin/python benchmarks/moe_experts.py --quick       # T=1024, H=256, I=512: about a minute, 2 cores
    .venv/bin/python benchmarks/moe_experts.py               # T=4096, H=1024, I=2048
    .venv/bin/python benchmarks/moe_experts.py --device cuda --dtype bfloat16

One case: T tokens of 4 adapters (contiguous segments, T / 4 each) routed top-2 among 8 experts by a random
router; every adapter has LoRA (rank r) on both expert tensors (gate_up_proj [E, 2I, H], down_proj
[E, H, I]). Each variant runs one forward + backward (x requires grad; the expert weights are frozen):

    base      the frozen experts alone (``models.moe.expert_forward``): the floor
    fused     ``FusedLoRAExperts``: one sort by (expert, adapter), one base GEMM per expert, low-rank terms
              on contiguous slices
    loop      ``reference_expert_lora``: for each (expert, adapter) pair, mask, gather, base GEMM, low-rank
              term, scatter-add: what a per-expert, per-adapter implementation does

The outputs of fused and loop are checked equal before timing. Timings are the minimum over ``--reps``
repetitions, variants interleaved; every repetition is in benchmarks/results/moe_experts.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import torch

from lorafleet.batch import Segment
from lorafleet.lora import AdapterSpec
from lorafleet.lora.experts import FusedLoRAExperts, reference_expert_lora
from lorafleet.models.families import ModelConfig
from lorafleet.models.moe import Experts, expert_forward, route

EXPERTS, ADAPTERS, TOP_K = 8, 4, 2


def _case(t: int, h: int, i: int, r: int, dtype: torch.dtype, device: torch.device):
    cfg = ModelConfig("MixtralForCausalLM", 8, h, i, 1, 1, 1, h, num_experts=EXPERTS,
                      num_experts_per_tok=TOP_K, moe_layers=[0])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    base = Experts(cfg, dtype, device)
    with torch.no_grad():
        base.gate_up_proj.copy_(torch.randn(base.gate_up_proj.shape, generator=g) / h**0.5)
        base.down_proj.copy_(torch.randn(base.down_proj.shape, generator=g) / i**0.5)
    layer = FusedLoRAExperts(base)
    for k in range(ADAPTERS):
        spec = AdapterSpec(f"a{k}", rank=r, alpha=2.0 * r, dropout=0.0,
                           target_modules=("experts.gate_up_proj", "experts.down_proj"))  # fmt: skip
        factors = {}
        for param in ("gate_up_proj", "down_proj"):
            fin, fout = layer.shapes(param)
            a = torch.randn(EXPERTS * r, fin, generator=g) / fin**0.5
            b = torch.randn(fout, EXPERTS * r, generator=g) / r**0.5
            factors[param] = (a.to(device, dtype), b.to(device, dtype))
        layer.add(spec, factors)
    x = torch.randn(t, h, generator=g).to(device, dtype).requires_grad_(True)
    router = torch.randn(EXPERTS, h, generator=g).to(device, dtype)
    grad = torch.randn(t, h, generator=g).to(device, dtype)
    cuts = [round(k * t / ADAPTERS) for k in range(ADAPTERS + 1)]
    batch = SimpleNamespace(segments=tuple(Segment(f"a{k}", cuts[k], cuts[k + 1]) for k in range(ADAPTERS)))
    return layer, x, router, grad, batch


def _variants(layer, x, router, grad, batch):
    def run(fn):
        def step():
            x.grad = None
            for p in layer.parameters():
                p.grad = None
            routing = route(x.detach() @ router.T, TOP_K, True)
            out = fn(x, routing)
            out.backward(grad)
            return out

        return step

    return {
        "base": run(lambda x, rt: expert_forward(layer, x, rt)),
        "fused": run(lambda x, rt: layer(x, rt, batch)),
        "loop": run(lambda x, rt: reference_expert_lora(layer, x, rt, batch)),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=1024, H=256, I=512")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 repetition (for the tests)")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/moe_experts.json")
    args = ap.parse_args(argv)
    t, h, i, reps = args.tokens, 1024, 2048, args.reps
    if args.quick:
        t, h, i = 1024, 256, 512
    if args.smoke:
        t, h, i, reps = 64, 32, 48, 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layer, x, router, grad, batch = _case(t, h, i, args.rank, dtype, device)
    variants = _variants(layer, x, router, grad, batch)
    fused, loop = variants["fused"](), variants["loop"]()
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = (fused - loop).abs().max().item() / max(loop.abs().max().item(), 1e-12)
    if err > tol:
        raise SystemExit(f"fused and loop outputs differ (relative {err:.2e}); not timing a wrong operator")
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, step in variants.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "shape": {
            "tokens": t,
            "hidden": h,
            "intermediate": i,
            "experts": EXPERTS,
            "top_k": TOP_K,
            "adapters": ADAPTERS,
            "rank": args.rank,
            "dtype": args.dtype,
        },  # fmt: skip
        "fused_vs_loop_max_rel_diff": err,
        "seconds": times,
        "best_ms": {k: 1e3 * v for k, v in best.items()},
    }
    if not args.smoke:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"T={t} H={h} I={i} experts={EXPERTS} top-{TOP_K} adapters={ADAPTERS} r={args.rank} "
          f"{args.dtype} on {device} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")  # fmt: skip
    print("| variant | forward+backward (ms) | vs base | loop / variant |")
    print("|---|---:|---:|---:|")
    for name, v in best.items():
        print(f"| {name} | {1e3 * v:.1f} | {v / best['base']:.2f}x | {best['loop'] / v:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
