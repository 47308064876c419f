"""Segmented multi-LoRA kernels (Triton) behind the fused layer's interface: the GPU fast path.

``lorafleet.lora.FusedLoRALinear`` calls ``triton_fused_lora`` when its ``backend`` (``LoraBackend``, given
when the layers are built) allows it (``auto``: x on CUDA, Triton installed, LoRA adapters only). The
segmented operators are public for benchmarks and tests, each next to its plain-PyTorch reference. Triton is
imported only when a kernel first runs; on a CPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the tests check them.
"""

from ..backend import LoraBackend
from .ops import (
    reference_segmented_expand,
    reference_segmented_outer,
    reference_segmented_shrink,
    segmented_expand,
    segmented_outer,
    segmented_shrink,
    triton_available,
    triton_fused_lora,
    triton_unsupported,
)

__all__ = [
    "LoraBackend",
    "reference_segmented_expand",
    "reference_segmented_outer",
    "reference_segmented_shrink",
    "segmented_expand",
    "segmented_outer",
    "segmented_shrink",
    "triton_available",
    "triton_fused_lora",
    "triton_unsupported",
]
