"""The run configuration's schema: typed sections (pydantic), their validators and ``steps_for``.

Every field has a description (``lorafleet.config`` documents loading and errors). Validators raise
``Problems`` with field paths; ``loading.parse_config`` turns them into ``ConfigError`` paragraphs.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator
from pydantic import model_validator as _model_validator

from .errors import Loc, Problems
from .fields import Float, Int, Name, Section
from .links import link_problems
from .sweep import SweepConfig, SweepPoint, expand_sweeps, sweep_problems
from .task_types import TASK_FORMATS, TaskType, type_problems

__all__ = [
    "DATASET_FORMATS",
    "TARGET_MODULES",
    "TASK_FORMATS",
    "AdapterConfig",
    "BaseModelConfig",
    "DatasetConfig",
    "DispatcherConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "RunConfig",
    "SchedulerConfig",
    "SweepConfig",
    "SweepPoint",
    "TaskConfig",
    "TaskType",
    "steps_for",
]

# Keep equal to lorafleet.lora.adapters.TARGET_MODULES (tests/lora/test_lora_experts.py checks it); spelled
# out here so that reading a config needs no torch. Which names a model has depends on its family.
TARGET_MODULES = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "experts.gate_up_proj", "experts.down_proj",
)  # fmt: skip
DATASET_FORMATS = ("prompt_completion", "chat", "alpaca", "text", "preference", "unpaired_preference")


class BaseModelConfig(Section):
    """The frozen base model every adapter shares."""

    path: str = Field(
        description="A Hugging Face model folder (config.json + safetensors) or a .gguf file; "
        "pkg:PACKAGE/FILE names a file inside an installed package (the bundled demo model)."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the base weights and activations; adapters train in float32."
    )
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="Where the model runs; auto picks cuda when available, else cpu."
    )
    hf_id: str | None = Field(
        None,
        description="The base's Hugging Face id (owner/name), recorded as base_model_name_or_path in saved "
        "adapters; None: the id in the model's metadata, else its absolute path.",
    )
    quantize: Literal["nf4", "int8"] | None = Field(
        None,
        description="Store the frozen base's projections quantized (QLoRA) through bitsandbytes: nf4 (4-bit "
        "NormalFloat) or int8; CUDA only; adapters keep their own dtype. None: the base stays in dtype.",
    )

    @_model_validator(mode="after")
    def _check(self) -> BaseModelConfig:
        if self.hf_id is not None:
            from ..export.base_ref import check_hf_id

            try:
                check_hf_id(self.hf_id)
            except ValueError as e:
                raise Problems([(("hf_id",), str(e))]) from None
        if self.quantize is not None and self.device == "cpu":
            raise Problems(
                [
                    (
                        ("quantize",),
                        f"got {self.quantize!r} with device: cpu; the quantized base runs on CUDA only: set "
                        "device: cuda (or auto) on a GPU machine, or remove quantize",
                    )
                ]
            )
        return self


class DatasetConfig(Section):
    """One data file and how to read its rows."""

    name: Name = Field(description="Name tasks refer to (tasks[i].dataset, tasks[i].eval_dataset).")
    path: str = Field(description="A .jsonl, .json (array of objects), .csv or .parquet file.")
    format: Literal["prompt_completion", "chat", "alpaca", "text", "preference", "unpaired_preference"] = (
        Field(
            description="Row layout: prompt_completion {prompt, completion}, chat {messages}, alpaca "
            "{instruction, input, output}, text {text}, preference {prompt, chosen, rejected}."
        )
    )
    max_examples: Int | None = Field(
        None, gt=0, description="Use only the first max_examples rows of the file (None: all rows)."
    )


class AdapterConfig(Section):
    """A LoRA (or DoRA) adapter on the base model's linear layers."""

    name: Name = Field(description="Adapter name; the output folder is OUTPUT_DIR/adapters/<name>/.")
    type: Literal["lora", "dora"] = Field(
        "lora", description="lora: W + (alpha / r) B A; dora: LoRA plus a learned per-column magnitude."
    )
    rank: Int = Field(8, gt=0, description="Rank r of the low-rank update B A.")
    alpha: Float = Field(16.0, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: Float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter's input during training (0: none)."
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r (rsLoRA).")
    target_modules: list[Literal[TARGET_MODULES]] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Which linear layers of every decoder layer get this adapter: any of "
        + ", ".join(TARGET_MODULES)
        + ".",
    )
    init_from: str | None = Field(
        None, description="A PEFT adapter folder to start from (its weights must match rank and targets)."
    )
    lora_plus_ratio: Float | None = Field(
        None, gt=0, description="LoRA+: B's learning rate is lr * lora_plus_ratio (None: same lr as A)."
    )

    @_model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if not self.target_modules:
            raise Problems(
                [(("target_modules",), "got []; list at least one of " + ", ".join(TARGET_MODULES))]
            )
        dupes = sorted({m for m in self.target_modules if self.target_modules.count(m) > 1})
        if dupes:
            raise Problems(
                [(("target_modules",), f"{', '.join(dupes)} listed more than once; list each module once")]
            )
        return self


