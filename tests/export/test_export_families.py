"""``lorafleet export`` and ``init_from`` of Gemma 2/3, Phi-3/4, Mixtral and Qwen3-MoE adapters (issue 16).

Oracles: transformers 5 + HF PEFT (expert LoRA through PEFT's ``target_parameters``) for the adapter's logits
and for the merged model's, on tiny random models in float32 (<= 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY_VOCAB
from helpers.adapters import random_adapter
from helpers.peft_oracle import peft_init
from lorafleet import FusedBatch
from lorafleet.cli import main
from lorafleet.lora import adapter_parameters, load_peft, save_peft
from lorafleet.models import load_model

ATOL = 1e-5  # float32, relative to the largest logit when that is above 1 (Gemma's are capped at 3)
ROWS = [[5, 17, 42, 99, 7, 250, 3, 64, 11, 200, 31, 8, 77], [9, 1, 300, 45, 2, 66, 128, 13, 90, 4, 5, 6, 7]]
_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
# (family, adapter kind): the adapter's spec. 13-token rows pass Gemma's window of 4 and Phi's original
# context of 8; the MoE adapters adapt attention and the experts.
CASES = {
    ("gemma2", "rslora"): dict(rank=4, alpha=8, use_rslora=True, target_modules=_DENSE),
    ("gemma3", "lora"): dict(rank=4, alpha=8, target_modules=_DENSE),
    ("gemma3", "dora"): dict(kind="dora", rank=2, alpha=4, target_modules=("q_proj", "v_proj", "down_proj")),
    ("phi3", "lora"): dict(
        rank=4, alpha=8, target_modules=("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    ),
    ("phi3", "dora"): dict(kind="dora", rank=2, alpha=4, target_modules=("qkv_proj", "gate_up_proj")),
    ("mixtral", "lora"): dict(rank=4, alpha=8, target_modules=("q_proj", "v_proj", *_EXPERTS)),
    ("qwen3_moe", "rslora"): dict(
        rank=2, alpha=4, use_rslora=True, target_modules=("k_proj", "o_proj", *_EXPERTS)
    ),
    ("qwen3_moe", "lora"): dict(rank=4, alpha=8, target_modules=("q_proj", "experts.gate_up_proj")),
}


def run_cli(*args) -> int:
    return main(["export", *map(str, args)])


def ours(base: Path, adapter: Path | None) -> torch.Tensor:
    """lorafleet's logits [rows, len, vocab] of ``base`` with the PEFT folder ``adapter`` (as init_from loads it)."""
    model = load_model(base)
    name = None
    if adapter is not None:
        name = load_peft(model, adapter, "a").name
    batch = FusedBatch.from_sequences(ROWS, adapters=[name] * len(ROWS))
    with torch.no_grad():
        return model.forward_packed(batch.input_ids, batch).view(len(ROWS), len(ROWS[0]), TINY_VOCAB)


def transformers_model(folder: Path, adapter: Path | None = None, merge: bool = False):
    """transformers' model of ``folder``, with HF PEFT's ``adapter`` on it (folded in by PEFT with ``merge``)."""
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
        if merge:
            model = model.merge_and_unload()
    return model.eval()


