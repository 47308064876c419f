"""Jobs that continue from one of the tenant's models, their reference, and KTO jobs, through the REST API
without a worker: what a job request resolves to (base model, inherited adapter, reference), the snapshots it
trains from, and every refusal (another tenant's model is the same 404 as a missing one; bad input is a 4xx
naming the field). Training through the real service is ``test_service_preference.py``.

The fine-tuned models here are PEFT folders written by ``save_peft`` beside a succeeded job in the store, and
a checkpoint is an engine checkpoint's weights file (``adapter.safetensors``, PEFT keys) recorded for it.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import save_file

from helpers.service import api_client
from helpers.service import error_message as _error
from helpers.service import jsonl as _jsonl
from helpers.service import upload as _upload
from lorafleet.config.peft import peft_adapter_config
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, read_peft, save_peft
from lorafleet.lora.adapters import LINEAR_TARGETS
from lorafleet.lora.experts import EXPERT_TARGETS
from lorafleet.models import load_model
from lorafleet.service.files import DataDir, new_adapter_id, new_job_id
from lorafleet.service.jobrequest import JobCreate
from lorafleet.service.jobspec import EngineSettings, job_configs, start_folder
from lorafleet.service.store import CheckpointRecord, JobRecord

PAIRS = [{"prompt": f"q{i}", "chosen": f" good {i}", "rejected": f" bad {i}"} for i in range(4)]
UNPAIRED = [{"prompt": f"q{i}", "completion": f" answer {i}", "label": i % 2 == 0} for i in range(4)]
SFT = [{"prompt": f"what is {i}?", "completion": f" {i}"} for i in range(4)]
JOBS = "/v1/fine_tuning/jobs"


def _weights(model_dir, spec: AdapterSpec, seed: int) -> dict[str, torch.Tensor]:
    model = load_model(model_dir)
    add_adapter(model, spec)
    g = torch.Generator().manual_seed(seed)
    params = adapter_parameters(model, spec.name)
    return {k: 0.1 * torch.randn(p.shape, generator=g) for k, p in params.items()}


def _fine_tuned(app, model_dir, tenant: str, rank: int, targets, seed: int, kind="lora") -> JobRecord:
    """A succeeded job of ``tenant`` with a random adapter (PEFT folder) and a checkpoint at step 2."""
    store, dd = app.state.store, DataDir(app.state.settings.data_dir)
    adapter_id = new_adapter_id(None)
    spec = AdapterSpec(adapter_id, kind=kind, rank=rank, alpha=2.0 * rank, target_modules=tuple(targets))
    state = _weights(model_dir, spec, seed)
    save_peft(dd.adapter_dir(adapter_id), spec, state)
    body = {"training_file": "file-" + "0" * 24, "lorafleet": {"adapter": {"type": kind, "rank": rank,
            "alpha": 2.0 * rank, "target_modules": list(targets)}}}  # fmt: skip
    job = JobRecord(new_job_id(), tenant, "queued", {**JobCreate(**body).normalized(), "model": "tiny-model"},
                    adapter_id, time.time())  # fmt: skip
    store.add_job(job)
    store.transition(job.id, "succeeded", ["queued"], finished_at=time.time())
    ck = dd.checkpoint_dir(job.id) / "step-000002"
    ck.mkdir(parents=True)
    save_file({k: 0.5 * v for k, v in state.items()}, str(ck / "adapter.safetensors"))
    store.add_checkpoint(CheckpointRecord(job.id, 2, str(ck), time.time()))
    return job


def _no_snapshots(app) -> bool:
    starts = DataDir(app.state.settings.data_dir).engine / "starts"
    return not starts.exists() or not any(starts.iterdir())


@pytest.fixture()
def api(tmp_path, tiny_model_dir):
    with api_client(tmp_path) as (client, headers, app):
        files = {}
        for tenant in ("alice", "bob"):
            for name, rows in (("pairs", PAIRS), ("unpaired", UNPAIRED), ("sft", SFT)):
                r = _upload(client, headers[tenant], _jsonl(rows), f"{name}.jsonl")
                assert r.status_code == 200, r.text
                files[tenant, name] = r.json()["id"]
        yield client, headers, app, files


def test_a_dpo_job_continues_from_a_fine_tuned_model_with_it_as_reference(api, tiny_model_dir):
    client, h, app, files = api
    src = _fine_tuned(app, tiny_model_dir, "alice", 4, ["q_proj", "v_proj"], seed=1)
    body = {"model": src.adapter_id, "training_file": files["alice", "pairs"], "method": {"type": "dpo"},
            "lorafleet": {"adapter": {"dropout": 0.1}}}  # fmt: skip
    r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["model"] == src.adapter_id  # as OpenAI shows a job that fine-tunes a fine-tuned model
    assert job["method"]["dpo"]["hyperparameters"]["reference"] == "init"
    assert job["lorafleet"]["adapter"] | {"dropout": 0.0} == src.spec["lorafleet"]["adapter"]
    assert job["lorafleet"]["adapter"]["dropout"] == 0.1 and job["lorafleet"]["adapter"]["rank"] == 4
    stored = app.state.store.get_job("alice", job["id"])
    assert stored.spec["model"] == "tiny-model"  # trains on the source's base model
    # the snapshot is the source's adapter, and the engine's adapter starts from it; its reference is init
    dd = DataDir(app.state.settings.data_dir)
    snap = start_folder(dd.engine, job["id"]) / "init"
    ours, theirs = read_peft(snap, "x"), read_peft(dd.adapter_dir(src.adapter_id), "x")
    assert ours[0] == theirs[0] and ours[1].keys() == theirs[1].keys()
    assert all(torch.equal(ours[1][k], theirs[1][k]) for k in ours[1])
    cfg = _configs(app, stored, files)
    assert cfg.adapter.init_from == str(snap) and cfg.task.reference == "init" and cfg.task.type == "dpo"
    # deleting the source model changes nothing for the job
    assert client.delete(f"/v1/models/{src.adapter_id}", headers=h["alice"]).json()["deleted"]
    assert read_peft(snap, "x")[1].keys() == theirs[1].keys()


def _configs(app, job, files):
    dd = DataDir(app.state.settings.data_dir)
    paths = {fid: (dd.file_path(fid), fmt) for fid, fmt in _formats(app, job).items()}
    return job_configs(job.spec, job.id, job.adapter_id, paths, EngineSettings("tiny-model"), dd.engine)


def _formats(app, job):
    fid = job.spec["training_file"]
    return {fid: app.state.store.get_file(job.tenant, fid).format}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_a_checkpoint_start_and_a_named_reference(api, tiny_model_dir, kind):
    """A KTO job from a checkpoint, with another fine-tuned model (other rank and targets) as its reference:
    the checkpoint's snapshot is a PEFT folder of its job's adapter settings with the checkpoint's weights."""
    client, h, app, files = api
    src = _fine_tuned(app, tiny_model_dir, "alice", 2, ["o_proj", "up_proj"], seed=2, kind=kind)
    other = _fine_tuned(app, tiny_model_dir, "alice", 4, ["q_proj"], seed=3)
    ckpt = f"{src.adapter_id}:ckpt-step-2"
    hp = {"beta": 0.2, "desirable_weight": 1.5, "reference": other.adapter_id, "batch_size": 2}
    body = {"model": ckpt, "training_file": files["alice", "unpaired"], "seed": 7,
            "method": {"type": "kto", "kto": {"hyperparameters": hp}}}  # fmt: skip
    r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["model"] == ckpt and job["method"]["type"] == "kto"
    got = job["method"]["kto"]["hyperparameters"]
    assert got == {"batch_size": 2, "learning_rate_multiplier": 1.0, "n_epochs": 3, "beta": 0.2,
                   "desirable_weight": 1.5, "undesirable_weight": 1.0, "reference": other.adapter_id}  # fmt: skip
    dd = DataDir(app.state.settings.data_dir)
    root = start_folder(dd.engine, job["id"])
    spec, state = read_peft(root / "init", "x")
    assert (spec.kind, spec.rank, spec.alpha, sorted(spec.target_modules)) == (
        kind,
        2,
        4.0,
        ["o_proj", "up_proj"],
    )
    _, src_state = read_peft(dd.adapter_dir(src.adapter_id), "x")
    assert state.keys() == src_state.keys()
    assert all(torch.equal(state[k], 0.5 * src_state[k]) for k in src_state)  # the checkpoint's weights
    assert read_peft(root / "reference", "x")[0].rank == 4
    cfg = _configs(app, app.state.store.get_job("alice", job["id"]), files)
    assert cfg.task.type == "kto" and cfg.task.reference == str(root / "reference")
    assert (cfg.task.beta, cfg.task.desirable_weight, cfg.task.undesirable_weight) == (0.2, 1.5, 1.0)
    # reference base: no reference snapshot
    hp = {"reference": "base", "batch_size": 2}
    body = {**body, "method": {"type": "kto", "kto": {"hyperparameters": hp}}}
    r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == 200, r.text
    assert not (start_folder(dd.engine, r.json()["id"]) / "reference").exists()
    assert _configs(app, app.state.store.get_job("alice", r.json()["id"]), files).task.reference == "base"


