"""The worker's flags, in a module that imports nothing but argparse.

``lorafleet`` builds every subcommand's parser before it runs one, so ``lorafleet train`` would otherwise
import the worker (its store, files and engine settings) only to list ``lorafleet worker``'s flags.
"""

from __future__ import annotations

import argparse

__all__ = ["LEASE_S", "add_engine_arguments", "add_worker_arguments"]

LEASE_S = 20.0  # seconds a job's lease lasts without renewal (``Worker``'s default)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    """The worker's flags (``lorafleet worker`` and ``python -m lorafleet.service.worker_process``)."""
    p.add_argument(
        "--data-dir", required=True, help="the shared data folder (uploads, checkpoints, adapters)"
    )
    p.add_argument("--base-model", required=True, help="Hugging Face model folder or .gguf file (or pkg:...)")
    p.add_argument(
        "--store", default=None,
        help="sqlite:///PATH or postgresql://user@host[:port]/db (default: sqlite:///DATA_DIR/lorafleet.db)",
    )  # fmt: skip
    p.add_argument(
        "--worker-id", default=None,
        help="this worker's name in the store (default HOST-PID); a restarted worker with the same id takes "
        "its jobs back at once",
    )  # fmt: skip
    p.add_argument(
        "--lease-s", type=float, default=LEASE_S,
        help="seconds a job's lease lasts without renewal: how soon other workers resume a dead worker's jobs",
    )  # fmt: skip
    p.add_argument(
        "--nproc", type=int, default=1,
        help="run the worker as P pipeline stages on this machine (torchrun; gloo on CPU, one GPU per stage)",
    )  # fmt: skip
    add_engine_arguments(p)
    p.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process is no longer the parent"
    )


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """How a worker trains and serves: the flags ``lorafleet worker`` and ``lorafleet serve`` (for the worker
    it supervises) share."""
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--max-concurrent-tasks", type=int, default=8, help="jobs that train at the same time")
    p.add_argument(
        "--max-tokens-per-micro-batch", type=int, default=4096, help="fused micro-batch token budget"
    )
    p.add_argument(
        "--poll-interval", type=float, default=0.5, help="seconds between the worker's store reads"
    )
    p.add_argument(
        "--num-threads", type=int, default=None,
        help="CPU threads the worker's torch uses (default: torch's; 1 on a small machine shared with the API)",
    )  # fmt: skip
    p.add_argument(
        "--adapter-cache-mb", type=float, default=1024.0,
        help="inference: adapters kept loaded on the worker, least recently used evicted first",
    )  # fmt: skip
    p.add_argument("--max-inference-rows", type=int, default=64, help="inference requests decoded together")
    p.add_argument(
        "--no-inference", action="store_true",
        help="train only, never serve chat/completions (workers sharing a data folder elect one server)",
    )  # fmt: skip
