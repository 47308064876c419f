"""AdamW and a LambdaLR-style schedule of our own, equal to torch's, without ``torch.optim.Optimizer``.

Why: in torch 2.13 ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are
wrapped by ``torch._disable_dynamo`` and ``Adam.step`` by ``_use_grad_for_differentiable``; each imports
``torch._dynamo`` (and with it sympy, ``torch._inductor`` and triton) on its first call: seconds before the
first training step of every ``lorafleet train``. These plain classes do the same arithmetic and import
nothing beyond ``torch``.

Contract:

- ``AdamW`` is ``torch.optim.AdamW`` with its defaults (no amsgrad, no maximize, not capturable, not fused)
  running torch's single-tensor algorithm on every device, op for op: decoupled weight decay
  ``p.mul_(1 - lr * wd)``, ``exp_avg.lerp_(g, 1 - beta1)``, ``exp_avg_sq.mul_(beta2).addcmul_(g, g, 1 - beta2)``,
  the bias corrections in Python floats from a ``step`` kept as a CPU float32 tensor, ``denom =
  (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps)``, ``p.addcdiv_(exp_avg, denom, value=-lr / bc1)``; parameters
  without a gradient are skipped. On CPU the results are bit-equal to torch's (the tests compare with
  ``torch.equal``); on CUDA torch's default is its foreach path, equal up to float rounding.
- ``state_dict()`` / ``load_state_dict()`` use exactly torch's format (``state`` keyed by parameter index,
  ``param_groups`` with every torch hyper-parameter key and ``params`` as indices), so checkpoints written by
  a torch optimizer load here and ours load into ``torch.optim.AdamW``.
- ``LambdaSchedule`` is ``torch.optim.lr_scheduler.LambdaLR`` for a function: ``lr = base_lr *
  factor(last_epoch)`` set on every group, ``initial_lr`` added to the groups, and the same state dict
  (``lr_lambdas`` saved as ``None``). It drives any optimizer with ``param_groups`` (ours or torch's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from copy import deepcopy
from typing import Any

import torch

__all__ = ["AdamW", "LambdaSchedule"]

# Keys torch's AdamW gives every param group besides lr/betas/eps/weight_decay, with the values we implement.
_FIXED = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
}


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"AdamW: {name} must be a number, got {value!r}")
    if math.isnan(value):
        raise ValueError(f"AdamW: {name} must be a number, got nan")
    return value


def _check_hyper(group: dict[str, Any]) -> None:
    """Refuse what torch.optim.AdamW refuses (and a few things it lets through), naming the value."""
    if not 0.0 <= _number("lr", group["lr"]):
        raise ValueError(f"AdamW: invalid learning rate {group['lr']!r}: lr must be >= 0")
    if not 0.0 <= _number("eps", group["eps"]):
        raise ValueError(f"AdamW: invalid epsilon value {group['eps']!r}: eps must be >= 0")
    if not 0.0 <= _number("weight_decay", group["weight_decay"]):
        raise ValueError(
            f"AdamW: invalid weight_decay value {group['weight_decay']!r}: weight_decay must be >= 0"
        )
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"AdamW: betas must be two numbers, got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= _number(f"betas[{i}]", b) < 1.0:
            raise ValueError(f"AdamW: invalid beta parameter at index {i}: {b!r} (must be in [0, 1))")
    for key, want in _FIXED.items():
        if key != "foreach" and bool(group.get(key, want)) != bool(want):
            raise ValueError(
                f"AdamW: {key}={group[key]!r} is not supported (lorafleet's AdamW has {key}={want})"
            )


def _scalar_dtype() -> torch.dtype:
    # torch keeps ``step`` in float64 only when that is the default dtype (optimizer._get_scalar_dtype)
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class AdamW:
    """``torch.optim.AdamW(params, lr, betas, eps, weight_decay)``, same arithmetic and state-dict format.

    ``params``: tensors, or dicts with ``params`` and per-group overrides of the hyper-parameters.
    Bad values raise ``ValueError`` naming the value (negative lr/eps/weight_decay, betas outside [0, 1)).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if isinstance(params, torch.Tensor):
            raise TypeError("AdamW: params must be an iterable of tensors or dicts, got a tensor")
        self.defaults: dict[str, Any] = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            **_FIXED,
            "decoupled_weight_decay": True,
        }
        _check_hyper(self.defaults)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise ValueError("AdamW: got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for g in groups:
            self.add_param_group(g)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group (the defaults fill what it does not set), as torch's ``add_param_group``."""
        if not isinstance(group, dict):
            raise TypeError(f"AdamW: a param group must be a dict, got {type(group).__name__}")
        params = group["params"]
        if isinstance(params, set):
            raise TypeError("AdamW: a group's params must be an ordered collection (a list), not a set")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"AdamW: can only optimize tensors, got {type(p).__name__}")
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("AdamW: can't optimize a non-leaf tensor")
            if p.is_sparse:
                raise ValueError("AdamW: sparse parameters are not supported")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("AdamW: a parameter group holds the same parameter twice")
        group = {**group, "params": params}
        for name, default in self.defaults.items():
            group.setdefault(name, default)
        _check_hyper(group)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) in seen for p in params):
            raise ValueError("AdamW: some parameters appear in more than one parameter group")
        self.param_groups.append(group)

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient (torch's ``_single_tensor_adam``)."""
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                grad = param.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state.get(param)
                if not state:
                    state = self.state[param] = {
                        "step": torch.tensor(0.0, dtype=_scalar_dtype(), device="cpu"),
                        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                    }
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                if wd != 0:
                    param.mul_(1 - lr * wd)
                if torch.is_complex(param):
                    grad, exp_avg, exp_avg_sq = map(torch.view_as_real, (grad, exp_avg, exp_avg_sq))
                    param = torch.view_as_real(param)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step = step_t.item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) every parameter's gradient, as torch's ``zero_grad``."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """torch's format: ``{"state": {index: {...}}, "param_groups": [{..., "params": [index, ...]}]}``.

        The state tensors are the live ones (as torch returns them); save or clone them before stepping on.
        """
        index: dict[int, int] = {}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            for p in g["params"]:
                index.setdefault(id(p), len(index))
            packed["params"] = [index[id(p)] for p in g["params"]]
            groups.append(packed)
        state = {index[id(p)]: s for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of ours or of ``torch.optim.AdamW`` (groups and sizes must match, as in torch).

        Tensors are moved to their parameter's device and (except ``step``) floating dtype; hyper-parameters
        (lr, initial_lr, betas, ...) come from the saved groups; a group with a flag we do not implement
        (amsgrad, maximize, capturable, differentiable, fused) is refused with ``ValueError``.
        """
        saved = deepcopy(state_dict["param_groups"])
        if len(saved) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved)} parameter groups, the optimizer has {len(self.param_groups)}"
            )
        for i, (g, s) in enumerate(zip(self.param_groups, saved, strict=True)):
            if len(g["params"]) != len(s["params"]):
                raise ValueError(
                    f"loaded state dict's parameter group {i} has {len(s['params'])} parameters, "
                    f"the optimizer's has {len(g['params'])}"
                )
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in s]
            if missing:
                raise ValueError(f"loaded state dict's parameter group {i} lacks {', '.join(missing)}")
            _check_hyper(s)
        ids = [i for s in saved for i in s["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params, strict=True))
        state: dict[Any, Any] = {}
        for k, v in state_dict["state"].items():
            p = by_id.get(k)
            state[p if p is not None else k] = v if p is None else _cast(p, v)
        for s in state.values():
            if isinstance(s, dict) and "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]), dtype=_scalar_dtype())
        groups = []
        for g, s in zip(self.param_groups, saved, strict=True):
            s["params"] = g["params"]
            for key, want in _FIXED.items():
                s.setdefault(key, want)
            s["decoupled_weight_decay"] = True  # as torch.optim.AdamW.__setstate__
            groups.append(s)
        self.state, self.param_groups = state, groups


def _cast(param: torch.Tensor, value: Any, key: Any = None) -> Any:
    """torch's ``Optimizer.load_state_dict`` casting: tensors to the parameter's device and float dtype."""
    if isinstance(value, torch.Tensor):
        if key == "step":
            return value
        if param.is_floating_point():
            return value.to(dtype=param.dtype, device=param.device)
        return value.to(device=param.device)
    if isinstance(value, dict):
        return {k: _cast(param, v, k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(param, v) for v in value)
    return value


class LambdaSchedule:
    """``torch.optim.lr_scheduler.LambdaLR(optimizer, factor)``: ``lr = base_lr * factor(last_epoch)``.

    Built on a fresh optimizer (``last_epoch`` -1): every group gains ``initial_lr`` and gets
    ``lr = initial_lr * factor(0)``; each ``step()`` advances ``last_epoch`` and sets the next lr.
    ``state_dict``/``load_state_dict`` use LambdaLR's format, so either loads the other's state.
    """

    def __init__(self, optimizer: Any, factor: Callable[[int], float]) -> None:
        self.optimizer = optimizer
        self.factor = factor
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs: list[float] = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = -1
        self._step_count = 0
        self.step()

    def step(self) -> None:
        """Advance one optimizer step and set every group's lr for the next one."""
        self._step_count += 1
        self.last_epoch += 1
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * self.factor(self.last_epoch)
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lrs": list(self.base_lrs),
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "_is_initial": False,
            "_get_lr_called_within_step": False,
            "_last_lr": list(self._last_lr),
            "lr_lambdas": [None] * len(self.base_lrs),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``base_lrs``, ``last_epoch`` and the step count (the groups' lr come with the optimizer's)."""
        missing = [k for k in ("base_lrs", "last_epoch", "_step_count", "_last_lr") if k not in state_dict]
        if missing:
            raise ValueError(f"loaded schedule state lacks {', '.join(missing)}")
        n = len(self.optimizer.param_groups)
        if len(state_dict["base_lrs"]) != n:
            raise ValueError(
                f"loaded schedule state has {len(state_dict['base_lrs'])} groups, the optimizer {n}"
            )
        if any(fn for fn in state_dict.get("lr_lambdas", [])):
            raise ValueError(
                "loaded schedule state carries lr_lambda objects' state; only functions are supported"
            )
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        self._last_lr = list(state_dict["_last_lr"])