def transformers_logits(folder: Path, adapter: Path | None = None, merge: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return transformers_model(folder, adapter, merge)(torch.tensor(ROWS)).logits


@pytest.mark.parametrize(("family", "kind"), list(CASES))
def test_export_and_merge_equal_transformers_and_peft(family_bases, family, kind, tmp_path):
    """The exported PEFT folder in transformers + PEFT, and the merged folder in transformers and in lorafleet,
    give lorafleet's logits of base + adapter."""
    base = family_bases[family]
    random_adapter(base, tmp_path / "a", seed=7, **CASES[(family, kind)])
    want = ours(base, tmp_path / "a")
    assert (want - ours(base, None)).abs().max() > 1e-2  # the adapter changes the output

    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "peft") == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    experts = sorted(t for t in CASES[(family, kind)]["target_modules"] if t.startswith("experts."))
    assert cfg["target_parameters"] == (experts or None)
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    peft = transformers_logits(base, tmp_path / "peft")
    err_peft = (peft - want).abs().max().item()
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "merged", "--merge") == 0
    # The merged folder holds PEFT's merge_and_unload weights; its logits are those of PEFT's merged model
    # and, up to float32 rounding of W + s * B A (measured up to ~3e-5 on Gemma 2), of base + adapter.
    peft_merged = transformers_model(base, tmp_path / "peft", merge=True).state_dict()
    merged = transformers_model(tmp_path / "merged").state_dict()
    assert sorted(merged) == sorted(peft_merged)
    err_w = max((merged[k] - peft_merged[k]).abs().max().item() for k in merged)
    merged_hf = transformers_logits(tmp_path / "merged")
    err_hf = (merged_hf - transformers_logits(base, tmp_path / "peft", merge=True)).abs().max().item()
    err_ours = (ours(tmp_path / "merged", None) - merged_hf).abs().max().item()
    err_sum = (merged_hf - want).abs().max().item()
    print(f"{family} {kind}: PEFT export {err_peft:.1e}; merged: weights vs PEFT's merge {err_w:.1e}, logits vs "
          f"PEFT's merged model {err_hf:.1e}, lorafleet vs transformers {err_ours:.1e}, vs base + adapter {err_sum:.1e}")  # fmt: skip
    scale = max(1.0, want.abs().max().item())
    assert max(err_peft, err_w, err_hf, err_ours) <= ATOL * scale
    assert err_sum <= 1e-4 * scale
    if family in ("mixtral", "qwen3_moe"):  # the merged folder is in the layout save_pretrained writes
        names = load_file(str(tmp_path / "merged" / "model.safetensors"))
        assert sorted(names) == sorted(load_file(str(base / "model.safetensors")))


# family -> (rank, alpha, targets, rslora, dora) of an adapter made by PEFT itself
PEFT_MADE = {
    "gemma2": (4, 8, ["q_proj", "k_proj", "down_proj"], False, False),
    "gemma3": (2, 4, ["v_proj", "o_proj", "gate_proj"], True, True),
    "phi3": (4, 8, ["qkv_proj", "gate_up_proj", "down_proj"], False, False),
    "mixtral": (4, 8, ["q_proj", "o_proj", *_EXPERTS], False, False),
    "qwen3_moe": (2, 4, ["q_proj", "v_proj", "experts.down_proj"], True, False),
}


@pytest.mark.parametrize("family", list(PEFT_MADE))
def test_init_from_a_peft_folder_loads_back_equal(family_bases, family, tmp_path):
    """A folder PEFT wrote: init_from's loading gives PEFT's logits and its exact tensors, and lorafleet's
    save (and ``lorafleet export``) writes them back unchanged."""
    base = family_bases[family]
    rank, alpha, targets, rslora, dora = PEFT_MADE[family]
    peft_init(base, tmp_path, "p", rank, alpha, targets, rslora, seed=3, dora=dora)
    peft_dir = tmp_path / "p"
    theirs = load_file(str(peft_dir / "adapter_model.safetensors"))
    model = load_model(base)
    spec = load_peft(model, peft_dir, "p")
    assert (
        sorted(spec.target_modules) == sorted(targets)
        and spec.rank == rank
        and spec.kind == ("dora" if dora else "lora")
    )
    params = {k: p.detach() for k, p in adapter_parameters(model, "p").items()}
    assert sorted(params) == sorted(k.removesuffix(".weight") if "magnitude" in k else k for k in theirs)
    for key, t in theirs.items():
        assert torch.equal(params[key.removesuffix(".weight") if "magnitude" in key else key], t), key
    want = transformers_logits(base, peft_dir)
    err = (ours(base, peft_dir) - want).abs().max().item()
    print(f"{family}: init_from of PEFT's folder vs PEFT {err:.1e} (largest logit {want.abs().max():.2f})")
    assert err <= ATOL * max(1.0, want.abs().max().item())

    save_peft(tmp_path / "back", spec, params, str(base))
    assert run_cli("--adapter", peft_dir, "--output", tmp_path / "exported") == 0
    for folder in ("back", "exported"):
        again = load_file(str(tmp_path / folder / "adapter_model.safetensors"))
        assert sorted(again) == sorted(params) and all(torch.equal(again[k], params[k]) for k in params)
        assert (
            transformers_logits(base, tmp_path / folder) - transformers_logits(base, peft_dir)
        ).abs().max() == 0


