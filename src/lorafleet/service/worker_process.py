"""The worker process around ``Worker``: flags, the per-id lock, the heartbeat thread, signals, and the
parent watch (``lorafleet worker`` and ``python -m lorafleet.service.worker_process`` run ``run_worker``)."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path

from ..model_paths import check_base_model_flag
from .files import DataDir
from .jobspec import EngineSettings
from .store import Store, StoreUnavailable, default_store_url, open_store
from .worker import Worker
from .worker_args import add_worker_arguments

__all__ = ["build_parser", "main", "run_worker", "serve_worker_id"]

log = logging.getLogger("lorafleet.worker")


def _heartbeat(store: Store, worker: Worker, stop: threading.Event) -> None:
    interval = min(1.0, worker.lease_s / 4)
    while not stop.is_set():
        try:
            worker.renew()
            store.heartbeat(worker.announcement())
        except StoreUnavailable as e:  # the store is down or restarting; the next beat retries
            log.warning("heartbeat failed: %s", e)
        except Exception:
            log.exception("heartbeat failed")
        stop.wait(interval)


def _die_with_parent(parent_pid: int, stop: threading.Event) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while not stop.is_set():
            if os.getppid() != parent_pid:
                log.warning("parent %d is gone; stopping", parent_pid)
                stop.set()
            stop.wait(1.0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _lock(path: Path, stop: threading.Event) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    warned = False
    while not stop.is_set():
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        except BlockingIOError:
            if not warned:
                log.warning("another process holds %s (the same worker id); waiting for it to exit", path)
                warned = True
            stop.wait(0.5)
    return fd


def serve_worker_id(data_dir: Path) -> str:
    """The stable id ``lorafleet serve`` gives the worker it supervises: its host and data folder."""
    digest = hashlib.sha1(str(data_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-serve-{digest}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lorafleet.service.worker_process",
        description="A lorafleet training worker: claims jobs for its base model from the store and trains them.",
    )
    add_worker_arguments(p)
    return p


def _pdeathsig() -> None:
    """In a child, before exec: the kernel kills it when its parent dies (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _rank_argv(args: argparse.Namespace) -> list[str]:
    """The flags again, for the ranks that torchrun starts (each watches torchrun, not ``--parent-pid``)."""
    out: list[str] = []
    for action in build_parser()._actions:
        dest, value = action.dest, getattr(args, action.dest, None)
        # torchrun would take --nproc for its own --nproc-per-node; the ranks know WORLD_SIZE
        if dest in ("help", "parent_pid", "nproc") or value is None or value is False:
            continue
        flag = action.option_strings[-1]
        out += [flag] if value is True else [flag, str(value)]
    return out


def _launch_group(args: argparse.Namespace) -> int:
    """``--nproc P`` outside torchrun: run the worker as P pipeline stages on this machine under torchrun
    (``--standalone``); stage 0 is the worker, the others its stages. When any rank dies torchrun stops the
    others and this returns non-zero (``lorafleet serve`` then starts the whole group again)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += ["-m", "lorafleet.service.worker_process", *_rank_argv(args)]
    stop = threading.Event()
    if args.parent_pid is not None:
        _die_with_parent(args.parent_pid, stop)
    proc = subprocess.Popen(cmd, preexec_fn=_pdeathsig)
    signalled = threading.Event()

    def forward(signum, _frame):
        stop.set()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            rc = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            # once: torchrun passes it to every rank, and rank 0 stops the pipeline (a second SIGTERM would
            # make torchrun kill the ranks before rank 0 is done)
            if stop.is_set() and not signalled.is_set():
                signalled.set()
                proc.send_signal(signal.SIGTERM)
    log.info("worker group exited with code %s", rc)
    return rc


def _follow(args: argparse.Namespace) -> int:
    """A rank after the first of a ``--nproc`` worker: one pipeline stage, driven by rank 0's worker."""
    from ..parallel import PipelineError, PipelineTrainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    # SIGTERM (torchrun passes it to every rank) is rank 0's to act on: it finishes its micro-batch and stops
    # this stage through the pipeline; a dead rank 0 or torchrun ends this one anyway (lost link, parent death)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(os.getppid(), threading.Event())  # torchrun's agent
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    dd = DataDir(Path(args.data_dir).expanduser().resolve()).create()
    trainer = PipelineTrainer(_settings(args).run_config(dd.engine), tensorboard=False)
    try:
        trainer.follow()
    except PipelineError as e:
        log.error("pipeline stage stopped: %s", e)
        return 1
    return 0


def _settings(args: argparse.Namespace) -> EngineSettings:
    return EngineSettings(
        base_model=args.base_model, dtype=args.dtype, device=args.device,
        max_concurrent_tasks=args.max_concurrent_tasks, max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
    )  # fmt: skip


def run_worker(args: argparse.Namespace) -> int:
    """Run a worker with the flags of ``add_worker_arguments`` until SIGTERM/SIGINT.

    ``--nproc P`` (P > 1) runs it as P pipeline stages under torchrun (``_launch_group``); under torchrun,
    rank 0 is the worker (store, leases, a ``PipelineTrainer`` coordinator) and the other ranks its stages.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc < 1:
        raise ValueError(f"--nproc {args.nproc}: give the number of pipeline stages, at least 1")
    if "WORLD_SIZE" in os.environ:
        if args.nproc not in (1, world):
            raise ValueError(
                f"--nproc {args.nproc} but torchrun started WORLD_SIZE {world} processes: give --nproc {world}"
            )
        args.nproc = world
    for flag in (
        "max_concurrent_tasks", "max_tokens_per_micro_batch", "poll_interval", "lease_s", "adapter_cache_mb",
        "max_inference_rows",
    ):  # fmt: skip
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0 (got {getattr(args, flag)})")
    check_base_model_flag(args.base_model)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
        return _launch_group(args)
    if world > 1 and int(os.environ.get("RANK", "0")) > 0:
        rc = _follow(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # threads may still block on a broken link
    rc = _run_coordinator(args, world)
    if world > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run_coordinator(args: argparse.Namespace, world: int) -> int:
    """The worker itself (one process, or rank 0 of a ``--nproc`` group)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if world > 1:
        _die_with_parent(os.getppid(), stop)  # torchrun's agent
    elif args.parent_pid is not None:
        _die_with_parent(args.parent_pid, stop)
    if args.num_threads is not None:
        import torch

        torch.set_num_threads(args.num_threads)
    dd = DataDir(Path(args.data_dir).expanduser().resolve()).create()
    store = open_store(args.store or default_store_url(dd.root))
    settings = _settings(args)
    worker = Worker(
        store, dd, settings, args.poll_interval, args.worker_id, args.lease_s, serve_inference=not args.no_inference,
        adapter_cache_bytes=int(args.adapter_cache_mb * 1024 * 1024), max_inference_rows=args.max_inference_rows,
    )  # fmt: skip
    lock_fd = _lock(dd.root / "workers" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', worker.id)}.lock", stop)
    if stop.is_set():
        return 0
    # the previous process under this id is gone (the lock says so): its leases are free again
    if store.release_leases_of(worker.id):
        log.info("took back the jobs of this worker's previous process")
    beat = threading.Thread(target=_heartbeat, args=(store, worker, stop), daemon=True, name="heartbeat")
    beat.start()
    rc = 0
    try:
        worker.run(stop)
        worker.state = "stopped"
    except Exception as e:
        worker.state, worker.message = "error", f"{type(e).__name__}: {e}"
        log.exception("worker stopped")
        rc = 1
    finally:
        stop.set()
        beat.join(timeout=10)
        try:
            worker.release_all()
            store.heartbeat(worker.announcement())  # the last word for /healthz: stopped or error
        except StoreUnavailable:
            pass
        os.close(lock_fd)
        store.close()
    return rc


def main(argv: list[str] | None = None) -> int:
    try:
        return run_worker(build_parser().parse_args(argv))
    except ValueError as e:  # a mistake in the flags: one line, as `lorafleet worker` prints it
        print(f"lorafleet worker: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from ..cpu_memory import tune_cpu_allocator

    tune_cpu_allocator()  # as `lorafleet` does: this is the process that trains
    raise SystemExit(main())
