"""Mixed-adapter generation: one batch in which every row has its own adapter (or none) equals generating with
each adapter alone, token for token (greedy), and equals a plain greedy loop over HF PEFT (no cache).

Also ``lorafleet generate --adapter ... --adapter ...``: the answers side by side, each equal to generating
with that adapter alone.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.cli import main as cli_main
from lorafleet.lora import AdapterSpec, adapter_parameters, add_adapter, load_peft, save_peft
from lorafleet.models import load_model
from lorafleet.models.generate import generate
from lorafleet.models.tokenizer import load_tokenizer

ADAPTERS = {
    "lo": AdapterSpec(name="lo", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj", "o_proj")),
    "all": AdapterSpec(
        name="all",
        rank=2,
        alpha=4.0,
        use_rslora=True,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    ),
    "dora": AdapterSpec(name="dora", kind="dora", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")),
}
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    """The adapters with random non-zero weights, saved in PEFT's format."""
    model = load_model(tiny_model_dir)
    out = tmp_path_factory.mktemp("gen_adapters")
    g = torch.Generator().manual_seed(3)
    for spec in ADAPTERS.values():
        add_adapter(model, spec)
        params = adapter_parameters(model, spec.name)
        with torch.no_grad():
            for key, p in params.items():
                scale = 0.05 if key.endswith("lora_magnitude_vector") else 0.3
                p.add_(scale * torch.randn(p.shape, generator=g))
        save_peft(out / spec.name, spec, {k: p.detach() for k, p in params.items()})
    return out


def _prompts(tokenizer) -> list[list[int]]:
    texts = ["What is the capital of France?", "Hello", "The quick brown fox jumps over the lazy dog, 12345"]
    return [tokenizer.encode(t, add_special_tokens=True) for t in texts]


def _hf_greedy(pm, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding the plain way: the whole sequence through the model at every step, no cache."""
    ids = list(prompt)
    for _ in range(n):
        logits = pm(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.mark.slow
def test_mixed_batch_equals_each_adapter_alone_and_peft(tiny_model_dir, saved):
    import transformers as tf
    from peft import PeftModel

    model = load_model(tiny_model_dir)
    for name in ADAPTERS:
        load_peft(model, saved / name, name)
    tok = load_tokenizer(tiny_model_dir)
    prompts = _prompts(tok)
    # Interleaved on purpose: rows of one adapter are not adjacent in the caller's order.
    rows = [(p, a) for p in range(len(prompts)) for a in [None, "lo", "all", "dora"]]
    mixed = generate(
        model, tok, [prompts[p] for p, _ in rows], NEW_TOKENS, adapters=[a for _, a in rows], stop_ids=[]
    )
    assert all(len(m) == NEW_TOKENS for m in mixed)

    alone = {}
    for adapter in [None, *ADAPTERS]:
        outs = generate(model, tok, prompts, NEW_TOKENS, adapters=[adapter] * len(prompts), stop_ids=[])
        for p, out in enumerate(outs):
            alone[(p, adapter)] = out
    for (p, a), out in zip(rows, mixed):
        assert out == alone[(p, a)], f"prompt {p}, adapter {a}"
    # The adapters make a difference (otherwise the comparison above proves little).
    assert len({tuple(alone[(0, a)]) for a in [None, *ADAPTERS]}) == 4

    base = tf.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p, prompt in enumerate(prompts):
            assert alone[(p, None)] == _hf_greedy(base, prompt, NEW_TOKENS)
        pm = PeftModel.from_pretrained(base, saved / "lo", adapter_name="lo")
        for name in ("all", "dora"):
            pm.load_adapter(saved / name, adapter_name=name)
        pm.eval()
        for name in ADAPTERS:
            pm.set_adapter(name)
            for p, prompt in enumerate(prompts):
                assert alone[(p, name)] == _hf_greedy(pm, prompt, NEW_TOKENS), f"prompt {p}, adapter {name}"


def test_cli_generate_several_adapters_side_by_side(tiny_model_dir, saved, capsys):
    model = load_model(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    for name in ("lo", "dora"):
        load_peft(model, saved / name, name)
    prompt = "Hello"
    ids = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True),
        add_special_tokens=False,
    )
    expected = {}
    for adapter in (None, "lo", "dora"):
        out = generate(model, tok, [ids], 8, adapters=[adapter])[0]
        expected[adapter or "base"] = tok.decode(out, skip_special_tokens=True).strip()

    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "8"]
    argv += ["--adapter", "base", "--adapter", str(saved / "lo"), "--adapter", f"d={saved / 'dora'}"]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for label, answer in (("base", expected["base"]), ("lo", expected["lo"]), ("d", expected["dora"])):
        row = [ln for ln in lines if ln.startswith(f"[{label}]")]
        assert row, text
        assert row[0][len(f"[{label}]") :].strip() == answer.replace("\n", " ")


def test_cli_generate_bad_adapter_folder(tiny_model_dir, tmp_path, capsys):
    argv = ["generate", "--model", str(tiny_model_dir), "--prompt", "Hi", "--adapter", str(tmp_path / "nope")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "adapter_config.json" in err
