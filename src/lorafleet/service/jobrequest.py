"""The body of ``POST /v1/fine_tuning/jobs`` in OpenAI's shape, plus lorafleet's extension field.

What the official ``openai`` SDK sends (``client.fine_tuning.jobs.create(...)``) is accepted as it is:

- ``method``: ``{"type": "supervised", "supervised": {"hyperparameters": {...}}}``,
  ``{"type": "dpo", "dpo": {"hyperparameters": {...}}}`` or lorafleet's ``{"type": "kto", "kto":
  {"hyperparameters": {...}}}`` (TRL's KTO on unpaired rows; ``reinforcement`` is refused: lorafleet has no
  grader);
- ``model``: the served base model, or one of the tenant's fine-tuned models or checkpoints, which the job
  continues from (as OpenAI fine-tunes a fine-tuned model); ``api/starts.py`` resolves it;
- ``reference`` in dpo and kto hyperparameters (lorafleet's extension): ``"auto"`` (the model the job
  continues from, else the base), ``"base"``, ``"init"`` or one of the tenant's model ids;
- the legacy top-level ``hyperparameters`` (``batch_size``, ``learning_rate_multiplier``, ``n_epochs``),
  which means a supervised job; not together with ``method``;
- every hyperparameter may be ``"auto"``, which means the documented default (``AUTO_DEFAULTS``): batch
  size 8, 3 epochs, multiplier 1.0, DPO beta 0.1. The learning rate is ``learning_rate_multiplier *
  BASE_LEARNING_RATE`` (1e-4, a usual LoRA rate);
- ``seed`` (the job's own: the same seed and request give the same adapter, whatever trains beside it;
  omitted, one is drawn and shown on the job), ``suffix``,
  ``metadata`` (16 string pairs at most), ``integrations`` (only empty: nothing is reported elsewhere).

lorafleet's own settings go in the extension field ``lorafleet`` (``extra_body={"lorafleet": {...}}`` in the
SDK): ``adapter`` (type lora/dora, rank, alpha, dropout, target_modules, use_rslora), ``training`` (micro
batch, max_steps, schedule, max_seq_len, checkpoints, evaluation), ``preference`` (``objective`` dpo or orpo,
DPO's loss_type and label_smoothing) and ``priority``. Every object forbids unknown fields, and the error
names the field and the nearest known one ("did you mean").

``JobCreate.normalized()`` is the one resolved form that the store keeps and ``jobspec.job_configs`` reads.
"""

from __future__ import annotations

import difflib
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import TARGET_MODULES
from .files import FILE_ID_PATTERN, SUFFIX_PATTERN

__all__ = [
    "AUTO_DEFAULTS",
    "BASE_LEARNING_RATE",
    "ENGINE_SEED",
    "StrictRequest",
    "AdapterSettings",
    "JobCreate",
    "LorafleetSettings",
    "PREFERENCE_METHODS",
    "PreferenceSettings",
    "TrainingSettings",
]

BASE_LEARNING_RATE = 1e-4
AUTO_DEFAULTS: dict[str, float | int] = {
    "batch_size": 8,
    "n_epochs": 3,
    "learning_rate_multiplier": 1.0,
    "beta": 0.1,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
}
ENGINE_SEED = 0  # the engine's run seed (``EngineSettings.run_config``); every job's task brings its own seed

# every family's targets in PEFT's names (Phi's fused projections, MoE experts): the config's one list
TargetModule = Literal[TARGET_MODULES]
_Auto = Literal["auto"]


class StrictRequest(BaseModel):
    """A request object: unknown fields are refused, naming them and the nearest known field.

    Types are strict (``strict=True``): no bool where a number goes (``"rank": true`` is not rank 1) and no
    string where a number goes (``"batch_size": "8"``); an int is still a valid float.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = list(cls.model_fields)
            bad = [k for k in data if k not in cls.model_fields]
            if bad:
                parts = []
                for key in bad:
                    near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
                    home = _EXTENSION_HOMES.get(str(key))
                    hint = f" (did you mean {near[0]!r}?)" if near else ""
                    hint = f" (it belongs in {home})" if home and cls is not _HOME_CLASSES.get(home) else hint
                    parts.append(f"{key!r}{hint}")
                raise ValueError(f"unknown field {', '.join(parts)}; the known fields are {', '.join(known)}")
        return data


class AdapterSettings(StrictRequest):
    """The adapter to train (LoRA or DoRA) on the served base model."""

    type: Literal["lora", "dora"] = Field("lora", description="lora, or dora (weight-decomposed LoRA)")
    rank: int = Field(8, ge=1, le=256, description="rank r of the low-rank update")
    alpha: float = Field(16.0, gt=0, le=4096, description="scale numerator: the update is (alpha / r) * B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input")
    target_modules: list[TargetModule] = Field(
        default_factory=lambda: ["q_proj", "v_proj"], min_length=1, max_length=len(TARGET_MODULES),
        description="modules of every decoder block that get an adapter, in PEFT's names",
    )  # fmt: skip
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r)")

    @model_validator(mode="after")
    def _unique_modules(self) -> AdapterSettings:
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules lists a module twice; name each module once")
        return self


class TrainingSettings(StrictRequest):
    """Training settings beyond OpenAI's hyperparameters."""

    micro_batch_size: int | None = Field(
        None, ge=1, le=1024, description="examples per fused forward/backward (default: batch_size)"
    )
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


