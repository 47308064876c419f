"""The service's worker as a 2-stage pipeline (``lorafleet serve --nproc 2``) against the single-process
worker (``--nproc 1``), on the same 4 concurrent jobs.

    .venv/bin/python benchmarks/service_pipeline.py                  # SmolLM2-135M, 4 jobs x 4 steps, CPU
    .venv/bin/python benchmarks/service_pipeline.py --model tiny --steps 20   # seconds: a smoke run

Each contender is a real service on a fresh data folder (``lorafleet serve --api-only`` and ``lorafleet
worker --nproc P``): 4 tenants-worth of jobs (real
chatterbot text, rank 16 on q/k/v/o, batch 8 in micro-batches of 4, fixed seeds) are created at once
through the API, and the script waits until all succeeded. Reported: trained tokens per second from the
first job's start to the last one's end (the store's ``started_at`` / ``finished_at``), the stages' steady
state idle fraction from the pipeline worker's ``trace.json`` (written when it stops; ``parallel/trace.py``)
and the largest relative difference between the two contenders' adapters (the same requests must give the
same adapters). Both contenders' processes use one torch thread each. Writes
``benchmarks/results/service_pipeline.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_info, prepare_model, prepare_workload

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(model: Path, files: list[Path], nproc: int, args, work: Path) -> dict:
    from lorafleet.parallel import trace_summary
    from lorafleet.service import auth
    from lorafleet.service.files import DataDir
    from lorafleet.service.store import SQLiteStore

    data = work / f"nproc{nproc}"
    dd = DataDir(data).create()
    token = auth.create_token(SQLiteStore(dd.db), "bench")[1]
    port = _free_port()
    # the API alone and the worker as its own process, so that the worker can be stopped cleanly (SIGTERM:
    # a --nproc worker's rank 0 then stops the pipeline and writes trace.json)
    api = [sys.executable, "-m", "lorafleet", "serve", "--api-only", "--base-model", str(model), "--data-dir",
           str(data), "--port", str(port), "--max-tokens-per-micro-batch", str(args.max_tokens)]  # fmt: skip
    worker = [sys.executable, "-m", "lorafleet", "worker", "--base-model", str(model), "--data-dir", str(data),
              "--device", "cpu", "--num-threads", "1", "--no-inference", "--poll-interval", "0.1",
              "--max-tokens-per-micro-batch", str(args.max_tokens), "--nproc", str(nproc)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(work / f"serve-{nproc}.log", "wb")
    procs = [
        subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env) for c in (api, worker)
    ]
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).json()["worker"].get("state") == "ready":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        ids = []
        for i, path in enumerate(files):
            fid = client.post("/v1/files", files={"file": (path.name, path.read_bytes())}).json()["id"]
            body = {
                "training_file": fid, "seed": 100 + i, "suffix": f"job{i}",
                "hyperparameters": {"batch_size": 8, "learning_rate_multiplier": 10.0},
                "lorafleet": {
                    "training": {"max_steps": args.steps, "micro_batch_size": 4, "max_seq_len": 128},
                    "adapter": {"rank": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                },
            }  # fmt: skip
            r = client.post("/v1/fine_tuning/jobs", json=body)
            r.raise_for_status()
            ids.append(r.json()["id"])
        jobs = []
        for job_id in ids:
            while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
                "succeeded", "failed", "cancelled",
            ):  # fmt: skip
                time.sleep(0.2)
            assert job["status"] == "succeeded", job
            jobs.append(job)
    finally:
        for proc in reversed(procs):  # the worker first
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
        log.close()
    store = SQLiteStore(dd.db)
    recs = [store.get_job_any(j["id"]) for j in jobs]
    start, end = min(r.started_at for r in recs), max(r.finished_at for r in recs)
    tokens = sum(r.trained_tokens for r in recs)
    out = {
        "nproc": nproc,
        "tokens": tokens,
        "wall_s": round(end - start, 2),
        "tokens_per_s": tokens / (end - start),
    }
    trace = dd.engine / "trace.json"
    if nproc > 1:
        if not trace.is_file():
            raise SystemExit(
                f"no {trace}: the pipeline worker did not stop cleanly\n{(work / 'serve-2.log').read_text()[-3000:]}"
            )
        summary = trace_summary([e for e in _spans(trace)])
        out["steady_idle"] = {k: v["steady_idle_fraction"] for k, v in summary.items()}
    out["adapters"] = [str(dd.adapter_dir(j["fine_tuned_model"])) for j in jobs]
    return out


def _spans(trace_path: Path) -> list[dict]:
    """The trace's spans back in ``trace_summary``'s form (seconds)."""
    data = json.loads(trace_path.read_text())
    return [
        {"name": e["cat"], "start": e["ts"] / 1e6, "end": (e["ts"] + e["dur"]) / 1e6, "stage": e["tid"],
         "replica": e["pid"], "mb": 0, "tasks": e["args"]["tasks"]}
        for e in data["traceEvents"] if e["ph"] == "X"
    ]  # fmt: skip


def _max_rel_diff(a: list[str], b: list[str]) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for x, y in zip(a, b):
        ta, tb = (load_file(str(Path(p) / "adapter_model.safetensors")) for p in (x, y))
        num = sum(float((ta[k] - tb[k]).pow(2).sum()) for k in ta) ** 0.5
        den = sum(float(tb[k].pow(2).sum()) for k in tb) ** 0.5
        worst = max(worst, num / max(den, 1e-30))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "synthetic"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=160, help="the worker's fused micro-batch token budget")
    p.add_argument("--examples", type=int, default=32, help="examples per job")
    p.add_argument("--out", default="service_pipeline")
    p.add_argument(
        "--work-dir", default=None, help="where the temporary data folders go (default: the system's)"
    )
    args = p.parse_args()
    import tempfile

    model = prepare_model(args.model)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        work = Path(tmp)
        print(f"working in {work} (serve logs: serve-1.log, serve-2.log)", flush=True)
        files = prepare_workload(work / "data", 4, args.examples)
        single = _run(model, files, 1, args, work)
        pipe = _run(model, files, 2, args, work)
        diff = _max_rel_diff(pipe["adapters"], single["adapters"])
    report = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "load_average": os.getloadavg(),
        "model": args.model, "jobs": 4, "steps": args.steps, "max_tokens_per_micro_batch": args.max_tokens,
        "single": {k: v for k, v in single.items() if k != "adapters"},
        "pipeline": {k: v for k, v in pipe.items() if k != "adapters"},
        "speedup": pipe["tokens_per_s"] / single["tokens_per_s"],
        "max_rel_diff": diff,
    }  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(report, indent=2))
    idle = ", ".join(f"{100 * v:.0f}%" for v in report["pipeline"]["steady_idle"].values() if v is not None)
    md = (
        f"{args.model}, 4 jobs x {args.steps} steps (batch 8, micro-batches of 4), max_tokens_per_micro_batch "
        f"{args.max_tokens}, float32; {report['when']}; load average at the end "
        f"{', '.join(f'{x:.1f}' for x in report['load_average'])}\n\n"
        "| worker | processes x threads | tokens/s | vs single | steady-state idle per stage | same adapters (max rel. diff) |\n"
        "|---|---|---|---|---|---|\n"
        f"| `--nproc 1` | 1 x 1 | {single['tokens_per_s']:.1f} | 1.00x | - | - |\n"
        f"| `--nproc 2` | 2 x 1 | {pipe['tokens_per_s']:.1f} | {report['speedup']:.2f}x | {idle} | {diff:.1e} |\n"
    )
    (RESULTS_DIR / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
