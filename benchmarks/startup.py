"""Time from ``lorafleet train`` to its first step and from its last step to the exit, of two source trees.

Run from the repository root (``--src``: the ``src`` folders to compare, e.g. main's and a branch's):

    .venv/bin/python benchmarks/startup.py --src /work/main/src src --repeats 3

Each repeat runs the real command (``python -m lorafleet train``, the realistic workload's 4 adapters, 1
step each; ``realistic.run_lorafleet``) once per source tree, in turn, with ``PYTHONPATH`` set to that tree,
so the trees are compared side by side under the same load. Reports the median and [min-max] of each, the
time this machine takes to read the model's weights (``load_model`` alone) and whether the run imported
``torch._dynamo``. Writes ``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE_DIR, RESULTS_DIR, Hyper, machine_info, prepare_model
from realistic import run_lorafleet, weight_read_s, write_workload


def _imports_dynamo(env: dict) -> bool:
    """Whether building a task's optimizer and stepping it imports torch._dynamo in this tree."""
    code = (
        "import sys, torch; from lorafleet.train.optim import build_optimizer, build_scheduler; "
        "p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2); "
        "o = build_optimizer([{'params': [p]}], 'adamw', 1e-3, 0.0, (0.9, 0.999), 1e-8); "
        "s = build_scheduler(o, 'cosine', 1, 4); o.step(); s.step(); o.zero_grad(); o.state_dict(); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def _mmm(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", nargs="+", type=Path, required=True, help="src folders to compare")
    p.add_argument("--model", default="medium", choices=["medium", "synthetic", "tiny"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "startup.json")
    args = p.parse_args(argv)
    model_dir = prepare_model(args.model, args.cache_dir)
    hyper = Hyper(steps=1)
    data = write_workload(args.cache_dir / "realistic-realistic", "realistic", hyper.batch_size)
    envs = {}
    for src in args.src:
        if not (src / "lorafleet").is_dir():
            raise SystemExit(f"--src {src}: no lorafleet package there; pass a repository's src folder")
        envs[str(src)] = {**os.environ, "PYTHONPATH": str(src.resolve()), "PYTHONUNBUFFERED": "1",
                          "OMP_NUM_THREADS": str(args.threads)}  # fmt: skip
    runs: dict[str, list[dict]] = {k: [] for k in envs}
    read_s = []
    for _ in range(args.repeats):
        read_s.append(weight_read_s(model_dir, next(iter(envs.values()))))
        for src, env in envs.items():
            with tempfile.TemporaryDirectory() as scratch:
                r = run_lorafleet(model_dir, data, hyper, Path(scratch), env)
            runs[src].append({k: r[k] for k in ("whole_s", "to_first_step_s", "after_last_step_s")})
    report = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine_info(),
        "model": args.model,
        "threads": args.threads,
        "weight_read_s": read_s,
        "trees": {src: {"imports_dynamo": _imports_dynamo(envs[src]), "runs": runs[src]} for src in envs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{report['date']}, model {args.model}, {args.threads} thread(s); reading the weights {_mmm(read_s)} s"
    )
    for src, tree in report["trees"].items():
        rs = tree["runs"]
        print(
            f"{src}: command to first step {_mmm([r['to_first_step_s'] for r in rs])} s, last step to exit "
            f"{_mmm([r['after_last_step_s'] for r in rs])} s, whole {_mmm([r['whole_s'] for r in rs])} s; "
            f"imports torch._dynamo: {tree['imports_dynamo']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
