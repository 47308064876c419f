"""Quantized frozen base (QLoRA): the decoder's projections stored in NF4 or int8 through bitsandbytes.

    from lorafleet.models import load_model
    from lorafleet.models.quant import quantize_model
    model = load_model("meta-llama/...", torch.bfloat16, "cuda")
    quantize_model(model, "nf4")          # before adding adapters; config: base_model.quantize: nf4

Legend: T rows, I input features, O output features.

``quantize_model`` replaces every projection ``Linear`` of the decoder layers (q, k, v, o, gate, up, down)
by a ``QuantLinear`` whose weight is a bitsandbytes parameter: ``Params4bit`` (NF4, blocks of 64, double
quantization of the block scales, as the QLoRA paper) or ``Int8Params`` (one absmax scale per output row).
Embeddings, norms and the LM head stay in the model's dtype, as in QLoRA; so do the MoE routers and the
3-D expert tensors (bitsandbytes quantizes 2-D weights). Adapters then go on top as usual
and train in their own dtype.

Compute: each call dequantizes the weight to the activations' dtype, runs the dense GEMM and drops the
dense copy; the backward dequantizes again (only the quantized weight is kept for it). That is what
bitsandbytes' own ``matmul_4bit`` does for batches of more than one row, and for int8 it trades LLM.int8's
int8 GEMM with outlier columns for a dequantized GEMM in bfloat16 (more accurate, same memory). The fused
LoRA layer (``lorafleet.lora``) reads its weight through ``dense_weight``, so it works on either base.

Where it runs: CUDA only (``quantize_model`` raises ValueError otherwise, or when bitsandbytes is missing).
bitsandbytes >= 0.45 also implements these (de)quantizers on the CPU, which the tests use (through
``_quantize_projections``); QLoRA on a CPU saves memory nobody is short of and costs a dequantization
per projection per call, so the configuration does not offer it.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import Linear, LMHead
from .moe import Experts

__all__ = ["QUANT_MODES", "QuantLinear", "base_linear", "dense_weight", "is_quantized", "quantize_model"]

QUANT_MODES = ("nf4", "int8")
_PROJECTIONS = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
)  # fmt: skip
_NF4_BLOCKSIZE = 64  # the QLoRA paper's block size for NF4 weights


def is_quantized(weight: torch.Tensor) -> bool:
    """True for a weight stored by ``QuantLinear`` (a bitsandbytes NF4 or int8 parameter)."""
    return not weight.is_floating_point()


def dense_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` itself when it is a dense tensor, else its dequantized value [O, I] in ``dtype``.

    Semantics (bitsandbytes defines the codes):
        nf4:  bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        int8: bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)   # code * absmax / 127
    """
    if weight.is_floating_point():
        return weight
    import bitsandbytes.functional as bnbf

    if getattr(weight, "quant_state", None) is not None:
        dense = bnbf.dequantize_4bit(weight.data, weight.quant_state)
    elif getattr(weight, "SCB", None) is not None:
        dense = bnbf.int8_vectorwise_dequant(weight.data, weight.SCB)
    else:
        raise AssertionError(f"a {weight.dtype} weight that is neither NF4 nor int8 reached dense_weight")
    return dense.to(dtype)


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized per call; the backward keeps only the quantized W."""

    @staticmethod
    def forward(ctx, x_TI, weight, bias_O):
        ctx.save_for_backward(weight)
        return F.linear(x_TI, dense_weight(weight, x_TI.dtype), bias_O)

    @staticmethod
    def backward(ctx, g_TO):
        (weight,) = ctx.saved_tensors
        dx_TI = g_TO @ dense_weight(weight, g_TO.dtype) if ctx.needs_input_grad[0] else None
        return dx_TI, None, None


def base_linear(x_TI: torch.Tensor, weight: torch.Tensor, bias_O: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, b)`` for a dense or quantized frozen W (a quantized one is kept quantized for backward)."""
    if weight.is_floating_point():
        return F.linear(x_TI, weight, bias_O)
    return _DequantLinear.apply(x_TI, weight, bias_O)


def _require_bitsandbytes(what: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"{what} needs the bitsandbytes package, which is not installed: pip install bitsandbytes, "
            "or drop base_model.quantize to train on the unquantized base"
        )


class QuantLinear(Linear):
    """A frozen ``Linear`` whose weight is stored in NF4 or int8; ``forward(x, batch)`` as ``Linear``."""

    def __init__(self, in_features: int, out_features: int, weight: nn.Parameter, bias, mode: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight
        self.bias = bias
        self.mode = mode

    @classmethod
    def from_linear(cls, linear: Linear, mode: str) -> QuantLinear:
        """Quantize ``linear``'s weight on its own device (CUDA, or bitsandbytes' CPU backend)."""
        if mode not in QUANT_MODES:
            raise ValueError(f"quantize must be one of {QUANT_MODES}, got {mode!r}")
        _require_bitsandbytes(f"quantize {mode!r}")
        import bitsandbytes as bnb

        w_OI = linear.weight.detach()
        if mode == "nf4":
            weight = bnb.nn.Params4bit(
                w_OI,
                requires_grad=False,
                quant_type="nf4",
                blocksize=_NF4_BLOCKSIZE,
                compress_statistics=True,
                quant_storage=torch.uint8,
            ).to(w_OI.device)
        else:
            cb, scb, _ = bnb.functional.int8_vectorwise_quant(w_OI.to(torch.float16))
            weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        return cls(linear.in_features, linear.out_features, weight, linear.bias, mode)

    def forward(self, x: torch.Tensor, batch=None) -> torch.Tensor:
        return base_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quantize={self.mode}"


def quantize_model(model: nn.Module, mode: str) -> int:
    """Quantize every projection of ``model``'s decoder layers in place; returns how many were quantized.

    Call it on the loaded base before adding adapters. Raises ValueError for an unknown mode, a model that
    already holds adapters, a model that is not on CUDA, or a missing bitsandbytes.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"base_model.quantize must be one of {QUANT_MODES}, got {mode!r}")
    if _holds_adapters(model):
        raise ValueError("quantize the base model before adding adapters (this model already holds some)")
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError(
            f"base_model.quantize: {mode!r} needs a CUDA device (bitsandbytes' quantized base is for GPUs), "
            f"but the model is on {device.type}; use device: cuda on a GPU machine, or drop quantize "
            "(on a CPU, train the base in bfloat16 or float32)"
        )
    _require_bitsandbytes(f"base_model.quantize: {mode!r}")
    count = _quantize_projections(model, mode)
    torch.cuda.empty_cache()
    return count


def _holds_adapters(model: nn.Module) -> bool:
    """True when a projection or an experts module was replaced by an adapter layer (a subclass of the
    frozen one: lorafleet.lora's fused layers), so this package needs no import from ``lora``."""
    plain = (Linear, LMHead, QuantLinear, Experts)
    return any(isinstance(m, plain) and type(m) not in plain for m in model.modules())


def _quantize_projections(model: nn.Module, mode: str) -> int:
    """The replacement itself, on any device bitsandbytes supports (the tests run it on the CPU)."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name in _PROJECTIONS and type(child) is Linear
    ]
    for parent, name in targets:
        # One projection at a time, so the dense copy of only one weight is alive next to the quantized ones.
        setattr(parent, name, QuantLinear.from_linear(getattr(parent, name), mode))
    return len(targets)
