"""lorafleet (N adapters trained together) against HF PEFT + transformers (one adapter after another).

Run from the repository root:

    .venv/bin/python benchmarks/vs_peft.py                 # 4 adapters, random 1024 x 8 LLaMA, float32, 3 runs
    .venv/bin/python benchmarks/vs_peft.py --quick         # 1 run
    .venv/bin/python benchmarks/vs_peft.py --dtype bfloat16 --model smollm2 --adapters 8

Both sides train the same adapters (rank 16, alpha 32 on q/k/v/o, dropout 0.05) on the same examples
(``common.prepare_workload``: real chatterbot text, the SmolLM2 tokenizer) in the same order with the same
batch size (8), optimizer (torch AdamW) and steps, starting from the same base weights (one HF folder):

- **lorafleet**: one ``Engine`` with N tasks; each fused micro-batch packs every task's next batch without
  padding, the frozen base runs once over it, each task steps its own optimizer.
- **peft_sequential**: what users do today: ``get_peft_model`` on the ``transformers`` model, a plain loop of
  ``loss = model(input_ids, attention_mask, labels).loss; loss.backward(); opt.step()`` over batches padded to
  their longest example (as ``DataCollatorForSeq2Seq`` pads), ``save_pretrained``, then ``unload`` and the next
  adapter. Only the training loops and saves are timed, not the wrapping and unwrapping.
- **peft_single** (used by ``bench.py`` for "N PEFT processes at once"): one adapter of the above per process.

MFU = ``common.train_flops`` / makespan over the matmul peak, measured in the lorafleet worker before every
repeat; the best measurement counts.

Each contender runs in its own worker process (``common.Worker``), so its peak resident memory is its
own; runs are interleaved (lorafleet, PEFT, lorafleet, ...) and each figure is the median of the repeats.
The result (JSON) goes to benchmarks/results/vs_peft.json and a Markdown table is printed.

The worker side of this file (``--worker``) is what ``bench.py`` starts for the lorafleet and PEFT
contenders: ``serve`` answers ``load`` and ``run`` requests (see ``_Handlers``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CACHE_DIR,
    RESULTS_DIR,
    SMOLLM2_GGUF,
    Hyper,
    RunResult,
    Worker,
    load_examples,
    lorafleet_config,
    machine_info,
    measure_matmul_peak,
    peak_rss_bytes,
    prepare_model,
    prepare_workload,
    reset_peak_rss,
    summarize,
    train_flops,
)

__all__ = [
    "LorafleetTrainer",
    "PeftTrainer",
    "compare",
    "main",
    "run_request",
    "sequential_prefix",
    "start_worker",
    "step_batch",
    "to_result",
    "worker_argv",
]

_DTYPES = ("float32", "bfloat16")


def step_batch(examples: list, step: int, batch_size: int) -> list:
    """The examples of optimizer step ``step`` (0-based): the next ``batch_size`` in file order, wrapping."""
    n = len(examples)
    return [examples[(step * batch_size + j) % n] for j in range(batch_size)]


def _trained_counts(examples: list, hyper: Hyper) -> tuple[int, int]:
    """(real tokens, supervised tokens) of the batches one adapter trains on."""
    tokens = supervised = 0
    for step in range(hyper.steps):
        for ids, mask in step_batch(examples, step, hyper.batch_size):
            tokens += len(ids)
            supervised += sum(mask)
    return tokens, supervised


def _torch_dtype(name: str):
    from lorafleet.models import base_dtype

    return base_dtype(name)


class LorafleetTrainer:
    """N tasks on one ``Engine`` over a base model loaded once (adapters are added and removed per run)."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        from lorafleet.models import load_model
        from lorafleet.models.tokenizer import load_tokenizer

        self.model_dir, self.dtype = model_dir, dtype
        self.model = load_model(model_dir, _torch_dtype(dtype), "cpu")
        self.tokenizer = load_tokenizer(SMOLLM2_GGUF)

    def run(self, data_paths: list[str], examples: list, hyper: Hyper, out: Path) -> dict[str, Any]:
        from lorafleet.config import parse_config
        from lorafleet.train.engine import Engine
        from lorafleet.train.events import StatusEvent, StepEvent

        cfg = parse_config(lorafleet_config(self.model_dir, self.dtype, data_paths, hyper, out))
        engine = Engine(cfg, model=self.model, tokenizer=self.tokenizer, tensorboard=False)
        finished: dict[str, float] = {}
        first_loss: dict[str, float] = {}

        def on_event(ev) -> None:
            if isinstance(ev, StatusEvent) and ev.status == "succeeded":
                finished.setdefault(ev.task, time.perf_counter())
            elif isinstance(ev, StepEvent) and ev.step == 1:
                first_loss[ev.task] = ev.loss

        engine.subscribe(on_event)
        t0 = time.perf_counter()
        while engine.run_once():
            pass
        t1 = time.perf_counter()
        states = engine.states
        engine.close()
        failed = {n: s.error for n, s in states.items() if s.status != "succeeded"}
        if failed:
            raise RuntimeError(f"lorafleet tasks failed: {failed}")
        names = list(states)
        supervised = sum(_trained_counts(ex, hyper)[1] for ex in examples)
        tokens = sum(s.tokens for s in states.values())
        return {
            "tokens": tokens,
            "supervised_tokens": supervised,
            "processed_tokens": tokens,
            "makespan_s": t1 - t0,
            "completion_s": [finished[n] - t0 for n in names],
            "first_losses": [first_loss[n] for n in names],
        }


