"""The ``mlora`` package (PyPI 0.5.2) as a benchmark contender, in its own virtual environment.

    .venv/bin/python benchmarks/mlora_runner.py --setup     # create benchmarks/.mlora-venv (pip, ~3 GB, once)
    .venv/bin/python benchmarks/mlora_runner.py --check     # does it import and train one step here?

``bench.py`` drives it as a warm worker (``--worker``); ``realistic.py`` as one whole process per run
(``--whole``: load the model, train every adapter, save them, print one JSON line, exit).

mlora pins torch 2.3 and transformers 4.44, which cannot share lorafleet's environment, so ``ensure_venv``
installs ``mlora==0.5.2`` with its own pinned dependencies (PyPI's torch 2.3 build, which carries CUDA
libraries it does not use here) into ``benchmarks/.mlora-venv`` (git-ignored). ``bench.py`` then starts this
file with that venv's Python as a worker (``--worker``, see ``common.serve``) with ``MLORA_BACKEND_TYPE=CPU``.

How mlora is driven: through its public API, the way its own ``mlora.train`` loop does it:
``LLMModel.from_pretrained`` on the benchmark's Hugging Face folder, one ``LoraConfig`` per adapter
(``init_adapter``), then per step one ``LLMModelInput`` holding every adapter's batch (mlora's multi-LoRA
batch: all sequences padded to the longest one, ``LLMBatchConfig`` row ranges per adapter, and
``gradient_checkpoint_="recompute"``, which ``mlora.Dispatcher`` always sets for training), ``model.forward``,
the sum of the adapters' losses, one backward, and each adapter's own ``torch.optim.AdamW``; at the end each
adapter's weights are saved as ``mlora.train`` saves them. The examples (token ids and supervision) come
from the harness, identical to the other contenders'; labels are -100 on the prompt and on padding, so the
loss is the same mean cross-entropy over supervised tokens. Only the mlora loop is bypassed for its data
loading (which reads HF ``datasets`` and applies its own prompt template): the model, the batching and the
adapters are mlora's.

This file imports neither lorafleet nor anything newer than the mlora venv has.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BENCH_DIR, Hyper, peak_rss_bytes, reset_peak_rss, serve

__all__ = ["MLORA_VERSION", "VENV", "ensure_venv", "installed", "main", "venv_python"]

MLORA_VERSION = "0.5.2"
VENV = BENCH_DIR / ".mlora-venv"


def venv_python() -> Path:
    return VENV / "bin" / "python"


def installed() -> bool:
    """Whether the venv holds mlora at its pinned version (an install under way does not count)."""
    if not venv_python().is_file():
        return False
    probe = subprocess.run(
        [
            str(venv_python()),
            "-c",
            f"import importlib.metadata as m; assert m.version('mlora') == '{MLORA_VERSION}'",
        ],
        capture_output=True,
    )
    return probe.returncode == 0


def ensure_venv(log=print) -> Path:
    """Create ``benchmarks/.mlora-venv`` with ``mlora==0.5.2`` (and its pins) unless it is there; its Python.

    Raises ``RuntimeError`` with pip's last lines when the install fails.
    """
    if installed():
        return venv_python()
    log(
        f"installing mlora=={MLORA_VERSION} into {VENV} (its pinned torch and transformers; a few minutes, once)"
    )
    if not venv_python().is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    pip = subprocess.run(
        [
            str(venv_python()),
            "-m",
            "pip",
            "install",
            "-q",
            "--progress-bar",
            "off",
            f"mlora=={MLORA_VERSION}",
        ],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0 or not installed():
        tail = "\n".join((pip.stdout + pip.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"pip install mlora=={MLORA_VERSION} failed (exit {pip.returncode}):\n{tail}")
    return venv_python()


def worker_argv() -> list[str]:
    return [str(venv_python()), str(Path(__file__).resolve()), "--worker"]


def worker_env(threads: int) -> dict[str, str]:
    return {
        "MLORA_BACKEND_TYPE": "CPU",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": "",  # nothing from lorafleet's environment
    }


class _Handlers:
    def __init__(self) -> None:
        self.model = None
        self.dtype = None

    def load(self, req: dict[str, Any]) -> dict[str, Any]:
        import torch

        torch.set_num_threads(int(req["threads"]))
        import mlora

        t0 = time.perf_counter()
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[req["dtype"]]
        self.model = mlora.LLMModel.from_pretrained(
            req["model_dir"], device="cpu", load_dtype=self.dtype, compute_dtype=self.dtype
        )
        if self.model.config_.dtype_ != self.dtype:
            raise RuntimeError(f"mlora loaded the model as {self.model.config_.dtype_}, not {self.dtype}")
        return {
            "load_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "mlora": MLORA_VERSION,
        }

    def run(self, req: dict[str, Any]) -> dict[str, Any]:
        import mlora
        import torch

        hyper = Hyper.from_json(req["hyper"])
        examples: list = req["examples"]
        names = [f"adapter{i}" for i in range(len(examples))]
        pad_id = self.model.config_.pad_token_id_ or 0
        torch.manual_seed(0)
        reset_peak_rss()
        optimizers = []
        for name in names:
            cfg = mlora.LoraConfig(
                adapter_name=name,
                task_name="casual",
                lora_r_=hyper.rank,
                lora_alpha_=int(hyper.alpha),
                lora_dropout_=float(hyper.dropout),
                target_modules_={
                    m: m in hyper.target_modules
                    for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
                },
            ).check()
            self.model.init_adapter(cfg)
            params = [p for p in self.model.get_adapter_weight_dict(name).values() if p.requires_grad]
            optimizers.append(torch.optim.AdamW(params, lr=hyper.lr, weight_decay=hyper.weight_decay))
        out = Path(tempfile.mkdtemp(prefix="mlora-", dir=req.get("scratch") or None))
        tokens = supervised = processed = 0
        first_losses: list[float] = []
        try:
            steps = []
            for s in range(hyper.steps):
                rows = [
                    [ex[(s * hyper.batch_size + j) % len(ex)] for j in range(hyper.batch_size)]
                    for ex in examples
                ]
                longest = max(len(ids) for batch in rows for ids, _ in batch)
                batch_tokens, batch_labels, batch_masks, configs = [], [], [], []
                for name, batch in zip(names, rows):
                    start = len(batch_tokens)
                    for ids, mask in batch:
                        pad = longest - len(ids)
                        batch_tokens.append(list(ids) + [pad_id] * pad)
                        batch_labels.append([t if m else -100 for t, m in zip(ids, mask)] + [-100] * pad)
                        batch_masks.append([1] * len(ids) + [0] * pad)
                        tokens += len(ids)
                        supervised += sum(mask)
                    configs.append(mlora.LLMBatchConfig(name, start, len(batch_tokens)))
                processed += longest * len(batch_tokens)
                steps.append((batch_tokens, batch_labels, batch_masks, configs))
            t0 = time.perf_counter()
            for batch_tokens, batch_labels, batch_masks, configs in steps:
                inputs = mlora.LLMModelInput(
                    batch_configs_=configs,
                    batch_tokens_=batch_tokens,
                    batch_labels_=batch_labels,
                    batch_masks_=batch_masks,
                    gradient_checkpoint_="recompute",
                )
                outputs = self.model.forward(inputs)
                total = None
                for o in outputs:
                    total = o.loss if total is None else total + o.loss
                total.backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if not first_losses:
                    by_name = {o.adapter_name: float(o.loss.detach()) for o in outputs}
                    first_losses = [by_name[n] for n in names]
            for name in names:  # as mlora.trainer.save_adapter_weight writes them
                folder = out / name
                folder.mkdir()
                torch.save(self.model.get_adapter_weight_dict(name), folder / "adapter_model.bin")
            t1 = time.perf_counter()
        finally:
            for name in names:
                if name in self.model.adapter_configs_:
                    self.model.unload_adapter(name)
            shutil.rmtree(out, ignore_errors=True)
        return {
            "tokens": tokens,
            "supervised_tokens": supervised,
            "processed_tokens": processed,
            "makespan_s": t1 - t0,
            "completion_s": [t1 - t0] * len(names),
            "first_losses": first_losses,
            "peak_rss_bytes": peak_rss_bytes(),
            "threads": torch.get_num_threads(),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--worker", action="store_true", help="serve requests (run with the mlora venv's Python)")
    g.add_argument("--setup", action="store_true", help="create benchmarks/.mlora-venv")
    g.add_argument("--check", action="store_true", help="install if needed, then import mlora in the venv")
    g.add_argument("--whole", action="store_true", help="one run in this process (the mlora venv's Python)")
    p.add_argument("--model-dir", help="--whole: the Hugging Face model folder")
    p.add_argument(
        "--examples", help="--whole: JSON file, per adapter a list of [token ids, supervised mask]"
    )
    p.add_argument("--hyper", help="--whole: Hyper as JSON")
    p.add_argument("--scratch", default=None, help="--whole: folder for the saved adapters")
    args = p.parse_args(argv)
    if args.whole:
        import json

        os.environ.setdefault("MLORA_BACKEND_TYPE", "CPU")
        h = _Handlers()
        threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        h.load({"threads": threads, "dtype": "float32", "model_dir": args.model_dir})
        examples = json.loads(Path(args.examples).read_text())
        print(
            json.dumps(
                h.run({"hyper": json.loads(args.hyper), "examples": examples, "scratch": args.scratch})
            )
        )
        return 0
    if args.worker:
        os.environ.setdefault("MLORA_BACKEND_TYPE", "CPU")
        h = _Handlers()
        serve({"load": h.load, "run": h.run})
        return 0
    py = ensure_venv()
    if args.check:
        env = {**os.environ, **worker_env(1)}
        code = "import mlora, torch, transformers; print('mlora', mlora.__name__, torch.__version__, transformers.__version__)"
        return subprocess.run([str(py), "-c", code], env=env).returncode
    print(f"mlora {MLORA_VERSION} is installed in {VENV}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
