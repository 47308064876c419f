"""Mixed-adapter generation on each new family (issue 16): one batch whose rows each have their own adapter
(or none) equals generating with each adapter alone, and that equals PEFT's greedy ``generate``."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY_NEW_FAMILIES, make_tiny_model
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, load_peft, save_peft
from lorafleet.models import load_model
from lorafleet.models.generate import generate
from lorafleet.models.tokenizer import load_tokenizer

_DENSE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MOE = (("q_proj", "experts.gate_up_proj", "experts.down_proj"), ("o_proj", "experts.down_proj"))
TARGETS = {
    "gemma2": (("q_proj", "v_proj"), _DENSE),
    "gemma3": (("q_proj", "v_proj"), _DENSE),
    "phi3": (("qkv_proj",), ("o_proj", "gate_up_proj", "down_proj")),
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
}
NEW_TOKENS = 10


def _saved(model_dir, out, family):
    model = load_model(model_dir)
    g = torch.Generator().manual_seed(7)
    specs = [
        AdapterSpec("x", rank=4, alpha=8.0, target_modules=TARGETS[family][0]),
        AdapterSpec("y", rank=2, alpha=4.0, use_rslora=True, target_modules=TARGETS[family][1]),
    ]
    for spec in specs:
        add_adapter(model, spec)
        params = adapter_parameters(model, spec.name)
        with torch.no_grad():
            for p in params.values():
                p.add_(0.3 * torch.randn(p.shape, generator=g))
        save_peft(out / spec.name, spec, {k: p.detach() for k, p in params.items()})


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_NEW_FAMILIES)
def test_mixed_generation_equals_alone_and_peft_greedy(tmp_path, family):
    import transformers as tf
    from peft import PeftModel

    model_dir = tmp_path / "model"
    make_tiny_model(family, model_dir, seed=5)
    _saved(model_dir, tmp_path, family)
    model = load_model(model_dir)
    for name in ("x", "y"):
        load_peft(model, tmp_path / name, name)
    tok = load_tokenizer(model_dir)
    texts = ["Hello", "The quick brown fox jumps over the lazy dog, 12345"]
    prompts = [tok.encode(t, add_special_tokens=True) for t in texts]
    rows = [(p, a) for p in range(len(prompts)) for a in [None, "x", "y"]]
    mixed = generate(
        model, tok, [prompts[p] for p, _ in rows], NEW_TOKENS, adapters=[a for _, a in rows], stop_ids=[]
    )
    alone = {}
    for adapter in [None, "x", "y"]:
        outs = generate(model, tok, prompts, NEW_TOKENS, adapters=[adapter] * len(prompts), stop_ids=[])
        alone.update({(p, adapter): out for p, out in enumerate(outs)})
    for (p, a), out in zip(rows, mixed):
        assert out == alone[(p, a)], f"prompt {p}, adapter {a}"
    assert len({tuple(alone[(1, a)]) for a in [None, "x", "y"]}) == 3  # the adapters change the answer
    for adapter in [None, "x", "y"]:
        hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None  # as stop_ids=[]: exactly NEW_TOKENS tokens
        if adapter is not None:
            hf = PeftModel.from_pretrained(hf, tmp_path / adapter).eval()
        for p, prompt in enumerate(prompts):
            with torch.no_grad():
                ref = hf.generate(
                    input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    max_new_tokens=NEW_TOKENS, do_sample=False,
                )  # fmt: skip
            assert alone[(p, adapter)] == ref[0, len(prompt) :].tolist(), f"prompt {p}, adapter {adapter}"
