"""Activation recomputation per decoder layer (the config's ``recompute: true``), applied from outside the model.

    from lorafleet.models.recompute import apply_recompute
    apply_recompute(model)      # each layer keeps only its input; the backward reruns its forward

Without it, a fused micro-batch holds every activation of every layer until its backward (about 0.8 MiB per
token for a hidden size of 1024 and 8 layers), and a pipeline stage holds that for each of its
``pipeline.max_in_flight`` micro-batches in flight. With it, a layer keeps only its input hidden states
[T, E] and runs its forward again, inside the backward, to rebuild the rest (about one more forward per
step), so the memory of a step grows far slower with the tokens a fused micro-batch packs.

``apply_recompute`` puts a ``torch.utils.checkpoint`` call (non-reentrant; adapter dropout masks are keyed,
``lorafleet.masks``, so the rerun applies the same masks without saving or restoring any RNG state, and
gradients are exact) in front of each ``DecoderLayer``'s
forward, as an attribute of that layer instance: the model's classes, modules and parameter names stay as
they are (checkpoints and PEFT keys do not change). Under ``torch.no_grad`` the layer runs plainly.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["apply_recompute", "is_recomputed", "remove_recompute"]


def _checkpointed(forward, layer: nn.Module, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(layer, *args, **kwargs)
    return checkpoint(forward, layer, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise ValueError(
            "recompute applies to a lorafleet Decoder (a model with a .layers ModuleDict), "
            f"got {type(model).__name__}"
        )
    return list(layers.values())


def apply_recompute(model: nn.Module) -> int:
    """Recompute every decoder layer of ``model`` in the backward; returns how many layers (idempotent)."""
    layers = _layers(model)
    for layer in layers:
        if not is_recomputed(layer):
            layer.forward = partial(_checkpointed, type(layer).forward, layer)
    return len(layers)


def remove_recompute(model: nn.Module) -> None:
    """Undo ``apply_recompute``: every layer keeps its activations again."""
    for layer in _layers(model):
        layer.__dict__.pop("forward", None)


def is_recomputed(layer: nn.Module) -> bool:
    """True when ``apply_recompute`` wrapped this layer."""
    return "forward" in layer.__dict__
