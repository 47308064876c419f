"""Activation recomputation (the config's ``recompute``): same loss and gradients, far fewer saved activations.

Oracle: the same model and batch without recomputation (plain autograd keeps every activation), with
adapter dropout on, so that recomputation must redraw the very same masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.batch import FusedBatch
from lorafleet.lora import AdapterSpec, add_adapter
from lorafleet.models import Decoder, ModelConfig
from lorafleet.models.recompute import apply_recompute, is_recomputed, remove_recompute

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model() -> Decoder:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    model = Decoder(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    add_adapter(model, AdapterSpec("t0", rank=4, dropout=0.3, target_modules=TARGETS))
    add_adapter(
        model, AdapterSpec("t1", kind="dora", rank=8, dropout=0.1, target_modules=("q_proj", "v_proj"))
    )
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    return model.train()


def _batch() -> tuple[FusedBatch, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (12, 7, 20, 5)]
    batch = FusedBatch.from_sequences(seqs, adapters=["t0", "t0", "t1", None])
    return batch, torch.randint(0, 96, (batch.num_tokens,), generator=g)


def _step(model: Decoder, batch: FusedBatch, labels: torch.Tensor):
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(7)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model.forward_packed(batch.input_ids, batch), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved[0]


def test_recompute_gives_the_same_gradients_with_less_saved():
    model = _model()
    batch, labels = _batch()
    names = list(model.state_dict())
    loss, grads, saved = _step(model, batch, labels)
    assert apply_recompute(model) == 3 and apply_recompute(model) == 3
    assert all(is_recomputed(layer) for layer in model.layers.values())
    assert list(model.state_dict()) == names  # parameter names (checkpoints, PEFT keys) unchanged
    loss_r, grads_r, saved_r = _step(model, batch, labels)
    assert loss_r == pytest.approx(loss, rel=1e-6)
    assert grads_r.keys() == grads.keys() and len(grads) == 3 * (7 * 2 + 2 * 3)
    for n in grads:
        assert torch.allclose(grads_r[n], grads[n], rtol=1e-5, atol=1e-7), n
    assert saved_r < saved / 3, (saved_r, saved)  # layer inputs only, not every activation
    remove_recompute(model)
    assert not any(is_recomputed(layer) for layer in model.layers.values())
    assert _step(model, batch, labels)[2] == saved


def test_recompute_without_grad_runs_plainly():
    model = _model().eval()
    batch, _ = _batch()
    with torch.no_grad():
        ref = model.forward_packed(batch.input_ids, batch)
        apply_recompute(model)
        assert torch.equal(model.forward_packed(batch.input_ids, batch), ref)


def test_recompute_refuses_other_models():
    with pytest.raises(ValueError, match="lorafleet Decoder"):
        apply_recompute(torch.nn.Linear(2, 2))
