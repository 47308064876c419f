"""What Hugging Face PEFT writes in ``adapter_config.json`` for a lorafleet adapter (no torch).

``lora/peft_format.py`` writes it beside the weights (``save_peft``); the service writes it for a snapshot of
an engine checkpoint (whose folder holds only the weights, under PEFT's keys) without importing torch. The
config carries every field PEFT 0.21 writes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CONFIG_NAME", "PEFT_FORMAT_VERSION", "WEIGHTS_NAME", "peft_adapter_config"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# The PEFT release whose adapter_config.json fields are written.
PEFT_FORMAT_VERSION = "0.21.2"
# MoE expert tensors (lora/experts.py EXPERT_TARGETS) are PEFT's target_parameters; the rest target_modules.
_EXPERT_PREFIX = "experts."


def peft_adapter_config(
    kind: str,
    rank: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    target_modules: Iterable[str],
    base_model_name_or_path: str | None = None,
) -> dict:
    """The ``adapter_config.json`` dict of an adapter: ``kind`` lora or dora, rank, alpha, dropout, rsLoRA and
    its targets in PEFT's names (expert tensors ``experts.*`` become ``target_parameters``)."""
    targets = list(target_modules)
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    return {
        "alora_invocation_tokens": None,
        "alpha_pattern": {},
        "arrow_config": None,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "corda_config": None,
        "ensure_weight_tying": False,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "kasa_config": None,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": dropout,
        "lora_ga_config": None,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "monteclora_config": None,
        "peft_type": "LORA",
        "peft_version": PEFT_FORMAT_VERSION,
        "qalora_group_size": 16,
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(t for t in targets if not t.startswith(_EXPERT_PREFIX)),
        "target_parameters": sorted(t for t in targets if t.startswith(_EXPERT_PREFIX)) or None,
        "task_type": "CAUSAL_LM",
        "trainable_token_indices": None,
        "use_bdlora": None,
        "use_dora": kind == "dora",
        "use_qalora": False,
        "use_rslora": use_rslora,
        "velora_config": None,
    }
