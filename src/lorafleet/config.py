"""The run configuration: typed, validated, loaded from YAML.

    cfg = load_config("examples/demo.yaml")        # RunConfig; relative data/model paths resolved
    cfg = parse_config({"base_model": {...}, ...})  # the same from a dict (REST jobs, tests)

Every user mistake raises ``ConfigError`` (a ``ValueError``) whose message holds one paragraph per
problem: where (``file:line``, when known, and the field path such as ``tasks[0].batch_size``), the bad
value, and the fix. Unknown fields suggest the closest known one; names that refer to other sections
(``tasks[i].adapter``, ``tasks[i].dataset``, ``tasks[i].eval_dataset``) suggest the closest existing name.

Paths: in ``load_config``, relative ``base_model.path``, ``datasets[i].path`` and ``adapters[i].init_from``
are resolved against the YAML file's folder (so a config and its data travel together); ``output_dir``
stays relative to the working directory, like any output path on a command line. ``pkg:PACKAGE/FILE``
model paths (a file shipped inside an installed package) are left as they are.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic import model_validator as _model_validator

__all__ = [
    "AdapterConfig",
    "BaseModelConfig",
    "ConfigError",
    "DatasetConfig",
    "DispatcherConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "RunConfig",
    "SchedulerConfig",
    "SweepConfig",
    "SweepPoint",
    "TaskConfig",
    "load_config",
    "parse_config",
    "steps_for",
]

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DATASET_FORMATS = ("prompt_completion", "chat", "alpaca", "text", "preference")

# Which dataset formats each task type trains on. A new task type (dpo, orpo, ...) adds its name to
# ``TaskType`` and one entry here; the cross-checks below then accept it.
TaskType = Literal["sft", "dpo", "orpo"]
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt_completion", "chat", "alpaca", "text"),
    "dpo": ("preference",),
    "orpo": ("preference",),
}
# Sequences one example becomes in a fused micro-batch (train/tasks.py): DPO packs chosen and rejected
# twice (under the adapter and on the base as its reference), ORPO once.
_SEQUENCES_PER_EXAMPLE = {"sft": 1, "dpo": 4, "orpo": 2}
_PREFERENCE_FIELDS = ("beta", "loss_type", "label_smoothing")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_NAME_RULE = (
    "names become file and folder names: use 1 to 100 letters, digits, '-', '_' or '.', starting with a "
    "letter or digit"
)

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """A configuration mistake; the message has one paragraph per problem, each with where, what and the fix.

    ``problems`` holds the same paragraphs as a list.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n\n".join(self.problems))


class _Problems(ValueError):
    """Raised inside validators: ``(location relative to the model, message)`` pairs, unpacked later."""

    def __init__(self, items: list[tuple[Loc, str]]):
        self.items = items
        super().__init__("; ".join(f"{_fmt_loc(loc)}: {msg}" if loc else msg for loc, msg in items))


def _no_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1; in a config that is always a mistake.
    if isinstance(value, bool):
        raise ValueError(f"got {str(value).lower()} (a boolean); use a number")
    return value


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"got {value!r}; {_NAME_RULE}")
    return value


