"""Per-adapter optimizers, learning-rate schedules and gradient clipping."""

from __future__ import annotations

import math

import torch
from torch import nn

from .adamw import AdamW, LambdaSchedule

__all__ = ["build_optimizer", "build_scheduler", "grad_norm_sq", "lr_factor"]


def lr_factor(name: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    The same curves as transformers' ``get_{constant,linear,cosine}_schedule_with_warmup``: a linear warmup
    from 0 over ``warmup_steps``, then constant, linear decay to 0 or half a cosine to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    if name == "linear":
        return max(0.0, (total_steps - step) / span)
    if name == "cosine":
        progress = (step - warmup_steps) / span
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown lr scheduler {name!r}; use constant, linear or cosine")


def build_optimizer(
    param_groups: list[dict], name: str, lr: float, weight_decay: float, betas, eps: float
) -> AdamW:
    """AdamW (lorafleet's, equal to torch.optim.AdamW) over the adapter's groups (LoRA+ puts B in its own)."""
    if name != "adamw":
        raise ValueError(f"unknown optimizer {name!r}; use adamw")
    return AdamW(param_groups, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps)


def build_scheduler(opt, name: str, warmup_steps: int, total_steps: int) -> LambdaSchedule:
    """The schedule ``name`` (``lr_factor``) over ``opt``'s groups: LambdaLR's behaviour and state dict."""
    lr_factor(name, 0, 0, 1)  # an unknown name fails here, not at the first step

    def factor(step: int) -> float:
        return lr_factor(name, step, warmup_steps, total_steps)

    return LambdaSchedule(opt, factor)


def grad_norm_sq(params: list[nn.Parameter]) -> torch.Tensor:
    """Sum of squared gradient entries (so norms of stage slices add up across a pipeline)."""
    grads = [p.grad.float() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return sum((g * g).sum() for g in grads)