class PreferenceSettings(StrictRequest):
    """How a ``dpo`` job optimises its preference pairs."""

    objective: Literal["dpo", "orpo"] = Field("dpo", description="dpo, or orpo (odds ratio, no reference)")
    loss_type: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo only")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="dpo with sigmoid loss only")


class LorafleetSettings(StrictRequest):
    """The ``lorafleet`` extension field of a job."""

    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    preference: PreferenceSettings | None = Field(None, description="only with method.type dpo")
    priority: int = Field(0, ge=-100, le=100, description="higher runs first when the engine is full")


class SupervisedHyperparameters(StrictRequest):
    batch_size: _Auto | int = Field("auto", description="examples per optimizer step (auto: 8)")
    learning_rate_multiplier: _Auto | float = Field(
        "auto", description=f"times the base learning rate {BASE_LEARNING_RATE} (auto: 1.0)"
    )
    n_epochs: _Auto | int = Field("auto", description="passes over the training file (auto: 3)")


class DpoHyperparameters(SupervisedHyperparameters):
    beta: _Auto | float = Field("auto", description="strength of the preference term (auto: 0.1)")
    reference: str = Field(
        "auto", min_length=1, max_length=600,
        description="lorafleet's extension: the frozen reference. auto: the model the job continues from "
        "(its starting adapter), else the base; base; init (the starting adapter; needs model to name a "
        "fine-tuned model or checkpoint); or the id of another of your fine-tuned models or checkpoints",
    )  # fmt: skip


class KtoHyperparameters(DpoHyperparameters):
    desirable_weight: _Auto | float = Field(
        "auto", description="weight of desirable rows' losses (auto: 1.0)"
    )
    undesirable_weight: _Auto | float = Field(
        "auto", description="weight of undesirable rows' losses (auto: 1.0)"
    )


class SupervisedMethod(StrictRequest):
    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class DpoMethod(StrictRequest):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class KtoMethod(StrictRequest):
    hyperparameters: KtoHyperparameters = Field(default_factory=KtoHyperparameters)


_METHODS: dict[str, type[StrictRequest]] = {
    "supervised": SupervisedMethod,
    "dpo": DpoMethod,
    "kto": KtoMethod,
}
PREFERENCE_METHODS = ("dpo", "kto")  # the methods with a reference model