class OptimizerConfig(Section):
    """Per-task optimizer (torch.optim.AdamW semantics)."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer; adamw is torch.optim.AdamW.")
    lr: Float = Field(2.0e-4, gt=0, description="Peak learning rate (after warmup).")
    weight_decay: Float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    betas: tuple[Float, Float] = Field((0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1).")
    eps: Float = Field(1.0e-8, gt=0, description="Adam's epsilon added to the denominator.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"got {list(v)}; each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v


class SchedulerConfig(Section):
    """Learning-rate schedule over a task's optimizer steps (the same rules as transformers' schedules)."""

    name: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="constant: lr after warmup; linear: warmup then linear decay to 0 at the task's last "
        "step; cosine: warmup then half a cosine down to 0 at the last step.",
    )
    warmup_steps: Int = Field(0, ge=0, description="Steps of linear warmup from 0 to lr.")


class TaskConfig(Section):
    """One fine-tuning job: an adapter trained on a dataset with its own hyper-parameters."""

    name: Name = Field(description="Task name (checkpoints/<name>/, metrics, progress bars).")
    type: TaskType = Field(
        "sft",
        description="Objective; sft: next-token cross-entropy on supervised tokens; dpo: direct preference "
        "optimisation against a frozen reference (see reference); orpo: odds-ratio preference optimisation (SFT on the "
        "chosen answer plus a penalty on the rejected one). dpo and orpo train on preference datasets.",
    )
    adapter: str = Field(description="Name of the adapter it trains (one of adapters[*].name).")
    dataset: str = Field(description="Name of its training dataset (one of datasets[*].name).")
    batch_size: Int = Field(8, gt=0, description="Examples per optimizer step.")
    micro_batch_size: Int | None = Field(
        None,
        gt=0,
        description="Most examples of this task in one forward/backward; divides batch_size "
        "(None: batch_size). The dispatcher may run fewer to fit the token budget; results are the same.",
    )
    num_epochs: Int = Field(1, gt=0, description="Passes over the dataset (see steps_for); max_steps wins.")
    max_steps: Int | None = Field(None, gt=0, description="Optimizer steps to run; overrides num_epochs.")
    max_seq_len: Int = Field(512, gt=1, description="Examples are cut from the right to this many tokens.")
    shuffle: bool = Field(
        True, description="Shuffle examples each epoch (seeded by seed); false: file order, wrapping around."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer settings.")
    lr_scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="LR schedule.")
    max_grad_norm: Float | None = Field(
        None, gt=0, description="Clip the adapter's gradient to this global L2 norm (None: no clipping)."
    )
    save_every_steps: Int = Field(
        100, gt=0, description="Write a checkpoint every this many steps (and always at the end)."
    )
    priority: Int = Field(0, description="Higher runs first when tasks compete for slots and tokens.")
    seed: Int | None = Field(
        None,
        description="Seeds this task's data order, adapter initialisation and dropout masks (None: the run's "
        "seed and the task's name, so every task draws its own). The same seed and settings give the same "
        "adapter whatever the task is named and whatever trains beside it.",
    )
    eval_dataset: str | None = Field(None, description="Name of a held-out dataset for eval loss.")
    eval_every_steps: Int | None = Field(
        None, gt=0, description="Evaluate every this many steps (needs eval_dataset; None: only at the end)."
    )
    early_stopping_patience: Int | None = Field(
        None,
        gt=0,
        description="Stop after this many evaluations without a better eval loss (needs eval_every_steps); "
        "the adapter saved at the end is then the one with the best eval loss.",
    )
    beta: Float = Field(
        0.1,
        gt=0,
        description="dpo and kto: strength of the KL penalty towards the reference; orpo: weight of the "
        "odds-ratio term (TRL's beta). Typical: 0.1.",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="dpo only: sigmoid (the DPO paper) or ipo (squared loss on length-averaged log-probs).",
    )
    label_smoothing: Float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo with loss_type sigmoid: assumed probability that a pair's labels are flipped (cDPO).",
    )
    desirable_weight: Float = Field(
        1.0, gt=0, description="kto only: weight of the desirable examples' losses."
    )
    undesirable_weight: Float = Field(
        1.0, gt=0, description="kto only: weight of the undesirable ones' losses."
    )
    reference: str | None = Field(
        None,
        description="dpo and kto: the frozen reference. init: a frozen copy of the adapter's starting weights "
        "(its init_from); base: the bare base model; or a PEFT adapter folder. Unset: init when the adapter "
        "has init_from, else base. It runs in the same fused batch as a frozen adapter segment.",
    )
    sweep: SweepConfig | None = Field(
        None, description="Lists of hyper-parameter values; the task becomes one task per combination."
    )
    sweep_point: SweepPoint | None = Field(
        None, description="Set by sweep expansion: where this task came from (leave unset)."
    )

    @_model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.micro_batch_size is None:
            self.micro_batch_size = self.batch_size
        problems: list[tuple[Loc, str]] = []
        mbs, bs = self.micro_batch_size, self.batch_size
        if bs % mbs:
            divisors = [d for d in range(1, bs + 1) if bs % d == 0]
            problems.append(
                (
                    ("batch_size",),
                    f"got {bs}, which micro_batch_size {mbs} does not divide; set batch_size to a multiple of "
                    f"{mbs} (e.g. {mbs * max(1, round(bs / mbs))}) or micro_batch_size to a divisor of {bs} "
                    f"({', '.join(map(str, divisors))})",
                )
            )
        if self.eval_every_steps is not None and self.eval_dataset is None:
            problems.append(
                (
                    ("eval_every_steps",),
                    f"got {self.eval_every_steps} but the task has no eval_dataset; add eval_dataset: NAME "
                    "or remove eval_every_steps",
                )
            )
        problems += type_problems(self)
        if self.early_stopping_patience is not None and self.eval_every_steps is None:
            problems.append(
                (
                    ("early_stopping_patience",),
                    f"got {self.early_stopping_patience} but the task has no eval_every_steps, so it is "
                    "never evaluated during training; set eval_dataset and eval_every_steps",
                )
            )
        if problems:
            raise Problems(problems)
        return self


class DispatcherConfig(Section):
    """How tasks share the model: slots and the token budget of one fused micro-batch."""

    max_concurrent_tasks: Int = Field(
        8, gt=0, description="Tasks that train at the same time; later ones queue until a slot frees."
    )
    max_tokens_per_micro_batch: Int = Field(
        4096, gt=0, description="Token budget of one fused micro-batch across all tasks."
    )


class PipelineConfig(Section):
    """Pipeline parallelism (used under torchrun); ignored by a single-process run."""

    stages: Int | None = Field(None, gt=0, description="Pipeline stages (None: the world size).")
    boundaries: list[Int] | None = Field(
        None,
        description="Decoder layer index where each stage after the first starts, increasing "
        "(None: balanced by estimated cost).",
    )
    max_in_flight: Int = Field(
        4, gt=0, description="Most micro-batches between a stage's forward and its backward."
    )

    @_model_validator(mode="after")
    def _check(self) -> PipelineConfig:
        b = self.boundaries
        if b is None:
            return self
        problems: list[tuple[Loc, str]] = []
        if any(x <= 0 for x in b) or any(x >= y for x, y in zip(b, b[1:])):
            problems.append(
                (
                    ("boundaries",),
                    f"got {b}; give strictly increasing layer indices >= 1, e.g. [15] for 2 stages",
                )
            )
        if self.stages is not None and len(b) != self.stages - 1:
            problems.append(
                (
                    ("boundaries",),
                    f"got {len(b)} boundaries for stages = {self.stages}; {self.stages} stages need "
                    f"{self.stages} - 1 = {self.stages - 1} boundaries",
                )
            )
        if problems:
            raise Problems(problems)
        return self


class RunConfig(Section):
    """Everything ``lorafleet train`` needs: one base model, datasets, adapters and the tasks that train them."""

    base_model: BaseModelConfig = Field(description="The shared frozen base model.")
    output_dir: str = Field(
        "runs/default",
        description="Where adapters, checkpoints and metrics go (relative to the working folder).",
    )
    seed: Int = Field(0, description="Seeds shuffling, dropout and adapter initialisation.")
    datasets: list[DatasetConfig] = Field(description="Data files, referred to by name.")
    adapters: list[AdapterConfig] = Field(description="Adapters, referred to by name.")
    tasks: list[TaskConfig] = Field(description="Training tasks; each trains one adapter.")
    dispatcher: DispatcherConfig = Field(default_factory=DispatcherConfig, description="Scheduling limits.")
    pipeline: PipelineConfig = Field(
        default_factory=PipelineConfig, description="Pipeline-parallel settings."
    )
    recompute: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward instead of keeping them "
        "(activation checkpointing per layer), in one process and on every pipeline stage: a fused micro-batch "
        "keeps only each layer's input, for about one more forward per step.",
    )

    @_model_validator(mode="after")
    def _check(self) -> RunConfig:
        problems = link_problems(self)
        if problems:
            raise Problems(problems)
        problems = sweep_problems(self)
        if problems:
            raise Problems(problems)
        expand_sweeps(self)
        return self


def steps_for(task: TaskConfig, num_examples: int) -> int:
    """Optimizer steps a task runs on a dataset of ``num_examples`` examples.

    ``max_steps`` when set; otherwise ``ceil(num_epochs * num_examples / batch_size)``. The data is one
    endless stream of epochs (each epoch the examples in file order, or a fresh seeded permutation with
    ``shuffle``), and step n takes the next ``batch_size`` examples of that stream, crossing into the next
    epoch when needed. So every example is seen ``num_epochs`` times and fewer than ``batch_size`` examples
    of epoch ``num_epochs + 1`` fill the last step. (Counting ``ceil(num_examples / batch_size)`` steps per
    epoch instead would, with wrap-around, drift further into later epochs every epoch.)
    """
    if num_examples <= 0:
        raise ValueError(
            f"task {task.name!r}: the dataset has {num_examples} examples; it needs at least one"
        )
    if task.max_steps is not None:
        return task.max_steps
    return math.ceil(task.num_epochs * num_examples / task.batch_size)
