"""w4ax_linear (the plugin's entry point) against w4ax_linear_ref, and backend selection."""

import math

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import hadamard_transform_ref
from spinquant_kernels.linear import (
    BACKENDS, PackedW4, can_implement, prepare_w4, select_backend, w4ax_linear, w4ax_linear_ref)

# SQNR floors (dB) of the W4A{bits} layer against the float32 product of the
# transformed input and the dequantized weight, Gaussian data.
LAYER_SQNR_FLOOR = {4: 12.0, 8: 30.0, 16: 40.0}
BF16_OUTPUT_DB = 40.0


def _sqnr_db(ref, test):
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - test).pow(2).sum().item(), 1e-30))


def _layer(N, K, g, device="cpu"):
    w = torch.randn(N, K, generator=g)
    qw, sw = fmt.quantize_weight(w, 4, mse=False)
    return qw, prepare_w4(fmt.pack_int4(qw).to(device), sw.to(device))


@pytest.mark.parametrize("lead,K,N,had", [((1,), 64, 33, 0), ((2, 3), 192, 40, 64), ((17,), 576, 24, 576)])
@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_linear_matches_reference(lead, K, N, had, act_bits):
    g = torch.Generator().manual_seed(K + N + act_bits)
    qw, w = _layer(N, K, g)
    x = torch.randn(*lead, K, generator=g).to(torch.bfloat16)
    bias = torch.randn(N, generator=g).to(torch.bfloat16)
    y = w4ax_linear(x, w, act_bits, had, bias=bias)
    yr = w4ax_linear_ref(x, w, act_bits, had, bias=bias)
    assert y.shape == (*lead, N) and y.dtype == x.dtype
    _check_layer(x, qw, w, had, bias, y, yr, act_bits)


def _check_layer(x, qw, w, had, bias, y, yr, act_bits):
    """The kernel is no worse than the reference against the float product.

    A single code that rounds the other way at a tie moves a whole output row
    (~10 log10(K / flips) dB against the reference): compare both to the
    unquantized product instead of to each other."""
    K = x.shape[-1]
    xt = hadamard_transform_ref(x.reshape(-1, K).float(), had) if had else x.reshape(-1, K).float()
    exact = xt @ fmt.dequantize_weight(qw.to(x.device), w.scale).T
    if bias is not None:
        exact = exact + bias.float()
    exact = exact.reshape(y.shape)
    db, db_ref = _sqnr_db(exact, y.float()), _sqnr_db(exact, yr.float())
    # above ~40 dB the bf16 rounding of the output dominates (the CPU interpreter
    # truncates to bf16 where the GPU rounds): no relative check up there
    assert db >= min(db_ref - 0.2, BF16_OUTPUT_DB), f"kernel {db:.2f} dB vs reference {db_ref:.2f} dB"
    assert db >= LAYER_SQNR_FLOOR[act_bits]


def test_backend_selection():
    assert BACKENDS[-1] == "reference"
    ok, why = can_implement("triton", "cpu", 4, 4096, 4096)  # tests run under TRITON_INTERPRET=1 on CPU
    assert ok or "CUDA" in why
    assert can_implement("reference", "cpu", 4, 4096, 4096) == (True, "")
    ok, why = can_implement("triton", "cpu", 5, 64, 64)
    assert not ok and "act_bits" in why
    ok, why = can_implement("triton", "cpu", 4, 96, 64, had_size=96)
    assert not ok and "96" in why
    assert select_backend("cpu", 4, 96, 64, had_size=96) == "reference"
    with pytest.raises(ValueError) as e:
        select_backend("cpu", 4, 63, 64, backends=("triton", "reference"))
    assert "triton:" in str(e.value) and "reference:" in str(e.value)
    with pytest.raises(ValueError, match="unknown backend"):
        select_backend("cpu", 4, 64, 64, backends=("cutlass",))


def test_linear_rejects_bad_inputs():
    g = torch.Generator().manual_seed(0)
    _, w = _layer(16, 64, g)
    with pytest.raises(ValueError, match="last dimension"):
        w4ax_linear(torch.zeros(2, 32), w, 4)
    with pytest.raises(ValueError, match="act_bits"):
        w4ax_linear(torch.zeros(2, 64), w, 3)
    with pytest.raises(ValueError, match="PackedW4.scale"):
        PackedW4(w.qweight, w.scale.double(), w.rowsum, 16, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 16, 512])
@pytest.mark.parametrize("K,N,had", [(4096, 6144, 0), (14336, 4096, 14336)])
@pytest.mark.parametrize("act_bits", [4, 8, 16])
def test_linear_gpu(M, K, N, had, act_bits):
    g = torch.Generator().manual_seed(M + K)
    qw, w = _layer(N, K, g, "cuda")
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    assert select_backend(x.device, act_bits, K, N, had) == "triton"
    y = w4ax_linear(x, w, act_bits, had)
    yr = w4ax_linear_ref(x, w, act_bits, had)
    _check_layer(x, qw, w, had, None, y, yr, act_bits)
