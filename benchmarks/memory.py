"""Peak memory of lorafleet with 1 and 8 adapters on one base model, and what the memory knobs change.

Run from the repository root:

    .venv/bin/python benchmarks/memory.py                 # random 1024 x 8 LLaMA, float32, 2 repeats
    .venv/bin/python benchmarks/memory.py --dtype bfloat16 --repeats 3

The workload and hyper-parameters are ``bench.py``'s (``common.Hyper``: rank 16 on q/k/v/o, batch 8, real
chatterbot examples): N adapters each train ``Hyper.steps`` optimizer steps, all N in one ``Engine``. Every
(variant, N) runs in a fresh process, so its peak resident memory (VmHWM, after the model is loaded and one
untimed warm-up run) is its own. Variants, the settings a user has for memory:

- ``default``: the dispatcher packs every task's batch into one fused micro-batch (the token budget,
  ``dispatcher.max_tokens_per_micro_batch``, is 4096);
- ``budget 512``: at most 512 tokens per fused micro-batch, so the activations of one micro-batch stay
  those of about two adapters' batches whatever N is;
- ``recompute``: ``recompute: true``, each decoder layer keeps only its input for the backward;
- ``recompute + budget 512``: both.

The table gives each variant's peak RSS at N=1 and N=8, their ratio (the benchmark issue's target: 8
adapters within 1.3x the memory of 1) and the tokens/s of the N=8 run. Output:
benchmarks/results/memory.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
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
    Hyper,
    load_examples,
    machine_info,
    peak_rss_bytes,
    prepare_model,
    prepare_workload,
    reset_peak_rss,
    summarize,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "budget 512": {"dispatcher": {"max_tokens_per_micro_batch": 512}},
    "recompute": {"recompute": True},
    "recompute + budget 512": {"recompute": True, "dispatcher": {"max_tokens_per_micro_batch": 512}},
}
GiB = 2**30


def _one(n: int, variant: str, model: str, dtype: str, threads: int, cache: Path) -> dict[str, Any]:
    """This process: load the model, warm up, then one measured run of N adapters under ``variant``."""
    import torch

    from vs_peft import LorafleetTrainer

    torch.set_num_threads(threads)
    settings = VARIANTS[variant]

    class Trainer(LorafleetTrainer):
        def _config(self, data_paths, hyper, out):
            cfg = super()._config(data_paths, hyper, out)
            for key, value in settings.items():
                cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
            return cfg

    trainer = Trainer(str(prepare_model(model, cache)), dtype)
    paths = prepare_workload(cache / "workload", 8, 8)[:n]
    hyper = Hyper(steps=1)
    examples = load_examples(paths, trainer.tokenizer, hyper.max_seq_len)
    with tempfile.TemporaryDirectory() as d:
        trainer.run([str(p) for p in paths], examples, hyper, Path(d) / "warm")
        reset_peak_rss()
        result = trainer.run([str(p) for p in paths], examples, hyper, Path(d) / "run")
    return {
        "n": n,
        "variant": variant,
        "peak_rss_bytes": peak_rss_bytes(),
        "tokens": result["tokens"],
        "tokens_per_s": result["tokens"] / result["makespan_s"],
    }


def _pick(runs: list[dict[str, Any]], variant: str, n: int, key: str) -> list[float]:
    return [x[key] for x in runs if x["variant"] == variant and x["n"] == n]


def _render(report: dict[str, Any]) -> str:
    lines = [
        f"{report['model']} model, {report['dtype']}, {report['threads']} torch threads, "
        f"{report['repeats']} run(s) per figure (median [min-max]); {report['date']}",
        "",
        "| variant | peak RSS, 1 adapter (GiB) | peak RSS, 8 adapters (GiB) | 8 / 1 | tokens/s, 8 adapters |",
        "|---|---|---|---|---|",
    ]
    for variant, row in report["variants"].items():
        one, eight, tps = row["1"], row["8"], row["tokens_per_s_8"]
        lines.append(
            f"| {variant} | {one['median'] / GiB:.2f} | {eight['median'] / GiB:.2f} "
            f"[{eight['min'] / GiB:.2f}-{eight['max'] / GiB:.2f}] | {row['ratio']:.2f}x | "
            f"{tps['median']:.1f} [{tps['min']:.1f}-{tps['max']:.1f}] |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic", choices=["synthetic", "smollm2", "tiny"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "memory.json")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR, help="models and workload")
    p.add_argument("--one", nargs=2, metavar=("N", "VARIANT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        n, variant = int(args.one[0]), args.one[1]
        print(json.dumps(_one(n, variant, args.model, args.dtype, args.threads, args.cache_dir)))
        return 0

    t0 = time.time()
    runs: list[dict[str, Any]] = []
    for r in range(args.repeats):
        for variant in VARIANTS:
            for n in (1, 8):
                cmd = [sys.executable, __file__, "--one", str(n), variant, "--model", args.model,
                       "--dtype", args.dtype, "--threads", str(args.threads), "--cache-dir", str(args.cache_dir)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stderr[-3000:])
                    raise SystemExit(
                        f"memory.py: {variant} with {n} adapters failed (exit {proc.returncode})"
                    )
                runs.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "repeat": r})
                last = runs[-1]
                print(f"[{time.time() - t0:5.0f} s] repeat {r + 1} {variant:>24} N={n}: "
                      f"{last['peak_rss_bytes'] / GiB:.2f} GiB, {last['tokens_per_s']:.1f} tokens/s", flush=True)  # fmt: skip
    variants = {}
    for variant in VARIANTS:
        one, eight = (summarize(_pick(runs, variant, n, "peak_rss_bytes")) for n in (1, 8))
        variants[variant] = {
            "1": one, "8": eight, "ratio": eight["median"] / one["median"],
            "tokens_per_s_8": summarize(_pick(runs, variant, 8, "tokens_per_s")),
        }  # fmt: skip
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "model": args.model,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "settings": VARIANTS,
        "runs": runs,
        "variants": variants,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(_render(report))
    print(f"\n{args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
