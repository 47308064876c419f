"""Check and time lorafleet's GPU fast path on one GPU (the targets are written for an H200).

    bash benchmarks/gpu_check.sh                            # on the GPU machine: under 8 minutes
    .venv/bin/python benchmarks/gpu_check.py --dry-run      # CPU: the same code on tiny shapes (Triton
                                                            # in its interpreter), to know it is not broken

Legend: T tokens, d model width, r rank, K adapters.

1. **Correctness** on fresh random inputs: the segmented Triton operators against their plain-loop
   references, the fused layer on the Triton path against ``reference_fused_lora`` (forward and every
   gradient; adapter mixes one / distinct / identical / skewed / Zipf, ranks 4 to 128, bfloat16 and
   float32, dropout), varlen attention against its reference, and (bitsandbytes present) adapters on an
   NF4 base against the dense twin. Any failure makes the exit status 1; the timings still run.
2. **(a) The fused operator**: one forward + backward of a [T, d] x [d, d] projection whose rows are split
   among K adapters of rank r, in bfloat16: the base GEMM alone, lorafleet's fused layer on the Triton path
   and on the PyTorch path, and PEFT's mixed-adapter loop (``benchmarks/fused_op.py``'s cases; the PEFT
   column is left out when peft is not installed). Target: fused <= base + 10% at r=16, K=8.
3. **(b) Training**: 4 LoRA adapters (r=16, all seven projections) trained together on a randomly
   initialised LLaMA-3-8B-shaped model in bfloat16 (``Decoder`` + ``ModelConfig``, no hub), packed
   sequences of mixed lengths, AdamW; without and with activation recomputation, and on an NF4 base when
   bitsandbytes is installed. tokens/s and MFU = 4 x matmul params x tokens/s / the measured bf16 matmul
   rate (``benchmarks/common.py``'s FLOP count; attention not counted). Target: >= 45% MFU.

The run stops starting new parts when its time budget (``--budget-s``, 450 s) is nearly spent, and prints
what it skipped. It prints one table at the end and writes the numbers to ``OUT/gpu_check.json`` (``OUT``
from the environment, else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
import zlib
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

_HERE = Path(__file__).resolve().parent
_LLAMA3_8B = dict(
    architecture="LlamaForCausalLM",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
_TINY = dict(_LLAMA3_8B, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2)
_TINY.update(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Run:
    """Deadline, results and the failures of one run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.failures: list[str] = []
        self.skipped: list[str] = []
        self.report: dict = {"checks": [], "fused_op": [], "training": []}

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.t0)

    def log(self, text: str) -> None:
        print(f"[{time.time() - self.t0:6.1f}s] {text}", flush=True)


def _rel(got, ref) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# -- 1. correctness --------------------------------------------------------------------------------------------


