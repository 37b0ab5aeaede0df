"""Loom fused kernels: each op as a plain-torch reference plus a Triton implementation.

Every public op takes ``backend=None`` (auto, see loom.kernels.dispatch), ``"torch"``
(the reference) or its kernel's name, and is a plain function call. Triton modules are
imported on first use, never by importing this package.
"""

from loom.kernels.attention import varlen_attention, varlen_attention_reference
from loom.kernels.dispatch import BACKEND_ENV, choose_backend
from loom.kernels.linear_attention import (
    causal_conv1d,
    causal_conv1d_reference,
    gated_delta_rule,
    gated_delta_rule_reference,
)
from loom.kernels.linear_cross_entropy import (
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from loom.kernels.moe import (
    TokenRouting,
    fused_moe_forward,
    fused_moe_reference,
    grouped_mm,
    grouped_mm_reference,
    permute_tokens,
    route_tokens,
    unpermute_tokens,
)
from loom.kernels.rms_norm import rms_norm, rms_norm_reference
from loom.kernels.rotary import apply_rotary, apply_rotary_reference
from loom.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "BACKEND_ENV",
    "TokenRouting",
    "apply_rotary",
    "apply_rotary_reference",
    "causal_conv1d",
    "causal_conv1d_reference",
    "choose_backend",
    "fused_linear_cross_entropy",
    "fused_moe_forward",
    "fused_moe_reference",
    "gated_delta_rule",
    "gated_delta_rule_reference",
    "grouped_mm",
    "grouped_mm_reference",
    "linear_cross_entropy_reference",
    "permute_tokens",
    "rms_norm",
    "rms_norm_reference",
    "route_tokens",
    "swiglu",
    "swiglu_reference",
    "unpermute_tokens",
    "varlen_attention",
    "varlen_attention_reference",
]