class Method(StrictRequest):
    type: Literal["supervised", "dpo", "kto", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: DpoMethod | None = None
    kto: KtoMethod | None = None
    reinforcement: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Method:
        if self.type == "reinforcement":
            raise ValueError(
                "reinforcement fine-tuning is not supported here: use 'supervised', 'dpo' or 'kto'"
            )
        for other in ("supervised", "dpo", "kto", "reinforcement"):
            if other != self.type and getattr(self, other) is not None:
                raise ValueError(f"method.{other} is given but method.type is {self.type!r}: remove one")
        return self


def _resolve(hp: SupervisedHyperparameters) -> dict[str, Any]:
    out = {}
    for key, value in hp.model_dump().items():
        if key == "reference":  # resolved against the tenant's models by api/starts.py
            out[key] = value
            continue
        v = AUTO_DEFAULTS[key] if value == "auto" else value
        bounds = {"batch_size": (1, 1024), "n_epochs": (1, 100)}
        if key in bounds and not bounds[key][0] <= v <= bounds[key][1]:
            raise ValueError(
                f"{key} must be 'auto' or between {bounds[key][0]} and {bounds[key][1]} (got {v})"
            )
        if key in ("learning_rate_multiplier", "beta", "desirable_weight", "undesirable_weight") and not (
            0 < v <= 100
        ):
            raise ValueError(f"{key} must be 'auto' or in (0, 100] (got {v})")
        out[key] = v
    return out


# where each lorafleet-only setting goes, for the hint when it is sent at OpenAI's level
_HOME_CLASSES: dict[str, type[BaseModel]] = {
    "lorafleet.training": TrainingSettings,
    "lorafleet.adapter": AdapterSettings,
    "lorafleet.preference": PreferenceSettings,
    "lorafleet": LorafleetSettings,
}
_EXTENSION_HOMES = {
    name: home for home, model in reversed(_HOME_CLASSES.items()) for name in model.model_fields
} | {
    "learning_rate": "learning_rate_multiplier (times 1e-4)",
    "reference": "method.dpo.hyperparameters or method.kto.hyperparameters",
    "desirable_weight": "method.kto.hyperparameters",
    "undesirable_weight": "method.kto.hyperparameters",
}


class JobCreate(StrictRequest):
    """``POST /v1/fine_tuning/jobs`` (see the module docstring)."""

    model: str | None = Field(
        None, max_length=600,
        description="the served base model (omit it or name it), or one of your fine-tuned models or "
        "checkpoints to continue from (its adapter is the job's starting point)",
    )  # fmt: skip
    training_file: str = Field(pattern=FILE_ID_PATTERN, description="id of an uploaded JSONL file")
    validation_file: str | None = Field(None, pattern=FILE_ID_PATTERN)
    hyperparameters: SupervisedHyperparameters | None = Field(
        None, description="legacy form of method.supervised.hyperparameters"
    )
    method: Method | None = None
    suffix: str | None = Field(
        None, pattern=SUFFIX_PATTERN, description="added to the model id (lower-case letters, digits, '-')"
    )
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1,
        description="the job's data order, adapter initialisation and dropout masks: the same seed and request "
        "give the same adapter (omitted: one is drawn and shown on the job)",
    )  # fmt: skip
    metadata: dict[str, str] | None = Field(None, max_length=16, description="16 string pairs at most")
    integrations: list[dict[str, Any]] | None = Field(None, max_length=0, description="none are supported")
    lorafleet: LorafleetSettings = Field(default_factory=LorafleetSettings)

    @model_validator(mode="after")
    def _consistent(self) -> JobCreate:
        if self.hyperparameters is not None and self.method is not None:
            raise ValueError(
                "give hyperparameters in method.<type>.hyperparameters or in the legacy top-level "
                "hyperparameters, not both"
            )
        for k, v in (self.metadata or {}).items():
            if not 0 < len(k) <= 64 or len(v) > 512:
                raise ValueError("metadata keys are 1 to 64 characters and values at most 512")
        if self.lorafleet.preference is not None and self.method_type != "dpo":
            raise ValueError("lorafleet.preference applies to dpo jobs only: set method.type to 'dpo'")
        pref = self.lorafleet.preference
        if pref is not None and pref.objective == "orpo" and self.hyperparameter("reference") != "auto":
            raise ValueError(
                "orpo has no reference model: remove method.dpo.hyperparameters.reference, or use objective dpo"
            )
        return self

    def hyperparameter(self, name: str) -> Any:
        """The request's value of hyperparameter ``name`` ("auto" when not given; None when the method has no
        such hyperparameter)."""
        sub = getattr(self.method, self.method_type, None) if self.method is not None else None
        hp = sub.hyperparameters if sub is not None else _METHODS[self.method_type]().hyperparameters
        return getattr(hp, name, None)

    def adapter_fields_given(self) -> set[str]:
        """The ``lorafleet.adapter`` fields the request sets (a job that continues from a model inherits the
        others from it)."""
        if "adapter" not in self.lorafleet.model_fields_set:
            return set()
        return set(self.lorafleet.adapter.model_fields_set)

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def normalized(self) -> dict[str, Any]:
        """The resolved request ("auto" replaced by its default) as the store keeps it; raises ValueError
        for a hyperparameter out of range."""
        kind = self.method_type
        if self.method is not None:
            sub = getattr(self.method, kind) or _METHODS[kind]()
            hp = sub.hyperparameters
        else:
            hp = self.hyperparameters or SupervisedHyperparameters()
        ext = self.lorafleet.model_dump(mode="json")
        if kind == "dpo" and ext["preference"] is None:
            ext["preference"] = PreferenceSettings().model_dump(mode="json")
        return {
            "model": self.model, "training_file": self.training_file, "validation_file": self.validation_file,
            "suffix": self.suffix, "seed": self.seed if self.seed is not None else secrets.randbelow(2**31),
            "metadata": self.metadata or {},
            "method": {"type": kind, kind: {"hyperparameters": _resolve(hp)}}, "lorafleet": ext,
        }  # fmt: skip