class PeftTrainer:
    """HF PEFT + transformers on a base model loaded once; ``train_adapter`` trains one adapter to the end."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        import transformers as tf

        self.model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=_torch_dtype(dtype))
        self.model.requires_grad_(False)
        self.pad_id = self.model.config.pad_token_id or 0

    def _tensors(self, batch: list) -> tuple[Any, Any, Any]:
        import torch

        longest = max(len(ids) for ids, _ in batch)
        ids_BL = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        attn_BL = torch.zeros((len(batch), longest), dtype=torch.long)
        labels_BL = torch.full((len(batch), longest), -100, dtype=torch.long)
        for b, (ids, mask) in enumerate(batch):
            n = len(ids)
            ids_BL[b, :n] = torch.tensor(ids)
            attn_BL[b, :n] = 1
            labels_BL[b, :n] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
        return ids_BL, attn_BL, labels_BL

    def train_adapter(self, examples: list, hyper: Hyper, out: Path) -> dict[str, Any]:
        """Train one adapter; returns its timed seconds, token counts and first loss."""
        import torch
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=hyper.rank,
            lora_alpha=hyper.alpha,
            lora_dropout=hyper.dropout,
            target_modules=list(hyper.target_modules),
            task_type="CAUSAL_LM",
        )
        pm = get_peft_model(self.model, cfg)
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hyper.lr, weight_decay=hyper.weight_decay)
        batches = [self._tensors(step_batch(examples, s, hyper.batch_size)) for s in range(hyper.steps)]
        first_loss = None
        t0 = time.perf_counter()
        for ids_BL, attn_BL, labels_BL in batches:
            loss = pm(input_ids=ids_BL, attention_mask=attn_BL, labels=labels_BL).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if first_loss is None:
                first_loss = float(loss.detach())
        pm.save_pretrained(out)
        seconds = time.perf_counter() - t0
        self.model = pm.unload()
        tokens, supervised = _trained_counts(examples, hyper)
        return {
            "seconds": seconds,
            "tokens": int(sum(int(a.sum()) for _, a, _ in batches)),
            "supervised_tokens": supervised,
            "processed_tokens": int(sum(a.numel() for _, a, _ in batches)),
            "first_loss": first_loss,
            "counted_tokens": tokens,
        }

    def run_sequential(self, examples: list, hyper: Hyper, out: Path) -> dict[str, Any]:
        """Adapter after adapter; ``per_adapter`` lets the harness read off the first n adapters of the run."""
        per_adapter = [self.train_adapter(ex, hyper, out / f"adapter{i}") for i, ex in enumerate(examples)]
        return {**sequential_prefix(per_adapter, len(per_adapter)), "per_adapter": per_adapter}


def sequential_prefix(per_adapter: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """The run of the first ``n`` adapters of a sequential run: their times add up, one after another."""
    done, elapsed = [], 0.0
    for r in per_adapter[:n]:
        elapsed += r["seconds"]
        done.append(elapsed)
    return {
        "tokens": sum(r["tokens"] for r in per_adapter[:n]),
        "supervised_tokens": sum(r["supervised_tokens"] for r in per_adapter[:n]),
        "processed_tokens": sum(r["processed_tokens"] for r in per_adapter[:n]),
        "makespan_s": elapsed,
        "completion_s": done,
        "first_losses": [r["first_loss"] for r in per_adapter[:n]],
    }


class _Handlers:
    """The worker's state: one trainer, loaded by ``load``, used by ``run`` (see ``common.serve``)."""

    def __init__(self) -> None:
        self.trainer: LorafleetTrainer | PeftTrainer | None = None
        self.kind = ""

    def load(self, req: dict[str, Any]) -> dict[str, Any]:
        import torch

        torch.set_num_threads(int(req["threads"]))
        t0 = time.perf_counter()
        self.kind = req["kind"]
        cls = LorafleetTrainer if self.kind == "lorafleet" else PeftTrainer
        self.trainer = cls(req["model_dir"], req["dtype"])
        return {"load_s": time.perf_counter() - t0, "threads": torch.get_num_threads()}

    def peak(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"peak_flops": measure_matmul_peak(req["dtype"], seconds=float(req.get("seconds", 1.0)))}

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        import torch

        hyper = Hyper.from_json(req["hyper"])
        examples = req["examples"]
        out = Path(tempfile.mkdtemp(prefix=f"{self.kind}-", dir=req.get("scratch") or None))
        torch.manual_seed(0)
        reset_peak_rss()
        try:
            if self.kind == "lorafleet":
                r = self.trainer.run(req["data_paths"], examples, hyper, out)
            elif self.kind == "peft_sequential":
                r = self.trainer.run_sequential(examples, hyper, out)
            else:  # peft_single: one adapter; times are absolute (monotonic) for the harness to align
                start = time.monotonic()
                one = self.trainer.train_adapter(examples[0], hyper, out)
                r = {
                    "tokens": one["tokens"],
                    "supervised_tokens": one["supervised_tokens"],
                    "processed_tokens": one["processed_tokens"],
                    "start": start,
                    "end": time.monotonic(),
                    "first_losses": [one["first_loss"]],
                }
            r["peak_rss_bytes"] = peak_rss_bytes()
            r["threads"] = torch.get_num_threads()
            return r
        finally:
            shutil.rmtree(out, ignore_errors=True)