def test_what_peft_cannot_represent_is_refused_with_the_target_and_reason(family_bases, tmp_path, capsys):
    """LoRA on a Qwen3-MoE dense layer's down_proj: PEFT 0.21 on transformers 5 reads the name as transformers
    4's per-expert down_proj and moves it onto the experts, so a PEFT export is refused (merging is fine)."""
    base = family_bases["qwen3_moe"]
    random_adapter(base, tmp_path / "a", seed=7, rank=2, alpha=4, target_modules=("q_proj", "down_proj"))
    want = ours(base, tmp_path / "a")
    assert (transformers_logits(base, tmp_path / "a") - want).abs().max() > 1e-2  # PEFT loads another adapter
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "peft") == 2
    err = capsys.readouterr().err
    assert "['down_proj']" in err and "PEFT" in err and "--merge" in err
    assert not (tmp_path / "peft").exists()
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "merged", "--merge") == 0
    assert (transformers_logits(tmp_path / "merged") - want).abs().max() <= 1e-4


def test_a_transformers_4_per_expert_adapter_is_refused(family_bases, tmp_path, capsys):
    """Mixtral LoRA on each expert's w1/w2/w3 (transformers 4's layout): PEFT converts it to a rank per tensor
    (w1 and w3 stacked at twice the rank), which init_from and export refuse, naming the key and the reason."""
    from safetensors.torch import save_file

    base = family_bases["mixtral"]
    folder = tmp_path / "v4"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(3):
        for e in range(4):
            for w, (o, i) in {"w1": (128, 64), "w2": (64, 128), "w3": (128, 64)}.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                state[f"{key}.lora_A.weight"] = 0.1 * torch.randn(2, i, generator=g)
                state[f"{key}.lora_B.weight"] = 0.1 * torch.randn(o, 2, generator=g)
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"],
              "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base)}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    # the installed PEFT does load it (it is a real format), converting it to the fused experts
    assert (transformers_logits(base, folder) - transformers_logits(base)).abs().max() > 1e-3
    model = load_model(base)
    with pytest.raises(ValueError, match=r"experts\.0\.w1.*transformers 4.*twice the rank"):
        load_peft(model, folder, "v4")
    assert run_cli("--adapter", folder, "--output", tmp_path / "out") == 2
    assert "w1 of each expert" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_adapter_trained_on_experts_exports_for_peft(family_bases, tmp_path):
    """Through the CLI: ``lorafleet train`` of expert LoRA on Mixtral, then ``lorafleet export`` to a PEFT folder
    and a merged folder, both loaded by transformers (+ PEFT) with lorafleet's logits of the trained adapter."""
    import yaml

    base = family_bases["mixtral"]
    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    targets = ["q_proj", "experts.gate_up_proj", "experts.down_proj"]
    cfg = {
        "base_model": {"path": str(base)},
        "output_dir": str(tmp_path / "run"),
        "datasets": [{"name": "d", "path": str(tmp_path / "d.jsonl"), "format": "prompt_completion"}],
        "adapters": [{"name": "t", "rank": 2, "alpha": 4, "dropout": 0.0, "target_modules": targets}],
        "tasks": [
            {
                "name": "t",
                "adapter": "t",
                "dataset": "d",
                "batch_size": 2,
                "max_steps": 2,
                "optimizer": {"lr": 0.05},
            }
        ],
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 0
    adapter = tmp_path / "run" / "adapters" / "t"
    want = ours(base, adapter)
    assert (want - ours(base, None)).abs().max() > 1e-3  # training moved the adapter
    assert run_cli("--adapter", adapter, "--output", tmp_path / "peft") == 0
    assert run_cli("--adapter", adapter, "--output", tmp_path / "merged", "--merge") == 0
    scale = max(1.0, want.abs().max().item())
    assert (transformers_logits(base, tmp_path / "peft") - want).abs().max() <= ATOL * scale
    assert (transformers_logits(tmp_path / "merged") - want).abs().max() <= 1e-4 * scale