def _mix_lengths(mix: str, names: list[str], total: int) -> list[tuple[str | None, int]]:
    k = len(names)
    if mix == "one":
        return [(names[0], total)]
    if mix == "distinct":
        return [(n, total // k + (7 * i) % 5) for i, n in enumerate(names)]
    if mix == "identical":
        third = total // 3
        return [(names[0], third), (None, 5), (names[0], third), (names[0], 3)]
    if mix == "skewed":
        return [(names[0], 3), (names[1], total - 6), (names[2], 2), (names[3], 1)]
    if mix == "zipf":
        weights = [1 / (i + 1) ** 1.2 for i in range(k)]
        return [(n, max(1, round(total * w / sum(weights)))) for n, w in zip(names, weights)]
    raise AssertionError(mix)


def _check_fused_layer(
    run: _Run,
    device,
    dtype,
    mix: str,
    ranks: list[int],
    dims: tuple[int, int],
    total: int,
    dropout: float,
    oracle: str,
):
    """The fused layer on the Triton path against ``oracle``: "reference" (``reference_fused_lora``) or
    "torch" (the PyTorch fast path). Dropout masks are keyed (``lorafleet.masks``): all three apply the
    same masks, computed from the batch's ``dropout_rows`` (one sequence key per 64 rows here)."""
    import torch

    from lorafleet.batch import Segment
    from lorafleet.lora import AdapterSpec, FusedLoRALinear, reference_fused_lora
    from lorafleet.masks import MaskSite, sequence_key, token_rows
    from lorafleet.models.decoder import Linear

    i_dim, o_dim = dims
    g = torch.Generator().manual_seed(zlib.crc32(repr((mix, ranks, dims, str(dtype))).encode()))
    base = Linear(i_dim, o_dim, True, dtype, device)
    base.weight.data.copy_((torch.randn(o_dim, i_dim, generator=g) / math.sqrt(i_dim)).to(device, dtype))
    base.bias.data.copy_(torch.randn(o_dim, generator=g).to(device, dtype))
    layer = FusedLoRALinear(base, MaskSite(1, 2))
    names = [f"a{k}" for k in range(len(ranks))]
    for k, (name, r) in enumerate(zip(names, ranks)):
        spec = AdapterSpec(name, rank=r, alpha=2.0 * r, dropout=dropout * (k % 2))
        a = (torch.randn(r, i_dim, generator=g) / math.sqrt(i_dim)).to(device)
        layer.add(spec, a, torch.randn(o_dim, r, generator=g).to(device))
    layer = layer.train().with_backend("triton")
    torch_twin = layer.with_backend("torch")  # the same parameters on the PyTorch path
    segs, cursor = [], 0
    for name, n in _mix_lengths(mix, names, total):
        segs.append(Segment(name, cursor, cursor + n))
        cursor += n
    lens = [min(64, cursor - a) for a in range(0, cursor, 64)]
    keys = [sequence_key(5, 0, i, "sft") for i in range(len(lens))]
    rows = token_rows(keys, lens, torch.cat([torch.arange(n) for n in lens]).to(device))
    batch = SimpleNamespace(segments=tuple(segs), dropout_rows=rows)
    x = torch.randn(cursor, i_dim, generator=g).to(device, dtype)
    grad = torch.randn(cursor, o_dim, generator=g).to(device, dtype)

    def once(how: str):
        xx = x.clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        torch.manual_seed(3)
        run_layer = torch_twin if how == "torch" else layer
        y = reference_fused_lora(layer, xx, batch) if how == "reference" else run_layer(xx, batch)
        y.backward(grad)
        return [y.detach(), xx.grad] + [p.grad for p in layer.parameters() if p.grad is not None]

    got, ref = once("triton"), once(oracle)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    worst = max(_rel(a, b) for a, b in zip(got, ref)) if len(got) == len(ref) else float("inf")
    name = f"fused layer {mix} r={ranks[0]}..{max(ranks)} {tuple(dims)} {_dt(dtype)} dropout {dropout} vs {oracle}"
    _record(run, name, worst, tol)


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _record(run: _Run, name: str, err: float, tol: float) -> None:
    ok = err < tol
    run.report["checks"].append({"check": name, "rel_err": err, "tol": tol, "ok": ok})
    run.log(f"{'ok  ' if ok else 'FAIL'} {name}: rel err {err:.2e} (tol {tol:.0e})")
    if not ok:
        run.failures.append(name)


def _check_segmented_ops(run: _Run, device, dtype, t: int, i_dim: int, o_dim: int) -> None:
    import torch

    from lorafleet.lora.kernels import (
        reference_segmented_expand,
        reference_segmented_outer,
        reference_segmented_shrink,
        segmented_expand,
        segmented_outer,
        segmented_shrink,
    )

    g = torch.Generator().manual_seed(11)
    k, r = 5, 64
    cut = [0, t // 7, t // 7 + 1, t // 2, t - 9, t]
    segs = [(cut[j], cut[j + 1], (3 * j) % k) for j in range(5)]
    x = torch.randn(t, i_dim, generator=g).to(device, dtype)
    a = (torch.randn(k, r, i_dim, generator=g) / math.sqrt(i_dim)).to(device, dtype)
    b = torch.randn(k, o_dim, r, generator=g).to(device, dtype)
    y = torch.randn(t, o_dim, generator=g).to(device, dtype)
    scales = [0.5, 1.0, 2.0, 0.25, 4.0]
    scales_k = torch.tensor(scales, device=device)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    h_ref = reference_segmented_shrink(x, a, segs)
    _record(run, f"segmented shrink T={t} {_dt(dtype)}", _rel(segmented_shrink(x, a, segs), h_ref), tol)
    y_ref = reference_segmented_expand(y, h_ref, b, segs, scales)
    y_got = segmented_expand(y.clone(), h_ref, b, segs, scales_k)
    _record(run, f"segmented expand T={t} {_dt(dtype)}", _rel(y_got, y_ref), tol)
    o_got = segmented_outer(h_ref, y, segs, k, scales_k)
    _record(
        run,
        f"segmented outer T={t} {_dt(dtype)}",
        _rel(o_got, reference_segmented_outer(h_ref, y, segs, k, scales)),
        1e-4,
    )


def _check_varlen(run: _Run, device) -> None:
    import torch

    from lorafleet.batch import FusedBatch
    from lorafleet.models.varlen import reference_varlen_attention, varlen_attention, varlen_backend

    g = torch.Generator().manual_seed(5)
    lengths = [700, 1, 333, 2048, 96]
    batch = FusedBatch.from_sequences([[1] * n for n in lengths]).to(device)
    t = sum(lengths)
    q, k, v = (torch.randn(t, h, 128, generator=g).to(device, torch.bfloat16) for h in (32, 8, 8))
    backend = varlen_backend(q)
    run.report["varlen_backend"] = backend
    if backend is None:
        run.log("varlen attention: no varlen kernel here; the padded SDPA path runs (nothing to check)")
        return
    for window in (None, 256):
        got = varlen_attention(q, k, v, batch.cu_seqlens, max(lengths), window)
        ref = reference_varlen_attention(q.float(), k.float(), v.float(), batch.cu_seqlens, window)
        _record(run, f"varlen attention ({backend}) window={window}", _rel(got, ref), 2e-2)


def _check_quantized(run: _Run, device) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        run.skipped.append("NF4 check (bitsandbytes not installed)")
        return
    from lorafleet.batch import Segment
    from lorafleet.lora import AdapterSpec, FusedLoRALinear, reference_fused_lora
    from lorafleet.models.decoder import Linear
    from lorafleet.models.quant import QuantLinear, dense_weight

    g = torch.Generator().manual_seed(8)
    d = 1024
    for backend in ("triton", "torch"):
        base = Linear(d, d, False, torch.bfloat16, device)
        base.weight.data.copy_((torch.randn(d, d, generator=g) / 32).to(device, torch.bfloat16))
        quant = FusedLoRALinear(QuantLinear.from_linear(base, "nf4"))
        base.weight.data.copy_(dense_weight(quant.weight, torch.bfloat16))
        dense = FusedLoRALinear(base)
        for k in range(3):
            a, b = (
                (torch.randn(16, d, generator=g) / 32).to(device),
                torch.randn(d, 16, generator=g).to(device),
            )
            spec = AdapterSpec(f"a{k}", rank=16, alpha=32.0)
            quant.add(spec, a, b)
            dense.add(spec, a.clone(), b.clone())
        quant = quant.with_backend(backend)
        batch = SimpleNamespace(
            segments=(Segment("a0", 0, 500), Segment("a1", 500, 1800), Segment("a2", 1900, 2048))
        )
        x = torch.randn(2048, d, generator=g).to(device, torch.bfloat16)
        err = _rel(quant(x, batch), reference_fused_lora(dense, x, batch))
        _record(run, f"NF4 base + 3 adapters ({backend} path) vs dense twin", err, 2e-2)


def part_correctness(run: _Run, device) -> None:
    import torch

    big = device.type == "cuda"
    t, dims = (4096, [(4096, 4096), (4096, 1024), (14336, 4096)]) if big else (96, [(40, 36)])
    for dtype in (torch.bfloat16, torch.float32):
        _check_segmented_ops(run, device, dtype, t, *dims[0])
    cases = [
        ("one", [16]),
        ("distinct", [16] * 8),
        ("identical", [8]),
        ("skewed", [4, 64, 16, 8]),
        ("zipf", [8, 16, 32, 64, 128, 16, 8, 4]),
    ]
    runs = [(dt, j) for dt in (torch.bfloat16, torch.float32) for j in range(len(cases))]
    if not big:  # the interpreter is slow: two cases show the code works
        runs = [(torch.bfloat16, 1), (torch.float32, 4)]
    for dtype, j in runs:
        mix, ranks = cases[j]
        if run.left() < 0.6 * run.args.budget_s and big:
            run.skipped.append(f"fused layer checks from {mix} {_dt(dtype)} on (time)")
            return
        _check_fused_layer(
            run, device, dtype, mix, ranks, dims[j % len(dims)], t, 0.0 if big else 0.1, "reference"
        )
    if big:  # dropout: the same keyed masks on both fast paths (see _check_fused_layer)
        for dtype, j in [(torch.bfloat16, 1), (torch.float32, 4)]:
            mix, ranks = cases[j]
            _check_fused_layer(run, device, dtype, mix, ranks, dims[j % len(dims)], t, 0.1, "torch")
    if big:
        _check_varlen(run, device)
        _check_quantized(run, device)


# -- 2. (a) the fused operator -----------------------------------------------------------------------------------


def part_fused_op(run: _Run, device) -> None:
    import importlib.util

    import torch

    sys.path.insert(0, str(_HERE))
    big = device.type == "cuda"
    t, d, r = (8192, 4096, 16) if big else (64, 64, 8)
    ks = (1, 8, 16) if big else (3,)
    reps, warmup = (10, 3) if big else (1, 0)
    has_peft = importlib.util.find_spec("peft") is not None
    if not has_peft:
        run.skipped.append("PEFT column of (a) (peft not installed)")
    from fused_op import _Case

    for k in ks:
        if run.left() < 0.45 * run.args.budget_s and big:
            run.skipped.append(f"fused op K={k} on (time)")
            break
        case = (
            _Case(t, d, r, k, torch.bfloat16, device) if has_peft else _case_without_peft(t, d, r, k, device)
        )

        fns = {
            "base": case.base,
            "fused_triton": _with_backend(case, "triton"),  # in a dry run: Triton's interpreter
            "fused_torch": _with_backend(case, "torch"),
        }
        if has_peft:
            fns["peft"] = case.run_peft
        times: dict[str, list[float]] = {v: [] for v in fns}
        for rep in range(warmup + reps):
            for name, fn in fns.items():
                ms = 1e3 * _time(case, fn, device)
                if rep >= warmup:
                    times[name].append(ms)
        best = {v: min(ts) for v, ts in times.items()}
        row = {
            "T": t,
            "d": d,
            "r": r,
            "K": k,
            "ms": best,
            "overhead": best["fused_triton"] / best["base"] - 1.0,
        }
        if has_peft:
            row["speedup_vs_peft"] = best["peft"] / best["fused_triton"]
        run.report["fused_op"].append(row)
        run.log(f"(a) K={k}: " + ", ".join(f"{v} {ms:.2f} ms" for v, ms in best.items()))
        del case
        if big:
            torch.cuda.empty_cache()


def _with_backend(case, backend: str):
    """Run the case's fused layer on ``backend``."""

    twin = case.fused.with_backend(backend)  # the case's adapters, on ``backend``

    def run() -> None:
        twin(case.x, case.batch).backward(case.grad)

    return run


def _time(case, fn, device) -> float:
    """Seconds of one call of ``fn`` (forward + backward): gradients cleared first, the GPU drained around it."""
    case._clear()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _case_without_peft(t: int, d: int, r: int, k: int, device):
    """``fused_op._Case`` minus its PEFT layer, for machines without peft."""
    import torch
    import torch.nn.functional as F

    from lorafleet.batch import Segment
    from lorafleet.lora import AdapterSpec, FusedLoRALinear
    from lorafleet.models.decoder import Linear

    g = torch.Generator().manual_seed(0)
    base = Linear(d, d, False, torch.bfloat16, device)
    base.weight.data.copy_((torch.randn(d, d, generator=g) / d**0.5).to(device, torch.bfloat16))
    fused = FusedLoRALinear(base)
    cuts = [round(i * t / k) for i in range(k + 1)]
    for i in range(k):
        spec = AdapterSpec(f"a{i}", rank=r, alpha=2.0 * r)
        fused.add(
            spec,
            (torch.randn(r, d, generator=g) / d**0.5).to(device),
            torch.randn(d, r, generator=g).to(device),
        )
    batch = SimpleNamespace(segments=tuple(Segment(f"a{i}", cuts[i], cuts[i + 1]) for i in range(k)))
    x = torch.randn(t, d, generator=g).to(device, torch.bfloat16).requires_grad_(True)
    grad = torch.randn(t, d, generator=g).to(device, torch.bfloat16)

    def clear() -> None:
        x.grad = None
        for p in fused.parameters():
            p.grad = None

    return SimpleNamespace(
        fused=fused,
        x=x,
        batch=batch,
        grad=grad,
        base=lambda: F.linear(x, base.weight).backward(grad),
        run_fused=lambda: fused(x, batch).backward(grad),
        _clear=clear,
    )


# -- 3. (b) training ---------------------------------------------------------------------------------------------


def _matmul_rate(device, dtype, n: int) -> float:
    """Best FLOP/s of [n, n] @ [n, n] over a few calls (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(12):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


def _build_model(shape: dict, device, quantize: str | None, recompute: bool, rank: int):
    import torch

    from lorafleet.lora import AdapterSpec, add_adapter
    from lorafleet.models import Decoder, ModelConfig
    from lorafleet.models.quant import _quantize_projections, quantize_model
    from lorafleet.models.recompute import apply_recompute

    cfg = ModelConfig(**shape)
    model = Decoder(cfg, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # projections, embedding, head; norms stay at one
                p.normal_(0.0, 0.02, generator=gen)
    if quantize is not None:
        (quantize_model if device.type == "cuda" else _quantize_projections)(model, quantize)
    for k in range(4):
        spec = AdapterSpec(f"a{k}", rank=rank, alpha=2.0 * rank, target_modules=_TARGETS)
        add_adapter(model, spec, torch.Generator().manual_seed(k))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B, so every adapter gradient is real work
                p.normal_(0.0, 1e-3, generator=gen)
    if recompute:
        apply_recompute(model)
    return cfg, model.train()


def _batches(cfg, device, tokens_per_adapter: int, max_len: int, steps: int):
    import random

    import torch

    from lorafleet.batch import FusedBatch

    rng = random.Random(0)
    out = []
    for _ in range(steps):
        seqs, owners = [], []
        for k in range(4):
            left = tokens_per_adapter
            while left > 0:
                n = min(left, rng.randint(max_len // 4, max_len))
                seqs.append([rng.randrange(cfg.vocab_size) for _ in range(n)])
                owners.append(f"a{k}")
                left -= n
        batch = FusedBatch.from_sequences(seqs, adapters=owners, device=device)
        labels = torch.randint(0, cfg.vocab_size, (batch.num_tokens,), device=device)
        out.append((batch, labels))
    return out


def part_training(run: _Run, device) -> None:
    import gc

    import torch
    import torch.nn.functional as F

    from lorafleet.lora import adapter_parameters

    sys.path.insert(0, str(_HERE))
    from common import train_flops

    big = device.type == "cuda"
    shape = _LLAMA3_8B if big else _TINY
    tokens_per_adapter, max_len = (2048, 1024) if big else (12, 6)
    warmup, steps = (2, 6) if big else (0, 1)
    rate = _matmul_rate(device, torch.bfloat16, 8192 if big else 256)
    run.report["bf16_matmul_flops"] = rate
    run.log(f"(b) measured bf16 matmul rate: {rate / 1e12:.1f} TFLOP/s")
    import importlib.util

    variants = [("bf16 base", None, False), ("bf16 base, recompute", None, True)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        variants.append(("NF4 base, recompute", "nf4", True))
    else:
        run.skipped.append("(b) NF4 base (bitsandbytes not installed)")
    hf_shape = {k: v for k, v in shape.items() if k != "architecture"}
    for label, quantize, recompute in variants:
        if big and run.left() < 90:
            run.skipped.append(f"(b) {label} (time)")
            continue
        run.log(f"(b) {label}: building the model")
        cfg, model = _build_model(shape, device, quantize, recompute, rank=16)
        params = [p for k in range(4) for p in adapter_parameters(model, f"a{k}").values()]
        opt = torch.optim.AdamW(params, lr=1e-4)
        data = _batches(cfg, device, tokens_per_adapter, max_len, warmup + steps)
        if big:
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i, (batch, labels) in enumerate(data):
            _sync(device)
            t0 = time.perf_counter()
            logits = model.forward_packed(batch.input_ids, batch)
            loss = F.cross_entropy(logits.float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                losses.append(loss.item())
            del logits, loss
        tokens = data[0][0].num_tokens
        step_s = sorted(times)[len(times) // 2]
        tok_s = tokens / step_s
        flops = train_flops(hf_shape, tokens, tokens)
        row = {
            "variant": label,
            "tokens_per_step": tokens,
            "step_ms": 1e3 * step_s,
            "tokens_per_s": tok_s,
            "mfu": flops / step_s / rate,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if big else None,
            "loss": losses[-1],
        }
        run.report["training"].append(row)
        run.log(
            f"(b) {label}: {tok_s:,.0f} tokens/s, MFU {100 * row['mfu']:.1f}%, step {row['step_ms']:.0f} ms"
        )
        del model, opt, params, data
        gc.collect()
        if big:
            torch.cuda.empty_cache()


# -- the run -----------------------------------------------------------------------------------------------------


def _table(run: _Run) -> str:
    lines = []
    fused = run.report["fused_op"]
    if fused:
        lines += [
            "(a) fused operator, bf16, forward + backward of [T, d] x [d, d], r = "
            f"{fused[0]['r']}, T = {fused[0]['T']}, d = {fused[0]['d']}",
            "| K | base ms | fused (Triton) ms | fused (PyTorch) ms | PEFT loop ms | LoRA overhead | vs PEFT |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in fused:
            ms = row["ms"]
            peft = f"{ms['peft']:.2f}" if "peft" in ms else "-"
            vs = f"{row['speedup_vs_peft']:.2f}x" if "speedup_vs_peft" in row else "-"
            lines.append(
                f"| {row['K']} | {ms['base']:.2f} | {ms['fused_triton']:.2f} | {ms['fused_torch']:.2f} | {peft} | "
                f"{100 * row['overhead']:+.1f}% | {vs} |"
            )
    train = run.report["training"]
    if train:
        rate = run.report["bf16_matmul_flops"]
        lines += [
            "",
            f"(b) 4 LoRA adapters (r=16, 7 projections) on a {run.report['model']} model, bf16; "
            f"MFU over the measured bf16 matmul rate {rate / 1e12:.1f} TFLOP/s",
            "| variant | tokens/step | step ms | tokens/s | MFU | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for row in train:
            mem = f"{row['peak_mem_gib']:.1f}" if row["peak_mem_gib"] is not None else "-"
            lines.append(
                f"| {row['variant']} | {row['tokens_per_step']} | {row['step_ms']:.0f} | "
                f"{row['tokens_per_s']:,.0f} | {100 * row['mfu']:.1f}% | {mem} |"
            )
    if run.args.dry_run:
        lines += ["", "dry run on a CPU: tiny shapes, Triton in its interpreter; the timings mean nothing"]
    checks = run.report["checks"]
    lines += ["", f"correctness: {sum(c['ok'] for c in checks)}/{len(checks)} checks passed"]
    lines += [f"  FAILED: {name}" for name in run.failures]
    lines += [f"  skipped: {what}" for what in run.skipped]
    return "\n".join(lines)


def _preflight() -> None:
    missing = []
    for module in ("torch", "numpy", "pydantic", "safetensors", "yaml", "triton"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        print(
            f"gpu_check: missing Python packages: {', '.join(missing)}; install them (pip install -e .[test])"
        )
        raise SystemExit(2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton in its interpreter")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop starting new parts after this")
    p.add_argument("--parts", nargs="+", default=["checks", "fused_op", "training"])
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    _preflight()
    sys.path.insert(0, str(_HERE.parent / "src"))
    import torch
    import triton

    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; run it on the GPU machine, or pass --dry-run for the CPU smoke run"
        )
        raise SystemExit(2)
    else:
        device = torch.device("cuda")
    run = _Run(args)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    run.report.update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        dry_run=args.dry_run,
        model="LLaMA-3-8B-shaped" if device.type == "cuda" else "tiny LLaMA-shaped",
    )
    run.log(
        f"gpu_check on {name}: torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )
    parts = {"checks": part_correctness, "fused_op": part_fused_op, "training": part_training}
    for part in args.parts:
        try:
            parts[part](run, device)
        except Exception as e:  # report and go on: one broken part must not hide the others' numbers
            traceback.print_exc()
            run.failures.append(f"{part}: {type(e).__name__}: {e}")
    table = _table(run)
    print("\n" + table, flush=True)
    run.report["failures"] = run.failures
    run.report["skipped"] = run.skipped
    run.report["wall_s"] = time.time() - run.t0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else _HERE / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(run.report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(table + "\n")
    run.log(f"wrote {out / 'gpu_check.json'} and gpu_check.md")
    raise SystemExit(1 if run.failures else 0)


if __name__ == "__main__":
    main()
