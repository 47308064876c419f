"""``PipelineTrainer``: the pipeline as an online ``Trainer`` (``train/trainer.py``), run under torchrun.

    trainer = PipelineTrainer(cfg)                 # every rank: loads its stage's layers, joins the links
    if trainer.is_coordinator:                     # stage 0 (of each replica)
        trainer.subscribe(on_event)
        trainer.add_task(dataset, adapter, task)   # any time, also while others train
        while trainer.run_once(): ...
        trainer.close()                            # stops the other stages
    else:
        trainer.follow()                           # returns when the coordinator closes

Stage 0 coordinates: it runs the dispatcher, and every task added or cancelled there is announced to the
other stages in a ``Control`` on the forward link (so before any later micro-batch): each stage builds (or
drops) its slice of the adapter and optimizer; the last stage answers with the step every stage resumes
from (the newest one all of them checkpointed). What the other stages see (losses, checkpoints written,
failures, finished adapters' slices) travels back to stage 0 with the gradients, so the events come out
of one place, in order, as from the engine: the step when stage 0 steps, the checkpoint when every stage
wrote it, ``succeeded`` when the adapter is written. ``run_once`` is one scheduling step: a backward, a new
micro-batch (at most ``pipeline.max_in_flight`` in flight), or, with nothing left to run, one round trip
that lets every stage finish what the last announcements asked for; False when all is settled.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import AdapterConfig, DatasetConfig, RunConfig, TaskConfig
from ..devices import resolve_device
from ..metrics import MetricsWriter
from ..models import Decoder, base_dtype, load_model, read_model_config
from ..train.events import Event, StatusEvent
from ..train.task import TaskState
from ..train.trainer import deliver, require_new_task_name
from .messages import Added, AddTask
from .stage import Stage
from .stage_tasks import live
from .topology import Topology
from .trace import chrome_trace

__all__ = ["PipelineTrainer"]


class PipelineTrainer:
    """One rank of a pipeline; a ``Trainer`` on the coordinator (see the module docstring).

    ``tensorboard``: mirror the metrics into TensorBoard (the coordinator writes ``metrics.jsonl``).
    ``trace``: ``close`` collects every stage's spans (the newest 50,000 of each) and writes
    ``OUTPUT_DIR/trace.json`` (see ``parallel/trace.py``). ``timeout_s`` bounds any single wait on a live peer.
    """

    def __init__(
        self, cfg: RunConfig, progress: bool = False, tensorboard: bool = True, timeout_s: float = 1800.0,
        trace: bool = False,
    ) -> None:  # fmt: skip
        from ..models.tokenizer import load_tokenizer

        self.cfg = cfg
        device = resolve_device(cfg.base_model.device)
        model_cfg = read_model_config(cfg.base_model.path)
        self.topology = topo = Topology.from_env(model_cfg, cfg.pipeline, device=device.type)
        if device.type == "cuda":
            torch.cuda.set_device(topo.local_rank)
        links = topo.connect(timeout_s)
        if topo.rank == 0:
            print(topo.describe(model_cfg), flush=True)
        dtype = base_dtype(cfg.base_model.dtype)
        first, last = topo.layers
        model = load_model(cfg.base_model.path, dtype, topo.torch_device, first, last)
        if (
            cfg.base_model.quantize is not None
        ):  # as the engine does: the stage's projections, before adapters
            from ..models.quant import quantize_model

            quantize_model(model, cfg.base_model.quantize)
        model.train()  # as the engine: adapter dropout is active in training mode only
        if cfg.recompute:  # per-layer activation checkpointing; parameter names (PEFT keys) unchanged
            from ..models.recompute import apply_recompute

            apply_recompute(model)
        self.base_params = sum(p.numel() for p in model.parameters())
        self._model_cfg, self._dtype = model_cfg, dtype
        self.output_dir = Path(cfg.output_dir)
        self.metrics = MetricsWriter(self.output_dir, tensorboard=tensorboard) if topo.is_first else None
        self._subscribers: list[Callable[[Event], None]] = []
        self._arrivals = 0
        self._dirty = False  # something ran since the last round trip
        self._write_trace = trace
        self.stage = Stage(cfg, topo, links, model, load_tokenizer(cfg.base_model.path), progress, self._emit)

    # -- where this rank sits -------------------------------------------------------------------------------

    @property
    def is_coordinator(self) -> bool:
        return self.topology.is_first

    def memory_line(self) -> str:
        """This stage's resident parameters against the whole model's (counted on the meta device)."""
        topo, dtype, base = self.topology, self._dtype, self.base_params
        whole = sum(p.numel() for p in Decoder(self._model_cfg, dtype=dtype, device="meta").parameters())
        adapters = sum(p.numel() for p in self.stage.model.parameters()) - base
        a, b = topo.layers
        nbytes = base * torch.finfo(dtype).bits // 8
        return (
            f"stage {topo.stage} (rank {topo.rank}): layers [{a}, {b}) hold {base:,} base parameters "
            f"({nbytes / 2**20:.1f} MiB) = {100 * base / whole:.1f}% of the model's {whole:,} "
            f"(1/{topo.num_stages} = {100 / topo.num_stages:.1f}%), plus {adapters:,} adapter parameters"
        )

    def follow(self) -> None:
        """Every stage but the coordinator: run what arrives until the coordinator closes the pipeline."""
        if self.is_coordinator:
            raise RuntimeError("follow() runs on the stages after the first; stage 0 drives run_once()")
        self.stage.follow()

    # -- the Trainer protocol (coordinator) -----------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def _emit(self, event: Event) -> None:
        deliver(event, self.metrics, self._subscribers)

    def _coordinator(self, what: str) -> None:
        if not self.is_coordinator:
            raise RuntimeError(
                f"{what}() is the coordinator's (stage 0); this is stage {self.topology.stage}"
            )

    def add_task(
        self,
        dataset: DatasetConfig,
        adapter: AdapterConfig,
        task: TaskConfig,
        eval_dataset: DatasetConfig | None = None,
    ) -> None:
        """Add a task on every stage (also while others train), resumed from the newest step that every
        stage checkpointed. A task that cannot start raises (``ValueError`` when a stage refused it) and is
        left nowhere."""
        self._coordinator("add_task")
        stage = self.stage
        require_new_task_name(task.name, stage.tasks, stage.adding)
        core = stage.build_task(dataset, adapter, task, eval_dataset, self._arrivals)
        common = stage.intact_steps(core)
        stage.adding[task.name] = core
        if self.topology.is_last:  # a pipeline of one stage (replicas only)
            stage.finish_add(task.name, stage.resume_added(core, Added(max(common, default=0))))
        else:
            stage.control.add.append(AddTask(dataset, adapter, task, eval_dataset, self._arrivals, common))
            stage.sync()
        answer = stage.added.pop(task.name)
        if answer.error is not None:
            raise ValueError(f"task {task.name!r} could not start: {answer.error}")
        self._arrivals += 1
        st = stage.tasks[task.name].core.state
        self.metrics.truncate(task.name, st.step)  # the steps it redoes are logged again
        if st.status == "queued":
            self._emit(StatusEvent(task.name, "queued"))

    def cancel_task(self, name: str) -> None:
        self._coordinator("cancel_task")
        self.stage.cancel(name)

    def forget(self, name: str) -> TaskState:
        """Drop a finished task here and on every stage; returns its state."""
        self._coordinator("forget")
        stage = self.stage
        t = stage.tasks[name]
        if live(t) or t.core.state.status in ("queued", "running"):
            raise ValueError(
                f"task {name!r} is {t.core.state.status}; cancel it or let it finish before forgetting it"
            )
        while t.inflight or t.awaiting_eval:  # micro-batches of a cancelled task still on their way back
            if not stage.work_once():
                stage.drain(block=True)
        del stage.tasks[name]
        stage.waited.pop(name, None)
        if t.core.params:
            t.core.release(stage.model)
        if not self.topology.is_last:
            stage.control.forget.append(name)
        return t.core.state

    def state(self, name: str) -> TaskState:
        return self.stage.tasks[name].core.state

    @property
    def states(self) -> dict[str, TaskState]:
        return {n: t.core.state for n, t in self.stage.tasks.items()}

    def run_once(self) -> bool:
        """One scheduling step (see the module docstring); False when no task has work and all is settled."""
        self._coordinator("run_once")
        stage, limit = self.stage, self.cfg.pipeline.max_in_flight
        while True:
            if stage.work_once() or (len(stage.inflight) < limit and stage.dispatch()):
                self._dirty = True
                if self.metrics is not None:
                    self.metrics.start_background()  # TensorBoard imports while the stages compute
                return True
            if stage.inflight or stage.evaluating():
                stage.drain(block=True)
            elif self._dirty or stage.control:
                self._dirty = False
                stage.sync()
            else:
                return False

    def inference_model(self) -> None:
        """None: a stage holds only its layers, so a pipeline serves no inference."""
        return None

    def close(self) -> None:
        """Coordinator: stop the other stages (they return from ``follow``) and close the metrics."""
        if not self.is_coordinator or self.stage.stopped:
            return
        spans = self.stage.stop(spans=self._write_trace)
        self.metrics.close()
        if self._write_trace:
            events = [{**e, "replica": self.topology.replica} for e in spans]
            (self.output_dir / "trace.json").write_text(json.dumps(chrome_trace(events, self.topology)))
