"""The run configuration: typed, validated, loaded from YAML.

    cfg = load_config("examples/demo.yaml")        # RunConfig; relative data/model paths resolved
    cfg = parse_config({"base_model": {...}, ...})  # the same from a dict (REST jobs, tests)

Every user mistake raises ``ConfigError`` (a ``ValueError``) whose message holds one paragraph per
problem: where (``file:line``, when known, and the field path such as ``tasks[0].batch_size``), the bad
value, and the fix. Unknown fields suggest the closest known one; names that refer to other sections
(``tasks[i].adapter``, ``tasks[i].dataset``, ``tasks[i].eval_dataset``) suggest the closest existing name.

Paths: in ``load_config``, relative ``base_model.path``, ``datasets[i].path``, ``adapters[i].init_from`` and
``tasks[i].reference`` (a folder; ``base`` and ``init`` are keywords)
are resolved against the YAML file's folder (so a config and its data travel together); ``output_dir``
stays relative to the working directory, like any output path on a command line. ``pkg:PACKAGE/FILE``
model paths (a file shipped inside an installed package) are left as they are.

Layout: ``schema`` (the typed sections and ``steps_for``), ``fields`` (shared field types), ``task_types``
(what each task type takes), ``links`` (the checks across sections: names, references, token budget), ``sweep``
(sweep expansion), ``errors`` (``ConfigError`` and how pydantic errors become messages), ``loading`` (YAML and
dicts). Nothing here imports torch: the REST service validates configs too.
"""

from .errors import ConfigError
from .loading import load_config, parse_config
from .schema import (
    DATASET_FORMATS,
    TARGET_MODULES,
    TASK_FORMATS,
    AdapterConfig,
    BaseModelConfig,
    DatasetConfig,
    DispatcherConfig,
    OptimizerConfig,
    PipelineConfig,
    RunConfig,
    SchedulerConfig,
    TaskConfig,
    TaskType,
    steps_for,
)
from .sweep import SweepConfig, SweepPoint

__all__ = [
    "DATASET_FORMATS",
    "TARGET_MODULES",
    "TASK_FORMATS",
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
    "TaskType",
    "load_config",
    "parse_config",
    "steps_for",
]
