"""Response bodies of the REST API (pydantic; they make the OpenAPI schema), in OpenAI's shapes: ``file``,
``fine_tuning.job``, ``fine_tuning.job.event``, ``fine_tuning.job.checkpoint``, ``model`` and ``list``
objects, with the field names of the official ``openai`` SDK's types. The job request is in
``jobrequest.py``.
"""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from .files import ADAPTER_ID_PATTERN, JOB_ID_PATTERN
from .jobrequest import LorafleetSettings
from .store import JOB_STATUSES

__all__ = [
    "AdapterObject",
    "CheckpointObject",
    "DeletedObject",
    "ErrorBody",
    "ErrorResponse",
    "EventObject",
    "FileObject",
    "Health",
    "JobError",
    "JobHyperparameters",
    "JobMethod",
    "JobObject",
    "JobProgress",
    "ListResponse",
    "ModelObject",
]

T = TypeVar("T")


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
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(BaseModel):
    batch_size: int
    learning_rate_multiplier: float
    n_epochs: int
    beta: float | None = None


class JobMethod(BaseModel):
    type: Literal["supervised", "dpo", "kto"]
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None
    kto: dict[str, Any] | None = None


class JobProgress(LorafleetSettings):
    """The job's ``lorafleet`` field: the extension settings it was created with, and its progress."""

    model_config = ConfigDict(extra="ignore")

    adapter_id: str
    step: int
    total_steps: int | None


class JobObject(BaseModel):
    """A ``fine_tuning.job`` with OpenAI's fields; ``organization_id`` is the tenant."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None
    status: Literal[JOB_STATUSES]  # type: ignore[valid-type]
    training_file: str
    validation_file: str | None
    hyperparameters: JobHyperparameters
    method: JobMethod
    fine_tuned_model: str | None = Field(description="the model id to run inference with, once succeeded")
    organization_id: str
    result_files: list[str]
    seed: int
    estimated_finish: int | None
    trained_tokens: int | None
    error: JobError | None
    metadata: dict[str, str]
    integrations: list[dict[str, Any]]
    user_provided_suffix: str | None
    lorafleet: JobProgress
    started_at: int | None


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
    fine_tuned_model_checkpoint: str = Field(description="a model id usable for inference")
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


class ModelObject(BaseModel):
    """A model usable for inference: the base, a fine-tuned model or a checkpoint (``owned_by`` the tenant)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="the base model a fine-tuned model was trained on")


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