def test_another_tenants_model_is_the_404_of_a_missing_one(api, tiny_model_dir):
    client, h, app, files = api
    src = _fine_tuned(app, tiny_model_dir, "alice", 4, ["q_proj", "v_proj"], seed=1)
    missing = new_adapter_id(None)
    for model in (src.adapter_id, f"{src.adapter_id}:ckpt-step-2"):
        theirs = client.post(
            JOBS, headers=h["bob"], json={"model": model, "training_file": files["bob", "sft"]}
        )
        none = client.post(
            JOBS, headers=h["bob"], json={"model": missing, "training_file": files["bob", "sft"]}
        )
        assert theirs.status_code == none.status_code == 404
        assert theirs.json()["error"]["code"] == none.json()["error"]["code"] == "model_not_found"
        assert _error(theirs).replace(model, "ID") == _error(none).replace(missing, "ID")
        assert theirs.json()["error"]["param"] == "model"
    # as a reference too
    param = "method.dpo.hyperparameters.reference"
    for ref in (src.adapter_id, missing):
        body = {"training_file": files["bob", "pairs"],
                "method": {"type": "dpo", "dpo": {"hyperparameters": {"reference": ref}}}}  # fmt: skip
        r = client.post(JOBS, headers=h["bob"], json=body)
        assert r.status_code == 404 and r.json()["error"]["param"] == param, r.text
        assert "does not exist or you do not have access to it" in _error(r)
    # a checkpoint step that does not exist, and a job that has not succeeded, are no models either
    r = client.post(JOBS, headers=h["alice"], json={"model": f"{src.adapter_id}:ckpt-step-3",
                                                     "training_file": files["alice", "sft"]})  # fmt: skip
    assert r.status_code == 404
    assert _no_snapshots(app)  # nothing was kept


