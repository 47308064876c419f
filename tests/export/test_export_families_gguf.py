"""``lorafleet export --gguf`` of Gemma 2/3, Phi-3/4, Mixtral and Qwen3-MoE adapters (issue 16).

Oracle: the ``gguf`` package's reader for names, shapes and metadata, and for values the weight update that
llama.cpp applies (``alpha / rank * B @ A`` per tensor, per expert for ``*_exps``, rank read from B) equal to
HF PEFT's own merge (``merge_and_unload`` minus the base) of the same adapter in transformers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import make_tiny_model
from helpers.adapters import random_adapter
from lorafleet.cli import main

_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
# family -> (llama.cpp architecture, whether it interleaves q/k rows, adapter targets)
FAMILIES = {
    "gemma2": (
        "gemma2",
        False,
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "gemma3": ("gemma3", False, ("q_proj", "k_proj", "o_proj", "up_proj")),
    "phi3": ("phi3", False, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "mixtral": ("llama", True, ("q_proj", "k_proj", "v_proj", *_EXPERTS)),
    "qwen3_moe": ("qwen3moe", False, ("q_proj", "k_proj", *_EXPERTS)),
}
# llama.cpp's tensor -> (transformers parameter inside model.layers.N, rows of it: "gate" / "up" halves)
HF_OF = {
    "attn_q": ("self_attn.q_proj.weight", None),
    "attn_k": ("self_attn.k_proj.weight", None),
    "attn_v": ("self_attn.v_proj.weight", None),
    "attn_output": ("self_attn.o_proj.weight", None),
    "attn_qkv": ("self_attn.qkv_proj.weight", None),
    "ffn_gate": ("mlp.gate_proj.weight", None),
    "ffn_up": ("mlp.up_proj.weight", None),
    "ffn_down": ("mlp.down_proj.weight", None),
    "ffn_gate_exps": ("mlp.experts.gate_up_proj", "gate"),
    "ffn_up_exps": ("mlp.experts.gate_up_proj", "up"),
    "ffn_down_exps": ("mlp.experts.down_proj", None),
}
# our target -> llama.cpp's tensors
GGUF_OF = {
    "q_proj": ["attn_q"], "k_proj": ["attn_k"], "v_proj": ["attn_v"], "o_proj": ["attn_output"],
    "qkv_proj": ["attn_qkv"], "gate_proj": ["ffn_gate"], "up_proj": ["ffn_up"], "down_proj": ["ffn_down"],
    "gate_up_proj": ["ffn_up"], "experts.gate_up_proj": ["ffn_gate_exps", "ffn_up_exps"],
    "experts.down_proj": ["ffn_down_exps"],
}  # fmt: skip


def _llama_cpp_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows in llama.cpp's order: per head, row h * P + i goes to row 2 * i + h."""
    p = w.shape[0] // heads // 2
    return w.reshape(heads, 2, p, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_adapter_has_llama_cpp_names_shapes_and_update(family_bases, family, tmp_path):
    import transformers as tf
    from gguf import GGUFReader
    from peft import PeftModel

    base = family_bases[family]
    arch, permuted, targets = FAMILIES[family]
    spec = random_adapter(
        base, tmp_path / "a", seed=3, rank=4, alpha=8, use_rslora=True, target_modules=targets
    )
    assert (
        main(["export", "--adapter", str(tmp_path / "a"), "--output", str(tmp_path / "a.gguf"), "--gguf"])
        == 0
    )
    r = GGUFReader(str(tmp_path / "a.gguf"))
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    alpha = r.fields["adapter.lora.alpha"].contents()
    tensors = {t.name: t for t in r.tensors}
    dense = {1} if family == "qwen3_moe" else set()  # its mlp_only_layers: no experts there
    want = {
        f"blk.{n}.{g}.weight.lora_{ab}"
        for n in range(3) for t in targets for g in GGUF_OF[t] for ab in "ab"
        if not (n in dense and t in _EXPERTS)
    }  # fmt: skip
    assert set(tensors) == want

    hf = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    base_sd = {k: v.clone() for k, v in hf.state_dict().items()}
    merged = PeftModel.from_pretrained(hf, str(tmp_path / "a")).merge_and_unload().state_dict()
    cfg = hf.config
    worst = 0.0
    for name in sorted(want):
        if not name.endswith("lora_a"):
            continue
        ta, tb = tensors[name], tensors[name.replace("lora_a", "lora_b")]
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        a = torch.from_numpy(np.asarray(ta.data, dtype=np.float32).reshape(list(reversed(ta.shape.tolist()))))
        b = torch.from_numpy(np.asarray(tb.data, dtype=np.float32).reshape(list(reversed(tb.shape.tolist()))))
        rank = int(tb.shape[0])  # llama.cpp: b->ne[0]
        assert rank == spec.rank and int(ta.shape[1]) == rank
        delta = alpha / rank * (b @ a)  # [out, in], or [E, out, in] for the experts (mul_mat_id)
        param, half = HF_OF[kind]
        if family == "phi3" and kind == "ffn_up":  # llama.cpp's phi3 ffn_up is the fused gate_up_proj
            param = "mlp.gate_up_proj.weight"
        key = f"model.layers.{layer}.{param}"
        peft_delta = merged[key] - base_sd[key]
        if half is not None:
            peft_delta = peft_delta.chunk(2, dim=1)[0 if half == "gate" else 1]
        if kind.endswith("_exps"):  # 3-D, experts outermost: ne [in, r, E] and [r, out, E]
            e, o, i = peft_delta.shape
            assert list(ta.shape) == [i, rank, e] and list(tb.shape) == [rank, o, e]
        else:
            assert list(ta.shape) == [peft_delta.shape[1], rank] and list(tb.shape) == [
                rank,
                peft_delta.shape[0],
            ]
        if permuted and kind in ("attn_q", "attn_k"):
            heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
            peft_delta = _llama_cpp_rows(peft_delta, heads)
        assert peft_delta.abs().max() > 1e-3, name  # the adapter changes this tensor
        worst = max(worst, (delta - peft_delta).abs().max().item())
    print(f"{family}: {len(want)} tensors, llama.cpp's update vs PEFT's merge {worst:.1e}")
    assert worst <= 1e-5
    assert math.isclose(alpha / spec.rank, spec.scaling, rel_tol=1e-6)


def test_what_llama_cpp_cannot_hold_is_refused(family_bases, tmp_path, capsys):
    """Qwen3-MoE's dense layer has no llama.cpp tensor; merged GGUF models of the new families are refused."""
    random_adapter(family_bases["qwen3_moe"], tmp_path / "q", rank=2, target_modules=("q_proj", "down_proj"))
    assert (
        main(["export", "--adapter", str(tmp_path / "q"), "--output", str(tmp_path / "q.gguf"), "--gguf"])
        == 2
    )
    err = capsys.readouterr().err
    assert "layers.1.mlp.down_proj" in err and "blk.1.ffn_down" in err and "qwen3moe" in err
    reasons = {
        "gemma2": "norm weights",
        "gemma3": "norm weights",
        "phi3": "LongRoPE",
        "qwen3_moe": "dense MLP",
    }
    for family, reason in reasons.items():  # the fixture's Qwen3-MoE has a dense layer 1
        random_adapter(family_bases[family], tmp_path / family, rank=2, target_modules=("o_proj",))
        out = tmp_path / f"{family}.gguf"
        args = ["export", "--adapter", str(tmp_path / family), "--output", str(out), "--merge", "--gguf"]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert reason in err and "--merge without --gguf" in err, family
    q = tmp_path / "q_all_moe"  # every layer MoE, but top-k weights not renormalised
    make_tiny_model("qwen3_moe", q, seed=6, norm_topk_prob=False, mlp_only_layers=[])
    random_adapter(q, tmp_path / "qa", rank=2, target_modules=("o_proj",))
    args = [
        "export",
        "--adapter",
        str(tmp_path / "qa"),
        "--output",
        str(tmp_path / "qa.gguf"),
        "--merge",
        "--gguf",
    ]
    assert main(args) == 2
    assert "norm_topk_prob" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf"))


# transformers' name inside model.layers.N -> llama.cpp's name inside blk.N (a merged MoE model)
_MODEL_TENSORS = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output", "self_attn.q_norm.weight": "attn_q_norm",
    "self_attn.k_norm.weight": "attn_k_norm", "mlp.gate.weight": "ffn_gate_inp",
    "mlp.experts.down_proj": "ffn_down_exps",
}  # fmt: skip


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_merged_moe_gguf_holds_peft_merged_weights_in_llama_cpp_layout(family_bases, family, tmp_path):
    import transformers as tf
    from gguf import GGUFReader
    from peft import PeftModel

    base = family_bases["mixtral"]
    if family == "qwen3_moe":  # llama.cpp's qwen3moe: experts in every layer, top-k weights renormalised
        base = tmp_path / "base"
        make_tiny_model("qwen3_moe", base, seed=5, norm_topk_prob=True, mlp_only_layers=[])
    arch, permuted, _ = FAMILIES[family]
    random_adapter(
        base, tmp_path / "a", seed=3, rank=4, alpha=8, target_modules=("q_proj", "k_proj", *_EXPERTS)
    )
    out = tmp_path / "m.gguf"
    args = ["export", "--adapter", str(tmp_path / "a"), "--output", str(out), "--merge", "--gguf"]
    assert main([*args, "--dtype", "float32"]) == 0
    r = GGUFReader(str(out))
    hf = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = hf.config
    merged = PeftModel.from_pretrained(hf, str(tmp_path / "a")).merge_and_unload().state_dict()
    field = {k: r.fields[k].contents() for k in r.fields if not k.startswith("tokenizer.ggml.")}
    assert field["general.architecture"] == arch and field["general.type"] == "model"
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    n_exp = cfg.num_local_experts if family == "mixtral" else cfg.num_experts
    want_kv = {"block_count": 3, "expert_count": n_exp, "expert_used_count": 2, "embedding_length": 64,
               "attention.head_count": 4, "attention.head_count_kv": 2, "rope.freq_base": cfg.rope_parameters["rope_theta"]}  # fmt: skip
    if family == "qwen3_moe":
        want_kv |= {"expert_feed_forward_length": 32, "attention.key_length": 16}
    for key, value in want_kv.items():
        assert field[f"{arch}.{key}"] == pytest.approx(value), key
    want = {"token_embd.weight": merged["model.embed_tokens.weight"], "output_norm.weight": merged["model.norm.weight"],
            "output.weight": merged["lm_head.weight"]}  # fmt: skip
    for name, t in merged.items():
        if not name.startswith("model.layers."):
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest == "mlp.experts.gate_up_proj":
            gate, up = t.chunk(2, dim=1)
            want[f"blk.{layer}.ffn_gate_exps.weight"], want[f"blk.{layer}.ffn_up_exps.weight"] = gate, up
            continue
        if permuted and rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight"):
            t = _llama_cpp_rows(t, cfg.num_attention_heads if "q_proj" in rest else cfg.num_key_value_heads)
        want[f"blk.{layer}.{_MODEL_TENSORS[rest]}.weight"] = t
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == set(want)
    for name, t in want.items():
        got = tensors[name]
        assert list(reversed(got.shape.tolist())) == list(t.shape), name
        data = np.asarray(got.data, dtype=np.float32).reshape(t.shape)
        np.testing.assert_allclose(data, t.numpy(), rtol=0, atol=1e-6, err_msg=name)
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    # the adapter moved the experts: the file holds the merged experts, not the base's
    base_sd = tf.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).state_dict()
    assert (
        merged["model.layers.0.mlp.experts.down_proj"] - base_sd["model.layers.0.mlp.experts.down_proj"]
    ).abs().max() > 1e-3
