"""torch.ops.spinquant.w4ax_linear on the GPU: CUDA graph capture and Inductor.

vLLM runs the linears inside torch.compile'd, CUDA-graph-captured forwards
by default. These tests need no vLLM: they check the op itself captures
(no host synchronisation, no allocation outside the graph pool) and compiles
with Inductor, giving the eager result.
"""

from __future__ import annotations

import pytest
import torch

from spinquant_kernels import format as fmt

pytestmark = pytest.mark.gpu

N, K, HAD = 384, 512, 512


def _weights(device, seed=0):
    from spinquant_kernels.linear import prepare_w4

    g = torch.Generator().manual_seed(seed)
    q, s = fmt.quantize_weight(torch.randn(N, K, generator=g), mse=False)
    w = prepare_w4(fmt.pack_int4(q).to(device), s.to(device))
    bias = torch.randn(N, generator=g).to(device=device, dtype=torch.bfloat16)
    return w, bias


def _call(x, w, act_bits, had, bias, backend=None):
    import spinquant_vllm.ops  # noqa: F401  (registers the op)

    return torch.ops.spinquant.w4ax_linear(x, w.qweight, w.scale, w.rowsum, act_bits, had, bias, backend)


@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_op_on_cuda_matches_reference(act_bits, sqnr):
    w, bias = _weights("cuda")
    g = torch.Generator().manual_seed(1)
    for m in (1, 7, 129):
        x = torch.randn(m, K, generator=g).to(device="cuda", dtype=torch.bfloat16)
        y = _call(x, w, act_bits, HAD, bias, "triton")
        ref = _call(x, w, act_bits, HAD, bias, "reference")
        assert sqnr(ref.float(), y.float()) > 35, m


@pytest.mark.parametrize("act_bits", [4, 16])
def test_op_replays_in_a_cuda_graph(act_bits):
    w, bias = _weights("cuda")
    g = torch.Generator().manual_seed(2)
    static_x = torch.randn(16, K, generator=g).to(device="cuda", dtype=torch.bfloat16)
    # warm-up outside capture (vLLM's profile and warm-up runs do the same):
    # compiles the Triton kernels and fills the kernels' device-side caches
    _call(static_x, w, act_bits, HAD, bias)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = _call(static_x, w, act_bits, HAD, bias)
    for seed in (3, 4):
        x = torch.randn(16, K, generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, _call(x, w, act_bits, HAD, bias))


def test_op_compiles_with_inductor_fullgraph():
    w, bias = _weights("cuda")
    torch._dynamo.reset()

    def f(x):
        # surrounding pointwise work so Inductor has something to fuse around the op
        return _call(torch.nn.functional.silu(x), w, 4, HAD, bias) * 2.0

    compiled = torch.compile(f, fullgraph=True, dynamic=True)
    g = torch.Generator().manual_seed(5)
    for m in (3, 17, 64):
        x = torch.randn(m, K, generator=g).to(device="cuda", dtype=torch.bfloat16)
        assert torch.equal(compiled(x), f(x)), m