@pytest.mark.parametrize(
    "method, extra, status, words",
    [
        ({"type": "dpo", "dpo": {"hyperparameters": {"reference": "init"}}}, {}, 400,
         ["method.dpo.hyperparameters.reference is 'init'", "set model to the fine-tuned model"]),
        ({"type": "dpo", "dpo": {"hyperparameters": {"reference": "auto"}}},
         {"lorafleet": {"adapter": {"rank": 16}}}, 400, ["lorafleet.adapter.rank is 16", "has 4", "remove rank"]),
        ({"type": "dpo"}, {"lorafleet": {"adapter": {"target_modules": ["q_proj"]}}}, 400,
         ["lorafleet.adapter.target_modules"]),
        ({"type": "dpo", "dpo": {"hyperparameters": {"reference": "base"}}},
         {"lorafleet": {"preference": {"objective": "orpo"}}}, 400, ["orpo has no reference model"]),
        ({"type": "supervised", "supervised": {"hyperparameters": {"reference": "base"}}}, {}, 400,
         ["unknown field 'reference'", "method.dpo.hyperparameters or method.kto.hyperparameters"]),
        ({"type": "kto", "kto": {"hyperparameters": {"desirable_weight": 0}}}, {}, 400,
         ["desirable_weight must be 'auto' or in (0, 100]"]),
        ({"type": "kto", "kto": {"hyperparameters": {"batch_size": 1}}}, {}, 400,
         ["lorafleet.training.micro_batch_size"]),
        # refused by the engine's config after the snapshot was taken: the snapshot goes too
        ({"type": "kto", "kto": {"hyperparameters": {"batch_size": 1}}}, {"model": "SRC"}, 400,
         ["lorafleet.training.micro_batch_size"]),
        ({"type": "dpo", "dpo": {"hyperparameters": {"reference": "SRC"}}},
         {"lorafleet": {"training": {"max_seq_len": 4000}}}, 400, ["max_seq_len"]),
        ({"type": "kto", "kto": {"hyperparameters": {"bta": 0.1}}}, {}, 400, ["did you mean 'beta'"]),
        ({"type": "kto", "dpo": {}}, {}, 400, ["method.dpo is given but method.type is 'kto'"]),
    ],
)  # fmt: skip
def test_bad_continuations_and_kto_settings_are_400s_naming_the_field(
    api, tiny_model_dir, method, extra, status, words
):
    client, h, app, files = api
    src = _fine_tuned(app, tiny_model_dir, "alice", 4, ["q_proj", "v_proj"], seed=1)
    data = "unpaired" if method["type"] == "kto" else "pairs" if method["type"] == "dpo" else "sft"
    body = json.loads(json.dumps({"training_file": files["alice", data], "method": method, **extra}))
    body = json.loads(json.dumps(body).replace('"SRC"', json.dumps(src.adapter_id)))
    if "adapter" in extra.get("lorafleet", {}):
        body["model"] = src.adapter_id
    r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in _error(r), _error(r)
    assert _no_snapshots(app)


