"""Triton forward + backward kernels of the fused ops, with autograd wrappers.

Each function matches its pure-PyTorch twin in `kernels.reference` in signature and
semantics (outputs and every gradient); `kernels.dispatch` picks between the two.
Importing this package imports triton. Off CUDA the kernels only run under Triton's
interpreter (TRITON_INTERPRET=1), which the tests use.
"""
from kernels.ops.linear_cross_entropy import linear_cross_entropy
from kernels.ops.lora import lora_projections
from kernels.ops.rms_norm import add_rms_norm, rms_norm
from kernels.ops.rope import apply_rope
from kernels.ops.swiglu import swiglu, swiglu_linear

__all__ = ["add_rms_norm", "apply_rope", "linear_cross_entropy", "lora_projections", "rms_norm", "swiglu", "swiglu_linear"]