_Int = Annotated[int, BeforeValidator(_no_bool)]
_Float = Annotated[float, BeforeValidator(_no_bool)]
_Name = Annotated[str, AfterValidator(_check_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelConfig(_Section):
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
    quantize: Literal["nf4", "int8"] | None = Field(
        None,
        description="Store the frozen base's projections quantized (QLoRA) through bitsandbytes: nf4 (4-bit "
        "NormalFloat) or int8; CUDA only; adapters keep their own dtype. None: the base stays in dtype.",
    )

    @_model_validator(mode="after")
    def _check(self) -> BaseModelConfig:
        if self.quantize is not None and self.device == "cpu":
            raise _Problems(
                [
                    (
                        ("quantize",),
                        f"got {self.quantize!r} with device: cpu; the quantized base runs on CUDA only: set "
                        "device: cuda (or auto) on a GPU machine, or remove quantize",
                    )
                ]
            )
        return self


class DatasetConfig(_Section):
    """One data file and how to read its rows."""

    name: _Name = Field(description="Name tasks refer to (tasks[i].dataset, tasks[i].eval_dataset).")
    path: str = Field(description="A .jsonl, .json (array of objects), .csv or .parquet file.")
    format: Literal["prompt_completion", "chat", "alpaca", "text", "preference"] = Field(
        description="Row layout: prompt_completion {prompt, completion}, chat {messages}, alpaca "
        "{instruction, input, output}, text {text}, preference {prompt, chosen, rejected}."
    )
    max_examples: _Int | None = Field(
        None, gt=0, description="Use only the first max_examples rows of the file (None: all rows)."
    )


class AdapterConfig(_Section):
    """A LoRA (or DoRA) adapter on the base model's linear layers."""

    name: _Name = Field(description="Adapter name; the output folder is OUTPUT_DIR/adapters/<name>/.")
    type: Literal["lora", "dora"] = Field(
        "lora", description="lora: W + (alpha / r) B A; dora: LoRA plus a learned per-column magnitude."
    )
    rank: _Int = Field(8, gt=0, description="Rank r of the low-rank update B A.")
    alpha: _Float = Field(16.0, gt=0, description="Scale numerator: the update is scaled by alpha / r.")
    dropout: _Float = Field(
        0.05, ge=0, lt=1, description="Dropout on the adapter's input during training (0: none)."
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) instead of alpha / r (rsLoRA).")
    target_modules: list[
        Literal["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Which linear layers of every decoder layer get this adapter: any of "
        + ", ".join(TARGET_MODULES)
        + ".",
    )
    init_from: str | None = Field(
        None, description="A PEFT adapter folder to start from (its weights must match rank and targets)."
    )
    lora_plus_ratio: _Float | None = Field(
        None, gt=0, description="LoRA+: B's learning rate is lr * lora_plus_ratio (None: same lr as A)."
    )

    @_model_validator(mode="after")
    def _check(self) -> AdapterConfig:
        if not self.target_modules:
            raise _Problems(
                [(("target_modules",), "got []; list at least one of " + ", ".join(TARGET_MODULES))]
            )
        dupes = sorted({m for m in self.target_modules if self.target_modules.count(m) > 1})
        if dupes:
            raise _Problems(
                [(("target_modules",), f"{', '.join(dupes)} listed more than once; list each module once")]
            )
        return self


class OptimizerConfig(_Section):
    """Per-task optimizer (torch.optim.AdamW semantics)."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer; adamw is torch.optim.AdamW.")
    lr: _Float = Field(2.0e-4, gt=0, description="Peak learning rate (after warmup).")
    weight_decay: _Float = Field(0.0, ge=0, description="Decoupled weight decay (AdamW).")
    betas: tuple[_Float, _Float] = Field((0.9, 0.999), description="Adam's (beta1, beta2), each in [0, 1).")
    eps: _Float = Field(1.0e-8, gt=0, description="Adam's epsilon added to the denominator.")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"got {list(v)}; each beta must be in [0, 1), e.g. [0.9, 0.999]")
        return v


class SchedulerConfig(_Section):
    """Learning-rate schedule over a task's optimizer steps (the same rules as transformers' schedules)."""

    name: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="constant: lr after warmup; linear: warmup then linear decay to 0 at the task's last "
        "step; cosine: warmup then half a cosine down to 0 at the last step.",
    )
    warmup_steps: _Int = Field(0, ge=0, description="Steps of linear warmup from 0 to lr.")


def _distinct(values: list) -> list:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"got {values}: {', '.join(map(repr, dupes))} listed twice; list each value once")
    return values


class SweepConfig(_Section):
    """Lists of values to try; the task becomes one task and adapter per combination (``train/sweep.py``)."""

    lr: Annotated[list[Annotated[_Float, Field(gt=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Learning rates (optimizer.lr)."
    )
    weight_decay: Annotated[list[Annotated[_Float, Field(ge=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Weight decays (optimizer.weight_decay)."
    )
    warmup_steps: Annotated[list[Annotated[_Int, Field(ge=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Warmup steps (lr_scheduler.warmup_steps)."
    )
    rank: Annotated[list[Annotated[_Int, Field(gt=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Adapter ranks (the task's adapter's rank)."
    )
    alpha: Annotated[list[Annotated[_Float, Field(gt=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Adapter alphas (the task's adapter's alpha)."
    )
    dropout: Annotated[list[Annotated[_Float, Field(ge=0, lt=1)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="Adapter dropouts (the task's adapter's dropout)."
    )
    beta: Annotated[list[Annotated[_Float, Field(gt=0)]], AfterValidator(_distinct)] | None = Field(
        None, min_length=1, description="DPO/ORPO betas (the task's beta)."
    )
    queue: bool = Field(
        False,
        description="Allow more tasks than dispatcher.max_concurrent_tasks; the extra combinations wait "
        "for a free slot and train in later waves (false: such a sweep is refused).",
    )


class SweepPoint(_Section):
    """Filled in by sweep expansion (not by hand): the task this one was expanded from, and its values."""

    task: str = Field(description="Name of the sweeping task in the config as written.")
    values: dict[str, int | float] = Field(
        description="The swept values of this combination, e.g. {lr: 0.001, rank: 8}."
    )


class TaskConfig(_Section):
    """One fine-tuning job: an adapter trained on a dataset with its own hyper-parameters."""

    name: _Name = Field(description="Task name (checkpoints/<name>/, metrics, progress bars).")
    type: TaskType = Field(
        "sft",
        description="Objective; sft: next-token cross-entropy on supervised tokens; dpo: direct preference "
        "optimisation against the frozen base model; orpo: odds-ratio preference optimisation (SFT on the "
        "chosen answer plus a penalty on the rejected one). dpo and orpo train on preference datasets.",
    )
    adapter: str = Field(description="Name of the adapter it trains (one of adapters[*].name).")
    dataset: str = Field(description="Name of its training dataset (one of datasets[*].name).")
    batch_size: _Int = Field(8, gt=0, description="Examples per optimizer step.")
    micro_batch_size: _Int | None = Field(
        None,
        gt=0,
        description="Most examples of this task in one forward/backward; divides batch_size "
        "(None: batch_size). The dispatcher may run fewer to fit the token budget; results are the same.",
    )
    num_epochs: _Int = Field(1, gt=0, description="Passes over the dataset (see steps_for); max_steps wins.")
    max_steps: _Int | None = Field(None, gt=0, description="Optimizer steps to run; overrides num_epochs.")
    max_seq_len: _Int = Field(512, gt=1, description="Examples are cut from the right to this many tokens.")
    shuffle: bool = Field(
        True, description="Shuffle examples each epoch (seeded by seed); false: file order, wrapping around."
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer settings.")
    lr_scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="LR schedule.")
    max_grad_norm: _Float | None = Field(
        None, gt=0, description="Clip the adapter's gradient to this global L2 norm (None: no clipping)."
    )
    save_every_steps: _Int = Field(
        100, gt=0, description="Write a checkpoint every this many steps (and always at the end)."
    )
    priority: _Int = Field(0, description="Higher runs first when tasks compete for slots and tokens.")
    eval_dataset: str | None = Field(None, description="Name of a held-out dataset for eval loss.")
    eval_every_steps: _Int | None = Field(
        None, gt=0, description="Evaluate every this many steps (needs eval_dataset; None: only at the end)."
    )
    early_stopping_patience: _Int | None = Field(
        None,
        gt=0,
        description="Stop after this many evaluations without a better eval loss (needs eval_every_steps); "
        "the adapter saved at the end is then the one with the best eval loss.",
    )
    beta: _Float = Field(
        0.1,
        gt=0,
        description="dpo: strength of the KL penalty towards the base model; orpo: weight of the odds-ratio "
        "term (TRL's beta). Typical: 0.1.",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="dpo only: sigmoid (the DPO paper) or ipo (squared loss on length-averaged log-probs).",
    )
    label_smoothing: _Float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="dpo with loss_type sigmoid: assumed probability that a pair's labels are flipped (cDPO).",
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
        for name in _PREFERENCE_FIELDS:
            allowed = ("dpo", "orpo") if name == "beta" else ("dpo",)
            if getattr(self, name) != type(self).model_fields[name].default and self.type not in allowed:
                problems.append(
                    (
                        (name,),
                        f"is a setting of task type {' and '.join(allowed)}, but this task's type is "
                        f"{self.type!r}; remove {name} or set type: {allowed[0]}",
                    )
                )
        if self.type == "dpo" and self.loss_type == "ipo" and self.label_smoothing > 0:
            problems.append(
                (
                    ("label_smoothing",),
                    f"got {self.label_smoothing} with loss_type ipo; label smoothing applies to the sigmoid "
                    "loss only: remove it or use loss_type: sigmoid",
                )
            )
        if self.early_stopping_patience is not None and self.eval_every_steps is None:
            problems.append(
                (
                    ("early_stopping_patience",),
                    f"got {self.early_stopping_patience} but the task has no eval_every_steps, so it is "
                    "never evaluated during training; set eval_dataset and eval_every_steps",
                )
            )
        if problems:
            raise _Problems(problems)
        return self


class DispatcherConfig(_Section):
    """How tasks share the model: slots and the token budget of one fused micro-batch."""

    max_concurrent_tasks: _Int = Field(
        8, gt=0, description="Tasks that train at the same time; later ones queue until a slot frees."
    )
    max_tokens_per_micro_batch: _Int = Field(
        4096, gt=0, description="Token budget of one fused micro-batch across all tasks."
    )


class PipelineConfig(_Section):
    """Pipeline parallelism (used under torchrun); ignored by a single-process run."""

    stages: _Int | None = Field(None, gt=0, description="Pipeline stages (None: the world size).")
    boundaries: list[_Int] | None = Field(
        None,
        description="Decoder layer index where each stage after the first starts, increasing "
        "(None: balanced by estimated cost).",
    )
    max_in_flight: _Int = Field(
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
            raise _Problems(problems)
        return self


class RunConfig(_Section):
    """Everything ``lorafleet train`` needs: one base model, datasets, adapters and the tasks that train them."""

    base_model: BaseModelConfig = Field(description="The shared frozen base model.")
    output_dir: str = Field(
        "runs/default",
        description="Where adapters, checkpoints and metrics go (relative to the working folder).",
    )
    seed: _Int = Field(0, description="Seeds shuffling, dropout and adapter initialisation.")
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
        problems: list[tuple[Loc, str]] = []
        for section in ("datasets", "adapters", "tasks"):
            items = getattr(self, section)
            if not items:
                problems.append(((section,), f"got []; list at least one entry under {section}"))
            seen: dict[str, int] = {}
            for i, item in enumerate(items):
                if item.name in seen:
                    problems.append(
                        (
                            (section, i, "name"),
                            f"{item.name!r} is already the name of {section}[{seen[item.name]}]; "
                            "give every entry a different name",
                        )
                    )
                seen.setdefault(item.name, i)
        datasets = {d.name: d for d in self.datasets}
        adapters = {a.name for a in self.adapters}
        used_by: dict[str, int] = {}
        budget = self.dispatcher.max_tokens_per_micro_batch
        for i, t in enumerate(self.tasks):
            if t.adapter not in adapters:
                problems.append((("tasks", i, "adapter"), _unknown_name(t.adapter, "adapter", adapters)))
            elif t.adapter in used_by:
                j = used_by[t.adapter]
                problems.append(
                    (
                        ("tasks", i, "adapter"),
                        f"{t.adapter!r} is already trained by tasks[{j}] ({self.tasks[j].name!r}); an adapter "
                        "belongs to one task: add another adapter entry for this task",
                    )
                )
            else:
                used_by[t.adapter] = i
            for field in ("dataset", "eval_dataset"):
                ref = getattr(t, field)
                if ref is None:
                    continue
                if ref not in datasets:
                    problems.append((("tasks", i, field), _unknown_name(ref, "dataset", set(datasets))))
                elif datasets[ref].format not in TASK_FORMATS[t.type]:
                    problems.append(
                        (
                            ("tasks", i, field),
                            f"dataset {ref!r} has format {datasets[ref].format!r}, which a task of type {t.type!r} "
                            f"cannot train on; use a dataset with format "
                            f"{' or '.join(repr(f) for f in TASK_FORMATS[t.type])}",
                        )
                    )
            per_example = _SEQUENCES_PER_EXAMPLE[t.type]
            if t.max_seq_len * per_example > budget:
                times = f" x {per_example} sequences per {t.type} example" if per_example > 1 else ""
                problems.append(
                    (
                        ("tasks", i, "max_seq_len"),
                        f"got {t.max_seq_len}{times}, more than dispatcher.max_tokens_per_micro_batch = "
                        f"{budget}, so one example could not fit a micro-batch; lower max_seq_len to <= "
                        f"{budget // per_example} or raise dispatcher.max_tokens_per_micro_batch",
                    )
                )
        if problems:
            raise _Problems(problems)
        from .train.sweep import expand_sweeps, sweep_problems

        problems = sweep_problems(self)
        if problems:
            raise _Problems(problems)
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


def parse_config(data: Any, *, base_dir: str | Path | None = None, source: str | None = None) -> RunConfig:
    """Validate a config given as plain data (a dict, e.g. from YAML or JSON).

    ``base_dir``: relative dataset, model and ``init_from`` paths are resolved against it (None: left as
    given). ``source``: a name for messages (e.g. the YAML file). Raises ``ConfigError``.
    """
    return _parse(data, base_dir=base_dir, source=source, node=None)


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML config; relative data and model paths are taken from the file's folder."""
    p = Path(path).expanduser()
    if not p.is_file():
        hint = "it is a folder; give the YAML file inside it" if p.is_dir() else "check the path"
        raise ConfigError([f"{p}: config file not found ({hint})"])
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read the config ({e}); save it as UTF-8 text"]) from None
    try:
        loader = _Loader(text)
        loader.name = str(p)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise ConfigError([str(e)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        what = getattr(e, "problem", None) or str(e)
        raise ConfigError(
            [f"{where}: not valid YAML ({what}); check the indentation and quoting near that line"]
        ) from None
    return _parse(data, base_dir=p.parent, source=str(p), node=node)


# ---------------------------------------------------------------------------------------------------------
# YAML loading with duplicate-key detection and line numbers.


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one YAML mapping; the message is the whole paragraph."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(
                    f"{self.name}:{line}: key {key!r} appears twice in one mapping (lines {seen[key]} and "
                    f"{line}); keep one"
                )
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads 2e-4 (no dot) as a string; accept it as the float everyone means.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _line_of(node: Any, loc: Loc) -> int | None:
    """1-based line of the YAML node at ``loc`` (the key's line for a mapping entry), or the nearest parent."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key_node, value_node in node.value:
                if getattr(key_node, "value", None) == part:
                    line, node = key_node.start_mark.line + 1, value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


# ---------------------------------------------------------------------------------------------------------
# Validation and messages.


def _parse(data: Any, *, base_dir: str | Path | None, source: str | None, node: Any) -> RunConfig:
    def where(loc: Loc) -> str:
        line = _line_of(node, loc) if node is not None else None
        head = f"{source}:{line}: " if (source and line) else (f"{source}: " if source else "")
        return head + (_fmt_loc(loc) if loc else "config")

    if not isinstance(data, dict):
        raise ConfigError(
            [
                f"{where(())}: got {type(data).__name__} {_short(data)}; a config is a mapping with "
                "base_model, datasets, adapters and tasks (see README, Configuration)"
            ]
        )
    if base_dir is not None:
        data = _resolve_paths(data, Path(base_dir))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        paragraphs: list[str] = []
        for err in e.errors(include_url=False):
            for loc, msg in _explain(err):
                paragraphs.append(f"{where(loc)}: {msg}")
        raise ConfigError(list(dict.fromkeys(paragraphs))) from None


def _resolve_paths(data: dict, base: Path) -> dict:
    """A copy of ``data`` with relative data, model and init_from paths joined to ``base``."""

    def fix(value: Any) -> Any:
        if not isinstance(value, str) or not value or value.startswith("pkg:"):
            return value
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p))

    out = dict(data)
    if isinstance(out.get("base_model"), dict) and "path" in out["base_model"]:
        out["base_model"] = {**out["base_model"], "path": fix(out["base_model"]["path"])}
    for section, key in (("datasets", "path"), ("adapters", "init_from")):
        if isinstance(out.get(section), list):
            out[section] = [
                {**item, key: fix(item[key])} if isinstance(item, dict) and key in item else item
                for item in out[section]
            ]
    return out


_KIND = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string (quote it in YAML)",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping of fields",
    "model_type": "a mapping of fields",
    "model_attributes_type": "a mapping of fields",
}

# pydantic error type -> (symbol, ctx key of the bound)
_BOUND = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def _explain(err: dict) -> list[tuple[Loc, str]]:
    """Turn one pydantic error into ``(field path, message with the value and the fix)`` pairs."""
    loc: Loc = tuple(err["loc"])
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind == "value_error":
        exc = ctx.get("error")
        if isinstance(exc, _Problems):
            return [(loc + rel, msg) for rel, msg in exc.items]
        return [(loc, str(exc) if exc is not None else err["msg"])]
    if kind == "extra_forbidden":
        moved = _MOVED.get(tuple(p for p in loc if not isinstance(p, int)))
        if moved is not None:
            return [(loc, moved)]
        known = list(_model_at(loc[:-1]).model_fields) if _model_at(loc[:-1]) else []
        key = str(loc[-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return [(loc, f"unknown field {key!r}; {hint}known fields here: {', '.join(known)}")]
    if kind == "missing" and loc and isinstance(loc[-1], int):
        # A fixed-length list (betas) with too few values.
        n = len(typing.get_args(_annotation_at(loc[:-1])))
        return [(loc[:-1], f"got {_short(value)}; give exactly {n} values")]
    if kind == "missing":
        model = _model_at(loc[:-1])
        desc = model.model_fields[loc[-1]].description if model and loc[-1] in model.model_fields else None
        about = f" ({desc})" if desc else ""
        return [(loc, f"required field is missing; add {loc[-1]}: ...{about}")]
    if kind == "literal_error":
        options = _literal_options(loc)
        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5) if options else []
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(options) if options else ctx.get("expected", "")
        return [(loc, f"got {_short(value)}; use one of {choices}{hint}")]
    if kind in _BOUND:
        symbol, key = _BOUND[kind]
        return [(loc, f"got {_short(value)}; it must be {symbol} {ctx.get(key)}")]
    if kind in _KIND:
        return [(loc, f"got {_short(value)} ({type(value).__name__}); use {_KIND[kind]}")]
    return [(loc, f"got {_short(value)}; {err['msg']}")]


# fields that moved, with where they went
_MOVED: dict[Loc, str] = {
    ("pipeline", "recompute"): "moved to the top level: write `recompute: true` (not under pipeline:); it "
    "applies to single-process runs and to every pipeline stage",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fmt_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _unknown_name(name: str, kind: str, known: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    names = ", ".join(repr(k) for k in sorted(known)) or "none"
    return f"no {kind} named {name!r}; {hint}{kind}s defined: {names}"


def _annotation_at(loc: Loc) -> Any:
    """The type annotation of the field at ``loc`` in RunConfig (list indices step into items)."""
    ann: Any = RunConfig
    for part in loc:
        ann = _unwrap(ann)
        if isinstance(part, int):
            args = typing.get_args(ann)
            if typing.get_origin(ann) is list and args:
                ann = args[0]
            elif typing.get_origin(ann) is tuple and args:
                ann = args[min(part, len(args) - 1)]
            else:
                return None
        elif isinstance(ann, type) and issubclass(ann, BaseModel) and part in ann.model_fields:
            ann = ann.model_fields[part].annotation
        else:
            return None
    return _unwrap(ann)


def _unwrap(ann: Any) -> Any:
    """Strip ``X | None`` and ``Annotated[X, ...]`` down to X."""
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


def _model_at(loc: Loc) -> type[BaseModel] | None:
    ann = _annotation_at(loc)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _literal_options(loc: Loc) -> list[str]:
    ann = _annotation_at(loc)
    return [str(a) for a in typing.get_args(ann)] if typing.get_origin(ann) is Literal else []