def test_a_snapshot_that_cannot_be_written_is_a_503_and_keeps_nothing(api, tiny_model_dir, monkeypatch):
    client, h, app, files = api
    src = _fine_tuned(app, tiny_model_dir, "alice", 4, ["q_proj", "v_proj"], seed=1)
    body = {"model": src.adapter_id, "training_file": files["alice", "pairs"], "method": {"type": "dpo"}}

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr("lorafleet.service.api.starts.shutil.copyfile", full)
        r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable", r.text
    assert str(app.state.settings.data_dir) not in _error(r)
    assert [j["id"] for j in client.get(JOBS, headers=h["alice"]).json()["data"]] == [src.id]
    assert _no_snapshots(app)
    assert client.post(JOBS, headers=h["alice"], json=body).status_code == 200  # once the disk is back


def test_kto_data_formats_are_checked_with_file_and_line(api):
    client, h, app, files = api
    # a KTO job on a preference file (and a DPO job on an unpaired one): the field and the format it needs
    r = client.post(
        JOBS, headers=h["alice"], json={"training_file": files["alice", "pairs"], "method": {"type": "kto"}}
    )
    assert r.status_code == 400 and "training_file" in _error(r) and "'unpaired_preference'" in _error(r), (
        r.text
    )
    r = client.post(
        JOBS,
        headers=h["alice"],
        json={"training_file": files["alice", "unpaired"], "method": {"type": "dpo"}},
    )
    assert r.status_code == 400 and "'preference'" in _error(r), r.text
    # a broken unpaired row: the upload names its line
    rows = (
        _jsonl(UNPAIRED[:2])
        + (json.dumps({"prompt": "p", "completion": "c", "label": "yes"}) + "\n").encode()
    )
    r = _upload(client, h["alice"], rows, "thumbs.jsonl")
    assert r.status_code == 400 and "line 3" in _error(r) and "boolean 'label'" in _error(r), r.text
    # validation files of KTO jobs are unpaired rows too
    body = {"training_file": files["alice", "unpaired"], "validation_file": files["alice", "sft"],
            "method": {"type": "kto"}}  # fmt: skip
    r = client.post(JOBS, headers=h["alice"], json=body)
    assert r.status_code == 400 and "validation_file" in _error(r), r.text


def test_the_torch_free_peft_config_splits_targets_as_lora_does():
    assert all(t.startswith("experts.") for t in EXPERT_TARGETS)
    assert not any(t.startswith("experts.") for t in LINEAR_TARGETS)
    cfg = peft_adapter_config("dora", 4, 8.0, 0.0, True, ["v_proj", "experts.down_proj", "q_proj"], "m")
    assert (cfg["target_modules"], cfg["target_parameters"]) == (["q_proj", "v_proj"], ["experts.down_proj"])
    assert cfg["lora_alpha"] == 8 and cfg["use_dora"] and cfg["use_rslora"] and cfg["r"] == 4
