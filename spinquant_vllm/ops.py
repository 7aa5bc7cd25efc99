"""``torch.ops.spinquant.w4ax_linear``: the kernel call as one opaque torch op.

vLLM compiles the model with Dynamo and replays it with CUDA graphs. The
kernel wrapper :func:`spinquant_kernels.linear.w4ax_linear` takes a Python
dataclass (:class:`~spinquant_kernels.linear.PackedW4`) and dispatches in
Python on the backend the linear method chose at load time, so it is wrapped
here as a custom op whose arguments are tensors and constants. Dynamo
records a single call and never traces into the wrapper; the fake
implementation gives the output's shape and dtype for symbolic shapes. The op does no host synchronisation: every
branch in the real implementation depends on shapes, dtypes and constants.
"""

from __future__ import annotations

import torch

from spinquant_kernels.format import PACK_FACTOR
from spinquant_kernels.linear import PackedW4, w4ax_linear

OP_NAME = "spinquant::w4ax_linear"


def _out_shape(x: torch.Tensor, qweight: torch.Tensor) -> list[int]:
    return [*x.shape[:-1], qweight.shape[0]]


@torch.library.custom_op(OP_NAME, mutates_args=())
def w4ax_linear_op(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   rowsum: torch.Tensor, act_bits: int, had_size: int,
                   bias: torch.Tensor | None, backend: str | None) -> torch.Tensor:
    """W4A{act_bits} linear on prepared weights (see :func:`spinquant_kernels.linear.w4ax_linear`).

    x: (..., K) bf16/fp16; qweight: (N, K/2) uint8 (``format.pack_int4``);
    scale: (N,) float32; rowsum: (N,) int32 (the three tensors of a
    :class:`PackedW4`); act_bits 4, 8 or 16; had_size 0 or the block Hadamard
    size over K; bias (N,) or None; backend: the layer's choice from
    ``spinquant_kernels.linear.select_backend``, trusted as given, or None
    (checked and chosen on this call).
    Returns (..., N) in x.dtype.
    """
    if x.numel() == 0:
        # vLLM may run a layer on zero tokens (empty ranks, dummy batches);
        # a zero-sized launch grid is an error in Triton.
        return x.new_empty(_out_shape(x, qweight))
    N, K = qweight.shape[0], PACK_FACTOR * qweight.shape[1]
    w = PackedW4(qweight, scale, rowsum, N, K)
    return w4ax_linear(x, w, act_bits, had_size, bias, backend)


@w4ax_linear_op.register_fake
def _(x, qweight, scale, rowsum, act_bits, had_size, bias, backend):
    return x.new_empty(_out_shape(x, qweight))
