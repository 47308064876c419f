"""Three adapters of different ranks trained together on each new family equal each trained alone by
HF PEFT + torch AdamW (issue 16); on the MoE families with LoRA on attention and on the experts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_tiny_model
from helpers.peft_oracle import engine_config, peft_alone, peft_init, rel_diff
from lorafleet.cli import main as cli_main
from lorafleet.lora.experts import EXPERT_TARGETS

_ALL_DENSE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# family -> adapter -> (rank, alpha, targets, lr, batch_size, micro_batch_size, rows, rslora)
FAMILY_TASKS = {
    "gemma2": {
        "a": (4, 8, ["q_proj", "k_proj"], 1e-2, 4, 4, 9, False),
        "b": (8, 8, _ALL_DENSE, 5e-3, 4, 2, 7, True),
        "c": (2, 4, ["up_proj"], 2e-2, 2, 1, 5, False),
    },
    "gemma3": {
        "a": (4, 8, ["q_proj", "v_proj"], 1e-2, 4, 4, 9, False),
        "b": (8, 8, _ALL_DENSE, 5e-3, 4, 2, 7, True),
        "c": (2, 4, ["o_proj", "down_proj"], 2e-2, 2, 1, 5, False),
    },
    "phi3": {
        "a": (4, 8, ["qkv_proj"], 1e-2, 4, 4, 9, False),
        "b": (8, 8, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], 5e-3, 4, 2, 7, True),
        "c": (2, 4, ["gate_up_proj"], 2e-2, 2, 1, 5, False),
    },
    "mixtral": {
        "a": (4, 8, ["q_proj", "v_proj", *EXPERT_TARGETS], 1e-2, 4, 4, 9, False),
        "b": (8, 8, ["o_proj", "experts.down_proj"], 5e-3, 4, 2, 7, True),
        "c": (2, 4, ["k_proj", "experts.gate_up_proj"], 2e-2, 2, 1, 5, False),
    },
    "qwen3_moe": {
        "a": (4, 8, ["q_proj", "v_proj", *EXPERT_TARGETS], 1e-2, 4, 4, 9, False),
        "b": (8, 8, ["o_proj", "experts.down_proj"], 5e-3, 4, 2, 7, True),
        "c": (2, 4, ["k_proj", "experts.gate_up_proj"], 2e-2, 2, 1, 5, False),
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_TASKS))
def test_together_equals_peft_alone(tmp_path, family):
    tasks = FAMILY_TASKS[family]
    model_dir = tmp_path / "model"
    make_tiny_model(family, model_dir, seed=3)
    for i, (name, (rank, alpha, targets, *_r, rslora)) in enumerate(tasks.items()):
        peft_init(model_dir, tmp_path / "init", name, rank, alpha, targets, rslora, seed=10 + i)
    cfg = engine_config(tmp_path, model_dir, tasks)
    assert cli_main(["train", str(cfg), "--no-progress"]) == 0
    for i, (name, spec) in enumerate(tasks.items()):
        ours = load_file(str(tmp_path / "run" / "adapters" / name / "adapter_model.safetensors"))
        init = load_file(str(tmp_path / "init" / name / "adapter_model.safetensors"))
        ref = peft_alone(model_dir, tmp_path, name, spec, i)
        assert rel_diff(ours, init) > 1e-3, "training must have moved the weights"
        print(f"{family} {name}: relative difference to PEFT alone {rel_diff(ours, ref):.2e}")
        assert rel_diff(ours, ref) <= 1e-4, (family, name, rel_diff(ours, ref))
        if family in ("mixtral", "qwen3_moe") and any(t in EXPERT_TARGETS for t in spec[2]):
            moved = [k for k in ours if ".experts." in k and not torch.equal(ours[k], init[k])]
            assert moved, "the expert adapters must have trained"
