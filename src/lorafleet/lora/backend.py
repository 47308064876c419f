"""Which implementation a fused LoRA layer runs: one typed choice, made when the layers are built."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["LoraBackend"]


class LoraBackend(StrEnum):
    """The fused LoRA layers' implementation.

    ``AUTO`` (the default): the Triton kernels when x is on CUDA, Triton is installed and the call has LoRA
    adapters only, else the PyTorch path. ``TORCH``: always the PyTorch path. ``TRITON``: always the kernels
    (on a CPU only under ``TRITON_INTERPRET=1``); a call they cannot run raises ValueError.

    It is given once, where the layers are built (``FusedLoRALinear(base, backend=...)``, or
    ``add_adapter(model, spec, backend=...)`` for every layer of a model), and fixed from then on.
    """

    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"

    @classmethod
    def parse(cls, value: LoraBackend | str) -> LoraBackend:
        """``value`` as a backend; a ValueError naming the choices for anything else."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for b in cls:
                if b.value == value.strip().lower():
                    return b
        choices = ", ".join(repr(b.value) for b in cls)
        raise ValueError(f"LoRA backend must be one of {choices} (or a LoraBackend), got {value!r}")
