"""The worker: the process that trains. It claims jobs for its base model from the store, feeds them to one
``Trainer`` (``train/trainer.py``: the single-process ``Engine``, or with ``--nproc P`` a pipeline of P
stages whose stage 0 is this worker, ``parallel.PipelineTrainer``) and writes back what happens. A fleet
runs many workers on many machines over one store and one shared data folder.

    lorafleet worker --store postgresql://lf@db/lorafleet --data-dir /shared --base-model path/to/model
    lorafleet worker ... --nproc 2          # the same worker as 2 pipeline stages (torchrun; no inference)
    (``lorafleet serve`` without ``--api-only`` starts one for you, next to the API, and restarts it.)

Loop, top to bottom:

1. every ``poll_interval`` seconds (and whenever the engine is idle) read the store:
   - jobs of its base model in ``validating_files``: check their files and settings; ``queued``, or
     ``failed`` with why;
   - claim queued or running jobs of its base model whose lease is free or expired, up to its capacity
     (``--max-concurrent-tasks``), and ``Engine.add_task`` them (online arrival: the others keep training).
     The engine resumes a task from ``checkpoints/<job id>/`` when it holds checkpoints, so the jobs of a
     worker that crashed, was SIGKILLed or lost its lease go on from their last checkpoint, on whichever
     worker claims them (checkpoints that the store never recorded are removed first: a worker that lost
     its lease may have written them);
   - no job is claimed while the data folder cannot be written (``DataDir.check_writable``): they wait,
     ``queued``, and the worker's announcement says why;
   - jobs the engine holds that the store says are ``cancelled``: ``Engine.cancel_task``;
   - jobs the engine holds that the store says are ``paused``: they leave the engine (``cancel_task``, the
     store keeps ``paused``) right after their next checkpoint, or at once when nothing was trained since
     their last one, and their lease is released (a paused job keeps its lease until then, so its last
     checkpoint is written under it); ``resume`` puts them back to ``queued`` and any worker claims them;
2. one decode step for every inference request in flight (``inference.py``: chat and completions, all
   tenants in one continuous batch, each row its own adapter), then ``Engine.run_once()``: one fused
   micro-batch over all running jobs (plus due optimizer steps). So a decode step waits for at most one
   training micro-batch, and training goes on while requests are served. Inference goes over the data
   folder's Unix socket (``DataDir.inference_socket``): of the workers sharing one data folder, the one
   holding the socket's lock serves it, and another takes over when it stops (``--no-inference``: never);
3. the engine's events (steps, status changes, checkpoints; ``worker_events.py``) go to the store as they happen, each before the
   engine goes on: a step's metrics are stored before that step's checkpoint is written, so a worker killed
   at any moment loses no step that its checkpoints hold (a resumed job trains the steps after its last
   checkpoint again, and their metrics events replace the earlier ones).

Storage faults: a job whose checkpoint (or final adapter) cannot be written is held by the engine and the
write is retried with backoff (``train/storage.py``; a ``warning`` event tells the tenant each time) while
the others train on; it goes on from its in-memory state once a write succeeds, and fails only when the
tries run out. Errors shown to tenants never contain a server path (``_public``); the log has them whole.

Leases (``store.base``): every job a worker trains is leased to it; the heartbeat thread renews the leases
(and announces the worker: host, base model, capacity, jobs) every ``lease_s / 4`` seconds. Every write for
a job carries its lease, and the store refuses a write whose fencing token is stale (``LeaseLost``): the
worker then drops the job. A worker that cannot renew a lease for half of ``lease_s`` (the store is down,
the process was paused) stops training that job before the lease can expire in the store, so a job never
trains on two workers at once. A worker stopped with SIGTERM releases its leases; one that died loses
them after ``lease_s``. One process per worker id: it holds an exclusive ``flock`` on
``DATA_DIR/workers/<id>.lock`` (released by the kernel when the process dies), so a worker restarted under
the same id (``lorafleet serve`` does this) takes its jobs back at once instead of waiting for their leases
to expire. On Linux the worker asks the kernel to kill it when the ``lorafleet serve`` process that
started it dies, and it also exits when its parent changes.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..train.events import Event, StorageFaultEvent, TrainerFailed
from .files import DataDir, StorageUnavailable
from .jobspec import EngineSettings, job_configs, model_name
from .leases import HeldLeases
from .store import (
    ACTIVE_STATUSES,
    EventRecord,
    Lease,
    LeaseLost,
    Store,
    StoreUnavailable,
    WorkerRecord,
)
from .worker_args import LEASE_S
from .worker_events import JobRecorder

if TYPE_CHECKING:
    from ..train.trainer import Trainer

__all__ = ["Worker", "open_trainer"]

log = logging.getLogger("lorafleet.worker")

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGE_DIR = re.compile(r"^stage-\d+-of-\d+$")


def open_trainer(cfg) -> Trainer:
    """The worker's ``Trainer``: the single-process engine, or under torchrun (WORLD_SIZE > 1, ``--nproc``)
    this rank's pipeline coordinator (stage 0; the other ranks run ``follow_pipeline``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..parallel import PipelineTrainer

        return PipelineTrainer(cfg, tensorboard=False, trace=True)  # trace.json when the worker stops
    from ..train.engine import Engine

    return Engine(cfg, tensorboard=False)


