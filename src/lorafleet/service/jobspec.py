"""From a REST job to the engine's configs (``lorafleet.config``; pydantic only, no torch).

The API calls ``job_configs`` when a job is created, so that every mistake the engine's config would reject
(a preference file for an SFT job, ``max_seq_len`` above the server's token budget...) is a 400 at once;
the worker calls it again to get the ``DatasetConfig``, ``AdapterConfig`` and ``TaskConfig`` it hands to
``Engine.add_task``. Names: the task is the job id (so checkpoints live in ``checkpoints/<job id>/``), the
adapter is the job's adapter id (``adapters/<adapter id>/``), datasets are ``<job id>.train`` and
``<job id>.eval``.

A job that continues from one of the tenant's models (``spec["init"]``) starts from a snapshot of that
adapter taken when the job was created, ``start_folder(output_dir, job id) / "init"`` (the adapter's
``init_from``), and a reference that names a model is its snapshot in ``.../reference``; ``api/starts.py``
writes both. The snapshots keep the job reproducible after the source model is deleted or its checkpoints
are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (
    AdapterConfig,
    BaseModelConfig,
    ConfigError,
    DatasetConfig,
    DispatcherConfig,
    RunConfig,
    TaskConfig,
    parse_config,
)
from .files import JOB_ID_PATTERN, safe_child
from .jobrequest import BASE_LEARNING_RATE, ENGINE_SEED

__all__ = ["REFERENCE_KEYWORDS", "EngineSettings", "JobConfigs", "job_configs", "model_name", "start_folder"]

REFERENCE_KEYWORDS = ("base", "init")  # a stored reference that is not one of these names a model snapshot


def start_folder(output_dir: Path, job_id: str) -> Path:
    """The folder of a job's start snapshots: ``init`` (its starting adapter) and ``reference``, both PEFT
    folders (``job_id`` is checked against the job id pattern: no other name becomes a path)."""
    return safe_child(Path(output_dir) / "starts", job_id, JOB_ID_PATTERN)


def model_name(base_model: str) -> str:
    """The name jobs report for a base model, and workers announce: its folder or file name."""
    return Path(base_model.removeprefix("pkg:")).name or base_model


@dataclass(frozen=True)
class EngineSettings:
    """The worker's engine settings; the API needs them too, to validate jobs against them."""

    base_model: str
    dtype: str = "float32"
    device: str = "cpu"
    max_concurrent_tasks: int = 8
    max_tokens_per_micro_batch: int = 4096

    def run_config(self, output_dir: Path) -> RunConfig:
        """The engine's RunConfig with no tasks yet (jobs arrive through ``Engine.add_task``).

        ``RunConfig`` requires at least one task when read from YAML; the service's run starts empty, so
        its sections are validated one by one and assembled without that check."""
        return RunConfig.model_construct(
            base_model=BaseModelConfig(path=self.base_model, dtype=self.dtype, device=self.device),
            output_dir=str(output_dir), seed=ENGINE_SEED, datasets=[], adapters=[], tasks=[],
            dispatcher=DispatcherConfig(
                max_concurrent_tasks=self.max_concurrent_tasks,
                max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            ),
        )  # fmt: skip

    def _one_task_run(
        self, output_dir: Path, dataset: dict, adapter: dict, task: dict, *extra: dict
    ) -> RunConfig:
        return parse_config(
            {
                "base_model": {"path": self.base_model, "dtype": self.dtype, "device": self.device},
                "output_dir": str(output_dir),
                "datasets": [dataset, *extra],
                "adapters": [adapter],
                "tasks": [task],
                "dispatcher": {
                    "max_concurrent_tasks": self.max_concurrent_tasks,
                    "max_tokens_per_micro_batch": self.max_tokens_per_micro_batch,
                },
            }
        )


@dataclass(frozen=True)
class JobConfigs:
    dataset: DatasetConfig
    adapter: AdapterConfig
    task: TaskConfig
    eval_dataset: DatasetConfig | None


# REST field -> where it goes in the engine's config (the error messages name the REST field)
_HP = "method.<type>.hyperparameters"
_TR = "lorafleet.training"
_FIELD_NAMES = {
    "tasks[0].batch_size": f"{_HP}.batch_size",
    "tasks[0].micro_batch_size": f"{_TR}.micro_batch_size",
    "tasks[0].num_epochs": f"{_HP}.n_epochs",
    "tasks[0].max_steps": f"{_TR}.max_steps",
    "tasks[0].max_seq_len": f"{_TR}.max_seq_len",
    "tasks[0].optimizer.lr": f"{_HP}.learning_rate_multiplier",
    "tasks[0].lr_scheduler": f"{_TR}.lr_scheduler",
    "tasks[0].save_every_steps": f"{_TR}.save_every_steps",
    "tasks[0].dataset": "training_file",
    "tasks[0].eval_dataset": "validation_file",
    "tasks[0].eval_every_steps": f"{_TR}.eval_every_steps",
    "tasks[0].early_stopping_patience": f"{_TR}.early_stopping_patience",
    "tasks[0].max_grad_norm": f"{_TR}.max_grad_norm",
    "tasks[0].type": "method.type",
    "tasks[0].beta": "method.<type>.hyperparameters.beta",
    "tasks[0].desirable_weight": "method.kto.hyperparameters.desirable_weight",
    "tasks[0].undesirable_weight": "method.kto.hyperparameters.undesirable_weight",
    "tasks[0].reference": "method.<type>.hyperparameters.reference",
    "tasks[0].loss_type": "lorafleet.preference.loss_type",
    "tasks[0].label_smoothing": "lorafleet.preference.label_smoothing",
    "tasks[0]": "the job's settings",
    "adapters[0]": "lorafleet.adapter",
    "dispatcher.max_tokens_per_micro_batch": "the server's --max-tokens-per-micro-batch",
}


