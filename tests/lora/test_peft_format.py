"""PEFT's adapter format, checked against HF PEFT itself in both directions (keys, config, logits)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import make_tiny_model
from lorafleet import FusedBatch, load_model
from lorafleet.lora import (
    AdapterSpec,
    adapter_names,
    adapter_parameters,
    add_adapter,
    load_peft,
    read_peft,
    save_peft,
)

ROWS = [[1, 5, 9, 3, 4, 8, 2, 7], [7, 7, 1, 0, 3, 11, 12, 13]]
SPECS = {
    "lora": AdapterSpec("ad", rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
    "rslora": AdapterSpec(
        "ad", rank=8, alpha=4, use_rslora=True, dropout=0.1, target_modules=("k_proj", "o_proj")
    ),
    "dora": AdapterSpec(
        "ad", kind="dora", rank=2, alpha=4, target_modules=("q_proj", "o_proj", "gate_proj", "up_proj")
    ),
}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_model(
        "llama2", folder, hidden_size=32, intermediate_size=48, vocab_size=64, max_position_embeddings=64,
        attention_bias=True,
    )  # fmt: skip
    return folder


def _hf(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager")


def _lora_config(spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        use_rslora=spec.use_rslora,
        use_dora=spec.kind == "dora",
        target_modules=list(spec.target_modules),
        task_type="CAUSAL_LM",
    )


def _randomize(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in params:
            if "lora_B" in key:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "magnitude" in key:
                p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g))


def _our_logits(model, name: str) -> torch.Tensor:
    batch = FusedBatch.from_sequences(ROWS, adapters=[name] * len(ROWS))
    with torch.no_grad():
        return model.forward_packed(batch.input_ids, batch).view(len(ROWS), len(ROWS[0]), -1)


@pytest.mark.parametrize("kind", list(SPECS))
def test_saved_adapter_loads_in_peft_with_equal_logits(kind: str, hf_folder, tmp_path) -> None:
    from peft import PeftModel, get_peft_model, get_peft_model_state_dict

    spec = SPECS[kind]
    model = load_model(hf_folder)
    add_adapter(model, spec)
    params = adapter_parameters(model, "ad")
    _randomize(params.items())
    folder = tmp_path / "adapters" / "ad"
    save_peft(folder, spec, params, base_model_name_or_path=str(hf_folder))
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["ad"]  # no temporary folder left behind

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(_hf(hf_folder), folder)
    bad = [
        str(w.message)
        for w in caught
        if "missing" in str(w.message).lower() or "unexpected" in str(w.message)
    ]
    assert not bad
    loaded = get_peft_model_state_dict(pm)
    assert sorted(loaded) == sorted(params)
    for key, p in params.items():
        torch.testing.assert_close(loaded[key], p.detach(), rtol=0, atol=0)
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ROWS)).logits
    torch.testing.assert_close(_our_logits(model, "ad"), theirs, rtol=1e-5, atol=1e-5)
    assert (_our_logits(model, "ad") - model(torch.tensor(ROWS))).abs().max() > 1e-3  # the adapter matters

    # The config is the one PEFT itself writes for the same settings.
    reference = tmp_path / "peft_own"
    get_peft_model(_hf(hf_folder), _lora_config(spec)).save_pretrained(reference)
    ours_cfg = json.loads((folder / "adapter_config.json").read_text())
    peft_cfg = json.loads((reference / "adapter_config.json").read_text())
    assert ours_cfg.pop("base_model_name_or_path") == str(hf_folder)
    for cfg in (ours_cfg, peft_cfg):
        cfg.pop("peft_version")
        cfg.pop("base_model_name_or_path", None)
        cfg["target_modules"] = sorted(cfg["target_modules"])
    assert ours_cfg == peft_cfg


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_peft_made_adapter_loads_with_equal_logits(kind: str, hf_folder, tmp_path) -> None:
    from peft import get_peft_model

    spec = SPECS[kind]
    pm = get_peft_model(_hf(hf_folder), _lora_config(spec))
    _randomize([(n, p) for n, p in pm.named_parameters() if p.requires_grad], seed=3)
    pm.save_pretrained(tmp_path / "made_by_peft")
    pm.eval()
    with torch.no_grad():
        theirs = pm(input_ids=torch.tensor(ROWS)).logits

    model = load_model(hf_folder)
    got = load_peft(
        model, tmp_path / "made_by_peft", "resumed", expect=AdapterSpec("resumed", **_fields(spec))
    )
    assert got == AdapterSpec("resumed", **_fields(spec))
    torch.testing.assert_close(_our_logits(model, "resumed"), theirs, rtol=1e-5, atol=1e-5)

    # A pipeline stage loads only its own layers, with the same values.
    _, state = read_peft(tmp_path / "made_by_peft", "x")
    stage = load_model(hf_folder, first_layer=1, last_layer=3)
    load_peft(stage, tmp_path / "made_by_peft", "resumed")
    stage_params = adapter_parameters(stage, "resumed")
    assert stage_params and all(".layers.0." not in k for k in stage_params)
    for key, p in stage_params.items():
        torch.testing.assert_close(p.detach(), state[key], rtol=0, atol=0)


def _fields(spec: AdapterSpec) -> dict:
    return {f: getattr(spec, f) for f in ("kind", "rank", "alpha", "dropout", "use_rslora", "target_modules")}


def test_round_trip_and_replacing_an_adapter(hf_folder, tmp_path) -> None:
    spec = SPECS["dora"]
    model = load_model(hf_folder)
    add_adapter(model, spec)
    params = adapter_parameters(model, "ad")
    _randomize(params.items())
    folder = tmp_path / "ad"
    save_peft(folder, spec, params)
    spec2, state = read_peft(folder, "ad")
    assert spec2 == spec
    assert sorted(state) == sorted(params)
    assert all(torch.equal(state[k], p.detach()) for k, p in params.items())
    smaller = AdapterSpec("ad", rank=2, target_modules=("q_proj",))
    add_adapter(model, AdapterSpec("small", rank=2, target_modules=("q_proj",)))
    save_peft(folder, smaller, {k: v for k, v in adapter_parameters(model, "small").items()})
    assert read_peft(folder, "ad")[0] == smaller
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match="refusing to replace"):
        save_peft(tmp_path / "notes", smaller, adapter_parameters(model, "small"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "precious"


def test_bad_state_to_save(hf_folder, tmp_path) -> None:
    model = load_model(hf_folder)
    spec = SPECS["dora"]
    add_adapter(model, spec)
    params = adapter_parameters(model, "ad")
    with pytest.raises(ValueError, match="'ad'.*no weights"):
        save_peft(tmp_path / "x", spec, {})
    wrong_rank = AdapterSpec("ad", kind="dora", rank=3, alpha=4, target_modules=spec.target_modules)
    with pytest.raises(ValueError, match="'ad'.*rank is 3"):
        save_peft(tmp_path / "x", wrong_rank, params)
    as_lora = AdapterSpec("ad", rank=2, alpha=4, target_modules=spec.target_modules)
    with pytest.raises(ValueError, match="'ad'.*kind 'lora' needs"):
        save_peft(tmp_path / "x", as_lora, params)
    with pytest.raises(ValueError, match="'ad'.*not a LoRA key"):
        save_peft(tmp_path / "x", spec, {"model.layers.0.q_proj.weight": torch.zeros(2, 2)})
    assert not (tmp_path / "x").exists()


def test_expect_mismatch_names_the_field(hf_folder, tmp_path) -> None:
    spec = SPECS["lora"]
    model = load_model(hf_folder)
    add_adapter(model, spec)
    save_peft(tmp_path / "ad", spec, adapter_parameters(model, "ad"))
    fresh = load_model(hf_folder)
    base = _fields(spec)
    for field, value in [
        ("rank", 8),
        ("kind", "dora"),
        ("use_rslora", True),
        ("alpha", 16.0),
        ("target_modules", ("q_proj", "v_proj")),
    ]:
        expect = AdapterSpec("job", **{**base, field: value})
        with pytest.raises(ValueError, match=f"adapter 'job': {field} is"):
            load_peft(fresh, tmp_path / "ad", "job", expect=expect)
    assert adapter_names(fresh) == []
    got = load_peft(fresh, tmp_path / "ad", "job", expect=AdapterSpec("job", **{**base, "dropout": 0.2}))
    assert got.dropout == 0.2  # dropout is a training choice, not part of the adapter


def test_broken_folders(hf_folder, tmp_path) -> None:
    from safetensors.torch import save_file

    spec = SPECS["lora"]
    model = load_model(hf_folder)
    add_adapter(model, spec)
    params = {k: v.detach().clone() for k, v in adapter_parameters(model, "ad").items()}
    good = tmp_path / "good"
    save_peft(good, spec, params)
    cfg = json.loads((good / "adapter_config.json").read_text())

    def folder(name: str, config: dict | str | None = cfg, weights: dict | bytes | None = params):
        f = tmp_path / name
        f.mkdir()
        if config is not None:
            (f / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if isinstance(weights, bytes):
            (f / "adapter_model.safetensors").write_bytes(weights)
        elif weights is not None:
            save_file(weights, str(f / "adapter_model.safetensors"))
        return f

    raw = (good / "adapter_model.safetensors").read_bytes()
    big = {k: torch.zeros(v.shape[0], 40) if "lora_A" in k else v for k, v in params.items()}
    cases = [
        (tmp_path / "nowhere", "no adapter_config.json"),
        (folder("no_config", config=None), "no adapter_config.json"),
        (folder("bad_json", config="{not json"), "not valid JSON"),
        (folder("ia3", config={**cfg, "peft_type": "IA3"}), "'IA3' adapter"),
        (folder("pattern", config={**cfg, "rank_pattern": {"q_proj": 8}}), "rank_pattern"),
        (
            folder("lm_head", config={**cfg, "target_modules": ["q_proj", "lm_head"]}),
            r"targets \['lm_head'\]",
        ),
        (folder("no_weights", weights=None), "no adapter_model.safetensors"),
        (folder("truncated", weights=raw[: len(raw) // 2]), "cannot read the weights"),
        (folder("rank", config={**cfg, "r": 3}), "rank is 3"),
        (
            folder("extra", weights={**params, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}),
            "not a LoRA key",
        ),
        (
            folder("layers", weights={k.replace("layers.2.", "layers.7."): v for k, v in params.items()}),
            "layers \\[7\\]",
        ),
        (folder("shape", weights=big), "shape"),
        (folder("missing", weights={k: v for k, v in params.items() if ".layers.1." not in k}), "lacks"),
    ]
    fresh = load_model(hf_folder)
    for path, pattern in cases:
        with pytest.raises(ValueError, match=f"adapter 'ad'.*{pattern}"):
            load_peft(fresh, path, "ad")
        assert adapter_names(fresh) == []  # a failed load leaves nothing behind