def worker_argv() -> list[str]:
    """The command line of a lorafleet/PEFT worker process (this file with ``--worker``)."""
    return [sys.executable, str(Path(__file__).resolve()), "--worker"]


def start_worker(
    kind: str,
    model_dir: Path,
    dtype: str,
    threads: int,
    name: str = "",
    log_dir: Path = CACHE_DIR / "logs",
    wait: bool = True,
) -> Worker:
    """A worker process of ``kind`` (lorafleet, peft_sequential, peft_single) loading the model.

    With ``wait=False`` the load request is only sent: start several workers, then ``receive()`` from each,
    so their imports and loads overlap.
    """
    env = {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    w = Worker(worker_argv(), env=env, name=name or f"{kind}-{model_dir.name}-{dtype}", log_dir=log_dir)
    w.send({"op": "load", "kind": kind, "model_dir": str(model_dir), "dtype": dtype, "threads": threads})
    if wait:
        w.receive()
    return w


def run_request(
    data_paths: list[Path], examples: list, hyper: Hyper, repeat: int, scratch: Path = CACHE_DIR / "runs"
) -> dict[str, Any]:
    """A ``run`` request: train one adapter per data path (lorafleet) or per examples list (the others)."""
    return {
        "op": "run",
        "data_paths": [str(p) for p in data_paths],
        "examples": examples,
        "hyper": hyper.to_json(),
        "repeat": repeat,
        "scratch": str(scratch),
    }


def to_result(contender: str, model: str, dtype: str, repeat: int, reply: dict[str, Any]) -> RunResult:
    return RunResult(
        contender=contender,
        model=model,
        dtype=dtype,
        num_adapters=len(reply["completion_s"]),
        repeat=repeat,
        tokens=reply["tokens"],
        supervised_tokens=reply["supervised_tokens"],
        processed_tokens=reply["processed_tokens"],
        makespan_s=reply["makespan_s"],
        completion_s=reply["completion_s"],
        peak_rss_bytes=[reply["peak_rss_bytes"]],
        first_losses=reply["first_losses"],
        threads=reply.get("threads", 0),
    )


def compare(
    model: str, dtype: str, num_adapters: int, repeats: int, hyper: Hyper, threads: int | None = None
) -> dict[str, Any]:
    """lorafleet vs PEFT sequential on one scenario; returns the report (runs, medians, ratios, MFU).

    ``threads``: torch threads of each contender (default: every core).
    """
    from lorafleet.models.tokenizer import load_tokenizer

    threads = threads or os.cpu_count() or 1
    model_dir = prepare_model(model)
    config = json.loads((model_dir / "config.json").read_text())
    paths = prepare_workload(CACHE_DIR / "workload", num_adapters, hyper.steps * hyper.batch_size)
    examples = load_examples(paths, load_tokenizer(SMOLLM2_GGUF), hyper.max_seq_len)
    (CACHE_DIR / "runs").mkdir(parents=True, exist_ok=True)
    workers = {k: start_worker(k, model_dir, dtype, threads) for k in ("lorafleet", "peft_sequential")}
    try:
        peaks = [workers["lorafleet"].call({"op": "peak", "dtype": dtype})["peak_flops"]]
        warm = Hyper(**{**hyper.__dict__, "steps": 1})
        for w in workers.values():  # allocator and kernel warm-up, not measured
            w.call(run_request(paths[:1], examples[:1], warm, -1))
        runs: list[RunResult] = []
        for r in range(repeats):
            if r > 0:  # the best of several measurements: one may land in a busy moment of a shared machine
                peaks.append(workers["lorafleet"].call({"op": "peak", "dtype": dtype})["peak_flops"])
            for kind, w in workers.items():
                reply = w.call(run_request(paths, examples, hyper, r))
                res = to_result(kind, model, dtype, r, reply)
                runs.append(res)
                print(f"  run {r + 1}/{repeats} {kind:16s} {res.tokens_per_s:8.1f} tokens/s", flush=True)
    finally:
        for w in workers.values():
            w.close()
    peak = max(peaks)
    summary = {}
    for kind in workers:
        mine = [x for x in runs if x.contender == kind]
        tps = summarize([x.tokens_per_s for x in mine])
        flops = [train_flops(config, x.tokens, x.supervised_tokens) / x.makespan_s for x in mine]
        summary[kind] = {
            "tokens_per_s": tps,
            "mfu": summarize([f / peak for f in flops]),
            "peak_rss_bytes": summarize([x.peak_rss_bytes[0] for x in mine]),
            "tokens": mine[0].tokens,
        }
    speedups = [
        a.tokens_per_s / b.tokens_per_s
        for a, b in zip(
            [x for x in runs if x.contender == "lorafleet"],
            [x for x in runs if x.contender == "peft_sequential"],
        )
    ]
    return {
        "benchmark": "vs_peft",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "model": model,
        "dtype": dtype,
        "num_adapters": num_adapters,
        "threads": threads,
        "hyper": hyper.to_json(),
        "matmul_peak_flops": peak,
        "matmul_peak_samples": peaks,
        "summary": summary,
        "speedup": summarize(speedups),
        "runs": [x.__dict__ for x in runs],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=["synthetic", "smollm2"], default="synthetic")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per adapter")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one run instead of --repeats")
    p.add_argument("--threads", type=int, default=None, help="torch threads per contender (default: cores)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "vs_peft.json")
    args = p.parse_args(argv)
    if args.worker:
        from common import serve

        h = _Handlers()
        serve({"load": h.load, "run": h.run, "peak": h.peak})
        return 0
    repeats = 1 if args.quick else args.repeats
    print(f"vs_peft: {args.adapters} adapters, {args.model}, {args.dtype}, {repeats} run(s)", flush=True)
    report = compare(args.model, args.dtype, args.adapters, repeats, Hyper(steps=args.steps), args.threads)
    s = report["summary"]
    print("| contender | tokens/s (median [min, max]) | MFU | peak RSS |")
    print("|---|---|---|---|")
    for kind, v in s.items():
        t, m = v["tokens_per_s"], v["mfu"]
        print(
            f"| {kind} | {t['median']:.1f} [{t['min']:.1f}, {t['max']:.1f}] | {100 * m['median']:.1f}% | "
            f"{v['peak_rss_bytes']['median'] / 2**30:.2f} GiB |"
        )
    sp = report["speedup"]
    print(
        f"lorafleet / PEFT sequential: {sp['median']:.2f}x [{sp['min']:.2f}, {sp['max']:.2f}] (target >= 1.5x)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
