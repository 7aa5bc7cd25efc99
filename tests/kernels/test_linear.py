"""w4ax_linear (the plugin's entry point) against w4ax_linear_ref, backend selection, warm-up."""

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


def test_linear_trusts_a_given_backend(monkeypatch):
    """With ``backend`` given the call neither chooses nor re-checks; without one it chooses."""
    from spinquant_kernels import linear as lin

    g = torch.Generator().manual_seed(3)
    _, w = _layer(24, 192, g)
    x = torch.randn(5, 192, generator=g).to(torch.bfloat16)
    chosen = []
    real = lin.select_backend
    monkeypatch.setattr(lin, "select_backend", lambda *a, **k: chosen.append(a) or real(*a, **k))
    for backend in BACKENDS:
        y = w4ax_linear(x, w, 4, 64, backend=backend)
        assert y.shape == (5, 24)
    assert chosen == []
    assert torch.equal(w4ax_linear(x, w, 4, 64, backend="reference"), w4ax_linear_ref(x, w, 4, 64))
    w4ax_linear(x, w, 4, 64)
    assert chosen == [(x.device, 4, 192, 24, 64)]
    with pytest.raises(ValueError, match=r"backend must be one of \['triton', 'reference'\], got 'cutlass'"):
        w4ax_linear(x, w, 4, 64, backend="cutlass")
    with pytest.raises(ValueError, match="last dimension"):
        w4ax_linear(x[:, :64], w, 4, backend="triton")


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


# ----------------------------------------------------------------------------
# autotuner warm-up (spinquant_kernels.linear.warmup)
# ----------------------------------------------------------------------------
@pytest.fixture
def warm_env(monkeypatch):
    """An empty warmed-shape set, and recorders on the linear's and the GEMM's entry points."""
    from spinquant_kernels import linear as lin
    from spinquant_kernels import w4a4_gemm as gemm

    monkeypatch.setattr(lin, "_WARMED", set())
    calls = {"linear": [], "launch": []}

    def fake_linear(x, w, act_bits, had_size=0, bias=None, backend=None):
        calls["linear"].append((tuple(x.shape), act_bits, had_size, bias is not None, backend))
        return x.new_zeros(x.shape[0], w.N)

    def fake_launch(*a, **k):
        calls["launch"].append(a[8])  # M
        raise AssertionError("warmup launched a GEMM")

    monkeypatch.setattr(lin, "w4ax_linear", fake_linear)
    monkeypatch.setattr(gemm, "_launch", fake_launch)
    return lin, calls


def test_warmup_buckets_are_the_autotuner_buckets():
    from spinquant_kernels.linear import WARMUP_MAX_M, warmup_buckets, warmup_sizes
    from spinquant_kernels.w4a4_gemm import _m_bucket

    for max_m in (1, 2, 3, 17, 512, 1000, 2048, 8191, 8192, 8193, 20000):
        want = sorted({_m_bucket(m) for m in range(1, max_m + 1)})
        assert warmup_buckets(max_m) == want, max_m
        sizes = warmup_sizes(max_m)
        assert sorted({_m_bucket(m) for m in sizes}) == want, max_m
        assert max(sizes) == min(max_m, WARMUP_MAX_M)
        # every Triton specialisation of M that occurs in a bucket (M == 1, M % 16 == 0, other)
        for b in want:
            occurring = {(m == 1, m % 16 == 0) for m in range(b // 2 + 1, min(b, max_m) + 1)}
            assert {(m == 1, m % 16 == 0) for m in sizes if _m_bucket(m) == b} == occurring, (max_m, b)
    assert warmup_buckets() == [1 << i for i in range(14)]
    assert len(warmup_sizes(both_alignments=False)) == 14


def test_warmup_is_a_noop_on_cpu_and_under_the_interpreter(warm_env, monkeypatch):
    lin, calls = warm_env
    _, w = _layer(32, 64, torch.Generator().manual_seed(0))
    assert lin.warmup(w, 4, max_m=64) is False
    assert lin.warmup(w, 16, max_m=64) is False
    assert calls == {"linear": [], "launch": []}
    assert lin._WARMED == set()
    # a CUDA device under the interpreter is not tuned either (no compiled kernels there)
    monkeypatch.setattr(lin, "interpreting", lambda: True)
    assert not lin._warmup_applies(torch.device("cuda"))
    monkeypatch.setattr(lin, "interpreting", lambda: False)
    assert lin._warmup_applies(torch.device("cuda"))
    assert not lin._warmup_applies(torch.device("cpu"))


def test_warmup_runs_each_bucket_once_per_shape(warm_env, monkeypatch):
    """With the device check passed (as on a GPU), one linear call per size, and dedup by shape."""
    lin, calls = warm_env
    monkeypatch.setattr(lin, "_warmup_applies", lambda device: True)
    _, w = _layer(32, 128, torch.Generator().manual_seed(0))
    assert lin.warmup(w, 4, had_size=64, max_m=1000) is True
    assert [c[0] for c in calls["linear"]] == [(m, 128) for m in lin.warmup_sizes(1000)]
    assert {c[1:] for c in calls["linear"]} == {(4, 64, False, "triton")}
    calls["linear"].clear()
    # same shape again (another layer of the model): nothing
    assert lin.warmup(w, 4, had_size=64, max_m=1000) is False
    assert calls["linear"] == []
    # another key (activation bits, bias dtype, activation dtype): warmed separately
    assert lin.warmup(w, 8, had_size=64, max_m=16) is True
    assert lin.warmup(w, 4, had_size=64, bias=torch.zeros(32, dtype=torch.bfloat16), max_m=16) is True
    assert lin.warmup(w, 4, had_size=64, dtype=torch.float16, max_m=16) is True
    assert len(calls["linear"]) == 3 * len(lin.warmup_sizes(16))
    assert len(lin._WARMED) == 4
    assert calls["launch"] == []


@pytest.mark.gpu
@pytest.mark.parametrize("act_bits", [4, 16])
def test_warmup_tunes_every_bucket_gpu(act_bits, monkeypatch):
    from spinquant_kernels import linear as lin
    from spinquant_kernels.w4a4_gemm import tuned_configs

    monkeypatch.setattr(lin, "_WARMED", set())
    N, K, max_m = 96, 256, 300  # a shape no other test tunes
    _, w = _layer(N, K, torch.Generator().manual_seed(7), "cuda")
    assert lin.warmup(w, act_bits, max_m=max_m) is True
    tuned = tuned_configs()
    for b in lin.warmup_buckets(max_m):
        # key: (M bucket, N, K/2, A_BITS, ..., tensor dtypes)
        prefix = f"({b}, {N}, {K // 2}, {act_bits},"
        assert any(k.startswith(prefix) for k in tuned), (b, sorted(tuned))
    assert lin.warmup(w, act_bits, max_m=max_m) is False
