"""Request and response bodies of the REST API (pydantic; they make the OpenAPI schema).

Requests forbid unknown fields, so a typo such as ``"learning_rte"`` is a 422 that names the field instead
of a silently ignored setting. The shapes follow the fine-tuning APIs users already know: ``file``,
``fine_tuning.job``, ``fine_tuning.job.event``, ``fine_tuning.job.checkpoint`` and ``list`` objects.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .files import ADAPTER_ID_PATTERN, FILE_ID_PATTERN, JOB_ID_PATTERN, SUFFIX_PATTERN
from .store import JOB_STATUSES

__all__ = [
    "AdapterObject",
    "AdapterSettings",
    "CheckpointObject",
    "DeletedObject",
    "ErrorBody",
    "ErrorResponse",
    "EventObject",
    "FileObject",
    "Health",
    "Hyperparameters",
    "JobCreate",
    "JobError",
    "JobObject",
    "ListResponse",
    "Method",
]

T = TypeVar("T")

TargetModule = Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AdapterSettings(_Request):
    """The adapter to train (LoRA or DoRA) on the served base model."""

    type: Literal["lora", "dora"] = Field("lora", description="lora, or dora (weight-decomposed LoRA)")
    rank: int = Field(8, ge=1, le=256, description="rank r of the low-rank update")
    alpha: float = Field(16.0, gt=0, le=4096, description="scale numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[TargetModule] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        min_length=1,
        max_length=7,
        description="linear layers of every decoder block that get an adapter",
    )
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r)")

    @model_validator(mode="after")
    def _unique_modules(self) -> AdapterSettings:
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules lists a module twice; name each module once")
        return self


class Hyperparameters(_Request):
    """Training settings of one job."""

    batch_size: int = Field(8, ge=1, le=1024, description="examples per optimizer step")
    micro_batch_size: int | None = Field(
        None, ge=1, le=1024, description="examples per fused forward/backward (default: batch_size)"
    )
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)
    n_epochs: int = Field(3, ge=1, le=100, description="passes over the training file")
    max_steps: int | None = Field(None, ge=1, le=1_000_000, description="stop after this many steps")
    warmup_steps: int = Field(0, ge=0, le=100_000)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    max_seq_len: int = Field(512, ge=8, le=32768, description="longer examples are truncated")
    save_every_steps: int = Field(50, ge=1, le=1_000_000, description="checkpoint period, in steps")
    max_grad_norm: float | None = Field(None, gt=0.0, le=1e6, description="clip the adapter's gradient norm")
    eval_every_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="validation loss every this many steps (needs validation_file)"
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, le=1000, description="stop after this many evaluations without a better validation loss"
    )

    @model_validator(mode="after")
    def _micro_divides(self) -> Hyperparameters:
        mbs = self.micro_batch_size
        if mbs is not None and mbs > self.batch_size:
            raise ValueError(
                f"micro_batch_size ({mbs}) is larger than batch_size ({self.batch_size}); "
                "use micro_batch_size <= batch_size"
            )
        return self


class Method(_Request):
    """The training objective."""

    type: Literal["sft", "dpo", "orpo"] = Field(
        "sft", description="sft: next-token loss; dpo / orpo: preference optimisation (preference files)"
    )
    beta: float = Field(0.1, gt=0.0, le=100.0, description="dpo: KL strength; orpo: odds-ratio weight")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo only")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo with sigmoid loss only")


class JobCreate(_Request):
    """``POST /v1/fine_tuning/jobs``."""

    training_file: str = Field(pattern=FILE_ID_PATTERN, description="id of an uploaded JSONL file")
    validation_file: str | None = Field(None, pattern=FILE_ID_PATTERN)
    model: str | None = Field(None, max_length=512, description="if given, must name the served base model")
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: Method = Field(default_factory=Method)
    suffix: str | None = Field(
        None, pattern=SUFFIX_PATTERN, description="added to the adapter id (lower-case letters, digits, '-')"
    )
    priority: int = Field(0, ge=-100, le=100, description="higher runs first when the engine is full")


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    num_rows: int
    format: str


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: bool


class JobError(BaseModel):
    message: str


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    started_at: int | None
    finished_at: int | None
    status: Literal[JOB_STATUSES]  # type: ignore[valid-type]
    training_file: str
    validation_file: str | None
    adapter: AdapterSettings
    hyperparameters: Hyperparameters
    method: Method
    suffix: str | None
    priority: int
    fine_tuned_adapter: str | None = Field(description="adapter id, once the job has succeeded")
    step: int
    total_steps: int | None
    trained_tokens: int
    error: JobError | None


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: float
    level: str
    type: Literal["metrics", "message"]
    message: str
    data: dict[str, Any]


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any]


class AdapterObject(BaseModel):
    id: str = Field(pattern=ADAPTER_ID_PATTERN)
    object: Literal["adapter"] = "adapter"
    created_at: int
    fine_tuning_job_id: str = Field(pattern=JOB_ID_PATTERN)
    base_model: str
    type: str
    rank: int


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    errors: list[str] | None = Field(None, description="one entry per problem (upload lines, fields)")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    worker: dict[str, Any]
    workers: list[dict[str, Any]] = Field(
        default_factory=list, description="every worker, newest heartbeat first"
    )
