"""The issue's "Must show": a SmolLM2 adapter (the bundled Q4_1 GGUF base) exported three ways.

1. PEFT folder: transformers (its own GGUF loading, from the path the export recorded) + HF PEFT load it with
   no hand-written key mapping, and give lorafleet's base + adapter logits and greedy tokens.
2. Merged HF folder: transformers loads it; it generates the same greedy tokens as base + adapter through
   lorafleet, and through transformers.
3. llama.cpp adapter: the ``gguf`` reader finds llama.cpp's keys and every lora_a / lora_b with its shape.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.adapters import random_adapter
from lorafleet.batch import FusedBatch
from lorafleet.cli import main
from lorafleet.lora import load_peft
from lorafleet.models import load_model
from lorafleet.models.generate import generate
from lorafleet.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


def run_cli(*args) -> int:
    return main(["export", *map(str, args)])


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def exported(smollm2_gguf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smollm2-export")
    # B at 0.3 * N(0, 1) is large for a 576-wide model; a smaller rank-4 update changes answers but keeps text.
    random_adapter(smollm2_gguf, tmp / "adapter", seed=3, rank=4, alpha=16, target_modules=TARGETS)
    assert run_cli("--adapter", tmp / "adapter", "--output", tmp / "peft") == 0
    assert (
        run_cli(
            "--adapter", tmp / "adapter", "--output", tmp / "merged", "--merge", "--max-shard-size", "200MB"
        )
        == 0
    )
    assert run_cli("--adapter", tmp / "adapter", "--output", tmp / "a.gguf", "--gguf") == 0
    tok = load_tokenizer(smollm2_gguf)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True),
                        add_special_tokens=False)  # fmt: skip
    model = load_model(smollm2_gguf)
    load_peft(model, tmp / "adapter", "a")
    (with_adapter,) = generate(model, tok, [prompt], max_new_tokens=12, adapters=["a"])
    (base_only,) = generate(model, tok, [prompt], max_new_tokens=12, adapters=[None])
    with torch.no_grad():
        batch = FusedBatch.from_sequences([prompt], adapters=["a"])
        logits = model.forward_packed(batch.input_ids, batch)[None]
    return dict(tmp=tmp, prompt=prompt, tokens=with_adapter, base_tokens=base_only, logits=logits, tok=tok)


def test_adapter_changes_the_answer(exported):
    assert exported["tokens"] != exported["base_tokens"]


def test_peft_folder_loads_in_transformers_and_peft(exported, smollm2_gguf, smollm2_transformers):
    from peft import PeftModel

    cfg = json.loads((exported["tmp"] / "peft" / "adapter_config.json").read_text())
    base = Path(cfg["base_model_name_or_path"])
    assert base.is_absolute() and base.samefile(smollm2_gguf)  # not pkg:...
    # the recorded path is that file: transformers' GGUF loading of it is the session's (a copy, PEFT wraps it)
    model = copy.deepcopy(smollm2_transformers)
    model = PeftModel.from_pretrained(model, str(exported["tmp"] / "peft")).eval()
    ids = torch.tensor([exported["prompt"]])
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, exported["logits"], atol=2e-3, rtol=1e-3)
    out = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
    assert out == exported["tokens"]


def test_merged_folder_generates_the_same_greedy_tokens(exported):
    import transformers as tf

    merged = exported["tmp"] / "merged"
    assert (
        len(list(merged.glob("*.safetensors"))) >= 2 and (merged / "model.safetensors.index.json").is_file()
    )
    model, tok = load_model(merged), load_tokenizer(merged)
    assert tok.encode(QUESTION) == exported["tok"].encode(QUESTION)
    (ours,) = generate(model, tok, [exported["prompt"]], max_new_tokens=12)
    assert ours == exported["tokens"]
    ref = tf.AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    ids = torch.tensor([exported["prompt"]])
    assert (
        ref.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :].tolist()
        == exported["tokens"]
    )
    ref_tok = tf.AutoTokenizer.from_pretrained(str(merged))
    assert ref_tok(QUESTION)["input_ids"] == tok.encode(QUESTION)


def test_gguf_adapter_has_llama_cpp_names_and_shapes(exported):
    from gguf import GGUFReader

    r = GGUFReader(str(exported["tmp"] / "a.gguf"))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["adapter.type"].contents() == "lora"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)
    shapes = {t.name: list(t.shape) for t in r.tensors}
    assert len(shapes) == 30 * 7 * 2
    out = {"attn_q": 576, "attn_k": 192, "attn_v": 192, "attn_output": 576, "ffn_gate": 1536, "ffn_up": 1536}
    out |= {"ffn_down": 576}
    inp = dict.fromkeys(out, 576) | {"ffn_down": 1536}
    for layer in (0, 17, 29):
        for name in out:
            assert shapes[f"blk.{layer}.{name}.weight.lora_a"] == [inp[name], 4]
            assert shapes[f"blk.{layer}.{name}.weight.lora_b"] == [4, out[name]]
    t = next(t for t in r.tensors if t.name == "blk.0.attn_v.weight.lora_a")
    from safetensors.torch import load_file

    a = load_file(str(exported["tmp"] / "adapter" / "adapter_model.safetensors"))
    want = a["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].numpy()
    np.testing.assert_array_equal(np.asarray(t.data).reshape(want.shape), want)