def _rest_names(message: str) -> str:
    for internal, rest in _FIELD_NAMES.items():
        message = message.replace(internal, rest)
    return message


def job_configs(
    spec: dict[str, Any],
    job_id: str,
    adapter_id: str,
    files: dict[str, tuple[Path, str]],
    settings: EngineSettings,
    output_dir: Path,
) -> JobConfigs:
    """The engine configs of a job. ``spec`` is the stored request (``JobCreate.normalized()``); ``files`` maps
    each file id the job names to (path, data format). Raises ValueError naming the REST field and the fix."""
    kind = spec["method"]["type"]
    hp = spec["method"][kind]["hyperparameters"]
    ext = spec["lorafleet"]
    tr, ad, pref = ext["training"], ext["adapter"], ext.get("preference") or {}
    for key in ("eval_every_steps", "early_stopping_patience"):
        if tr.get(key) is not None and not spec.get("validation_file"):
            raise ValueError(
                f"lorafleet.training.{key} needs a validation_file to evaluate on: add one or remove {key}"
            )
    train_path, train_format = files[spec["training_file"]]
    dataset = {"name": f"{job_id}.train", "path": str(train_path), "format": train_format}
    extra = []
    task: dict[str, Any] = {
        "name": job_id,
        "adapter": adapter_id,
        "dataset": dataset["name"],
        "batch_size": hp["batch_size"],
        "micro_batch_size": tr.get("micro_batch_size"),
        "num_epochs": hp["n_epochs"],
        "max_steps": tr.get("max_steps"),
        "max_seq_len": tr["max_seq_len"],
        "optimizer": {
            "lr": hp["learning_rate_multiplier"] * BASE_LEARNING_RATE,
            "weight_decay": tr["weight_decay"],
        },
        "lr_scheduler": {"name": tr["lr_scheduler"], "warmup_steps": tr["warmup_steps"]},
        "save_every_steps": tr["save_every_steps"],
        "priority": ext.get("priority", 0),
        "seed": spec["seed"],
    }
    for key in ("max_grad_norm", "early_stopping_patience"):
        if tr.get(key) is not None:
            task[key] = tr[key]
    if kind == "dpo":
        task["type"] = pref.get("objective", "dpo")
        task["beta"] = hp["beta"]
        if task["type"] == "dpo":
            task.update({k: pref[k] for k in ("loss_type", "label_smoothing") if k in pref})
    if kind == "kto":
        task.update(type="kto", beta=hp["beta"])
        task.update({k: hp[k] for k in ("desirable_weight", "undesirable_weight")})
    if task.get("type") in ("dpo", "kto") and hp.get("reference") not in (None, "auto"):
        ref = hp["reference"]
        task["reference"] = (
            ref if ref in REFERENCE_KEYWORDS else str(start_folder(output_dir, job_id) / "reference")
        )
    if spec.get("validation_file"):
        eval_path, eval_format = files[spec["validation_file"]]
        extra.append({"name": f"{job_id}.eval", "path": str(eval_path), "format": eval_format})
        task["eval_dataset"] = f"{job_id}.eval"
        if tr.get("eval_every_steps"):
            task["eval_every_steps"] = tr["eval_every_steps"]
    adapter = {
        "name": adapter_id,
        "type": ad["type"],
        "rank": ad["rank"],
        "alpha": ad["alpha"],
        "dropout": ad["dropout"],
        "use_rslora": ad["use_rslora"],
        "target_modules": ad["target_modules"],
    }
    if spec.get("init"):
        adapter["init_from"] = str(start_folder(output_dir, job_id) / "init")
    try:
        cfg = settings._one_task_run(output_dir, dataset, adapter, task, *extra)
    except ConfigError as e:
        message = _rest_names(" ".join(e.problems)).replace(f"{job_id}.train", spec["training_file"])
        raise ValueError(message.replace(f"{job_id}.eval", str(spec.get("validation_file")))) from None
    evals = [d for d in cfg.datasets if d.name == f"{job_id}.eval"]
    return JobConfigs(cfg.datasets[0], cfg.adapters[0], cfg.tasks[0], evals[0] if evals else None)