class Worker(JobRecorder):
    """Claims and runs jobs from ``store`` on one engine (see the module docstring)."""

    def __init__(
        self, store: Store, data_dir: DataDir, settings: EngineSettings, poll_interval: float = 0.5,
        worker_id: str | None = None, lease_s: float = LEASE_S, serve_inference: bool = True,
        adapter_cache_bytes: int = 1 << 30, max_inference_rows: int = 64,
    ) -> None:  # fmt: skip
        self.store = store
        self.serve_inference = serve_inference
        self.adapter_cache_bytes = adapter_cache_bytes
        self.max_inference_rows = max_inference_rows
        self.inference: Any = None  # the InferenceServer, once the engine holds the model
        self._wake = threading.Event()  # set when an inference request arrives
        self.dd = data_dir
        self.settings = settings
        self.poll_interval = poll_interval
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model = model_name(settings.base_model)
        self.lease_s = lease_s
        self.engine: Trainer | None = None  # the ``Trainer``: one process, or a pipeline's coordinator
        self.leases = HeldLeases(lease_s)  # the jobs this worker trains, each under its lease
        self._last_metrics: dict[str, EventRecord] = {}  # each job's latest step event, which its eval joins
        self._saved_step: dict[str, int] = {}  # each held job's step of its newest checkpoint
        self._pausing: set[str] = set()  # held jobs the store paused: they leave at their next checkpoint
        self.state = "starting"
        self.message = ""

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Train until ``stop`` is set."""
        self._load_engine()
        if self.serve_inference:
            self._start_inference()
        next_sync = 0.0
        try:
            while not stop.is_set():
                serving = self.inference is not None and self.inference.busy
                if time.monotonic() >= next_sync or not (len(self.leases) or serving):
                    try:
                        self.sync()
                    except StoreUnavailable as e:  # keep training what is leased; read again next round
                        log.warning("store unavailable: %s", e)
                    next_sync = time.monotonic() + self.poll_interval
                    if self.inference is not None and not self.inference.listening and self.inference.start():
                        log.info("the worker that served chat/completions stopped: this one serves them now")
                self._drop_lost()
                served = self.inference.step() if serving else False  # one decode step for all requests
                busy = self._step() if len(self.leases) else False  # then at most one training micro-batch
                self._leave_paused()
                if not (busy or served or (self.inference is not None and self.inference.busy)):
                    self._wake.wait(self.poll_interval)
                    self._wake.clear()
        finally:
            if self.inference is not None:
                self.inference.close()
            try:
                self.engine.close()
            except TrainerFailed as e:  # the other stages are already gone
                log.warning("could not stop the pipeline's other stages: %s", e)

    def _start_inference(self) -> None:
        from .inference import InferenceServer

        held = self.engine.inference_model()
        if held is None:  # a pipeline: no process holds every layer
            log.warning("this worker runs a pipeline of stages: it serves no chat/completions")
            return
        model, tokenizer = held
        self.inference = InferenceServer(
            model, tokenizer, self.dd.inference_socket, self.adapter_cache_bytes, self.max_inference_rows,
            wake=self._wake,
        )  # fmt: skip
        if self.inference.start():
            log.info("serving chat/completions on %s", self.dd.inference_socket)
        else:
            log.info(
                "another worker serves chat/completions for this data folder (%s): this one trains, and "
                "takes them over if that one stops", self.dd.inference_socket,
            )  # fmt: skip

    def _load_engine(self) -> None:
        self.state = "loading"
        self.engine = open_trainer(self.settings.run_config(self.dd.engine))
        self.engine.subscribe(self._on_event)
        self.state = "ready"
        log.info(
            "trainer ready: %s on %s (worker %s)", self.settings.base_model, self.settings.device, self.id
        )

    def _step(self) -> bool:
        try:
            return self.engine.run_once()
        except TrainerFailed:  # the trainer is gone (a pipeline stage died): its jobs resume elsewhere
            raise
        except Exception as e:  # a fault of the engine, not of one job: fail the jobs it was training
            log.exception("engine failed")
            msg = f"the training engine failed: {type(e).__name__}: {e}"
            for job_id in sorted(self.leases.jobs()):
                st = self.engine.state(job_id)
                if st.status == "running":
                    self._fail(job_id, msg)
                    self.leases.let_go(job_id)
                    try:
                        self.engine.cancel_task(job_id)
                    except Exception:
                        log.exception("could not drop %s from the engine", job_id)
            return False

    # -- leases -----------------------------------------------------------------------------------------

    def renew(self) -> None:
        """Renew every held lease; the ones the store refuses are lost (the heartbeat thread calls this)."""
        self.leases.renew(self.store)

    def _drop_lost(self) -> None:
        """Stop training the jobs whose lease was lost or could not be renewed in time."""
        for job_id in sorted(self.leases.take_lost()):
            if self.leases.let_go(job_id) is None:
                continue
            log.warning("lost the lease on %s; another worker will resume it", job_id)
            st = self.engine.states.get(job_id) if self.engine is not None else None
            if st is not None and st.status in ("queued", "running"):
                self.engine.cancel_task(job_id)

    def release_all(self) -> None:
        """Give every lease back (a clean stop): other workers resume those jobs at once."""
        for job_id in sorted(self.leases.jobs()):
            lease = self.leases.let_go(job_id)
            if lease is not None:
                try:
                    self.store.release_lease(lease)
                except StoreUnavailable:
                    pass  # it expires by itself

    def announcement(self) -> WorkerRecord:
        s = self.settings
        return WorkerRecord(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), base_model=self.model, state=self.state,
            max_concurrent_tasks=s.max_concurrent_tasks, max_tokens_per_micro_batch=s.max_tokens_per_micro_batch,
            active_jobs=len(self.leases), message=self.message,
        )  # fmt: skip

    def _write(self, job_id: str, write: Callable[[Lease | None], Any]) -> bool:
        """Run a store write for ``job_id`` under its lease. While the store is unreachable, retry until the
        lease can no longer be trusted; False when the write did not land (the job is then dropped)."""
        while True:
            try:
                write(self.leases.get(job_id))
                return True
            except LeaseLost:
                self.leases.mark_lost(job_id)
                return False
            except StoreUnavailable as e:
                if time.monotonic() > self.leases.trusted_until(job_id):
                    log.warning("could not write for %s before its lease ran out: %s", job_id, e)
                    self.leases.mark_lost(job_id)
                    return False
                time.sleep(0.2)

    # -- reading the store ------------------------------------------------------------------------------

    def sync(self) -> None:
        """Validate new jobs, claim queued ones up to capacity, cancel the ones the store cancelled."""
        for job in self.store.jobs_with_status(["validating_files"], model=self.model):
            self._validate(job)
        for job_id in sorted(self.leases.jobs()):
            job = self.store.get_job_any(job_id)
            if job is None or job.status not in ACTIVE_STATUSES:
                self.leases.let_go(job_id)
                self.engine.cancel_task(job_id)
            elif job.status == "paused" and job_id not in self._pausing:
                self._pausing.add(job_id)
                if self.engine.state(job_id).step == self._saved_step.get(job_id, 0):
                    self._leave_paused(now=job_id)
            elif job_id in self._pausing:  # resumed before it left: it trains on here
                self._pausing.discard(job_id)
                if job.status == "queued" and self.engine.state(job_id).status == "running":
                    self._write(
                        job_id, lambda lease, j=job_id: self.store.transition(j, "running", ["queued"], lease)
                    )
        free = self.settings.max_concurrent_tasks - len(self.leases)
        if free > 0 and self._storage_ok():
            since = time.monotonic()
            claimed = self.store.claim_jobs(self.id, self.model, free, self.lease_s)
            # every claimed lease is held (and so renewed) before any job is admitted: admitting one job
            # (reading and tokenizing its data) can take longer than half a lease
            for _, lease in claimed:
                self.leases.hold(lease, since)
            for job, _ in claimed:
                self._admit(job)
        # finished jobs live on in the store; the engine lets go of their data so it does not grow
        held = self.leases.jobs()
        for name, st in list(self.engine.states.items()):
            if name not in held and st.status not in ("queued", "running"):
                self.engine.forget(name)
                self._last_metrics.pop(name, None)
                self._saved_step.pop(name, None)

    def _storage_ok(self) -> bool:
        """Whether jobs can be started: their folders can be written. Says so in the log and the worker's
        announcement when that changes."""
        try:
            self.dd.check_writable()
        except StorageUnavailable as e:
            if not self.message.startswith("storage"):
                log.warning("not claiming jobs: the data folder cannot be written: %s", e.cause)
            self.message = f"storage unavailable ({e.cause.strerror or type(e.cause).__name__}); jobs wait"
            return False
        if self.message.startswith("storage"):
            log.info("the data folder can be written again; claiming jobs")
            self.message = ""
        return True

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, StorageFaultEvent):
            log.warning("job %s: storage fault at step %d (try %d)", ev.task, ev.step, ev.failures)
            if self.leases.get(ev.task) is not None:
                self._event(
                    ev.task, f"Checkpoint at step {ev.step} could not be written ({ev.reason}); training of "
                    f"this job waits and tries again in {ev.retry_in_s:.0f} s", level="warning",
                )  # fmt: skip
            return
        super()._on_event(ev)

    def _fail(self, job_id: str, message: str) -> None:
        super()._fail(job_id, _public(message, self.dd))

    def _configs(self, job):
        files = {}
        for key in ("training_file", "validation_file"):
            fid = job.spec.get(key)
            if fid:
                rec = self.store.get_file(job.tenant, fid)
                path = self.dd.file_path(fid)
                if rec is None or not path.is_file():
                    raise ValueError(f"{key} {fid} was deleted; upload it again and create a new job")
                files[fid] = (path, rec.format)
        return job_configs(job.spec, job.id, job.adapter_id, files, self.settings, self.dd.engine), files

    def _validate(self, job) -> None:
        from ..data.sources import read_rows

        try:
            cfgs, files = self._configs(job)
            for ds in (cfgs.dataset, cfgs.eval_dataset):
                if ds is not None:
                    read_rows(ds.path)
        except ValueError as e:
            self._fail(job.id, _public(str(e), self.dd))
            return
        if self.store.transition(job.id, "queued", ["validating_files"]):
            self._event(job.id, "Files validated; job queued")

    def _discard_unrecorded_checkpoints(self, job_id: str) -> None:
        """Remove checkpoints newer than the newest one the store recorded: a worker that lost its lease, or
        died between writing a checkpoint and recording it, left them, and their steps' metrics may be
        missing from the store. The job trains those steps again (their metrics events replace the old)."""
        root = self.dd.checkpoint_dir(job_id)
        if not root.is_dir():
            return
        recorded, _ = self.store.list_checkpoints(job_id, None, 1)
        newest = recorded[0].step if recorded else 0
        # a pipeline worker keeps one folder per stage (stage-S-of-P/step-N), each trimmed alike
        folders = [root, *(p for p in root.iterdir() if _STAGE_DIR.match(p.name) and p.is_dir())]
        for folder in folders:
            for p in folder.iterdir():
                m = _STEP_DIR.match(p.name)
                if m and int(m.group(1)) > newest:
                    log.warning("removing %s: the store never recorded it", p)
                    shutil.rmtree(p, ignore_errors=True)

    def _admit(self, job) -> None:
        if job.id in self.engine.states:  # trained here before, then dropped: start it afresh
            self.engine.forget(job.id)
        try:
            self._discard_unrecorded_checkpoints(job.id)
            cfgs, _ = self._configs(job)
            self.engine.add_task(cfgs.dataset, cfgs.adapter, cfgs.task, cfgs.eval_dataset)
        except ValueError as e:  # bad data or settings: the job's fault
            self._fail(job.id, _public(str(e), self.dd))
            self.leases.let_go(job.id)
            return
        except Exception as e:
            log.exception("could not start %s", job.id)
            self._fail(job.id, f"could not start the job: {type(e).__name__}: {_public(str(e), self.dd)}")
            self.leases.let_go(job.id)
            return
        st = self.engine.state(job.id)
        if st.status not in ("queued", "running"):
            self.leases.let_go(job.id)
        self._saved_step[job.id] = st.step  # a resumed job starts at its checkpoint
        self._write(
            job.id,
            lambda lease: self.store.update_progress(job.id, st.step, st.total_steps, st.tokens, lease),
        )
        self._event(job.id, f"Claimed by worker {self.id}")
        if st.step > 0:
            self._event(job.id, f"Resumed from the checkpoint at step {st.step} of {st.total_steps}")

    def _leave_paused(self, now: str | None = None) -> None:
        """Take paused jobs off the engine once their newest checkpoint holds all they trained (``now``:
        that job at once), and release their leases."""
        for job_id in sorted(self._pausing):
            if self.leases.get(job_id) is None:
                self._pausing.discard(job_id)
                continue
            step = self.engine.state(job_id).step
            if job_id == now or self._saved_step.get(job_id, 0) == step:
                self._event(job_id, f"Paused at step {step}; resume continues from there")
                lease = self.leases.get(job_id)
                self.engine.cancel_task(job_id)  # its "cancelled" event lets go of the lease here
                self.leases.let_go(job_id)
                self._pausing.discard(job_id)
                try:
                    self.store.release_lease(lease)
                except StoreUnavailable:
                    pass  # it expires by itself; nobody claims a paused job meanwhile


def _public(message: str, dd: DataDir) -> str:
    """A message without the server's paths: an uploaded file's path becomes its file id, a path inside the
    data folder is kept relative to it, and any other absolute path is cut to its last part."""
    for folder in (dd.files, dd.engine, dd.root):
        message = message.replace(f"{folder.resolve()}/", "").replace(f"{folder}/", "")
    message = re.sub(r"\b(file-[0-9a-f]{24})\.jsonl\b", r"\1", message)
    return _ABSOLUTE_PATH.sub(lambda m: m.group(2), message)


# an absolute path (not a URL's): /a/b/name, with its last part as group 2
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])(/(?:[^\s'\"/:]+/)+)([^\s'\"/:]*)")


if (
    __name__ == "__main__"
):  # python -m lorafleet.service.worker [--nproc P] ... (the flags of lorafleet worker)
    from .worker_process import main

    raise SystemExit(main())
