"""benchmarks/kv_attention.py's sections and report, run on the CPU (the Triton interpreter) at
toy sizes with the timer replaced: the code paths the H100 run takes, not its timings."""

import math

import pytest
import torch

from spinquant_testutils import load_script

pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture()
def kva(monkeypatch):
    mod = load_script("kv_attention")
    calls = []

    def fake_bench(fn, reps=20):
        fn()   # runs the kernel once, so a broken call fails here
        calls.append(fn)
        return 1.0 + 0.01 * len(calls)
    monkeypatch.setattr(mod, "_bench", fake_bench)
    monkeypatch.setitem(mod.SHAPES, "toy", (4, 2, 32))
    return mod


def _report(**sections):
    r = {"device": "cpu", "torch": "t", "triton": "t", "vllm": "v",
         "decode": [], "write": [], "prefill": [], "mixed": []}
    r.update(sections)
    return r


def test_decode_case_sweeps_and_keeps_failures(kva, monkeypatch):
    """The decode section times the default call and every sweep setting; a setting the
    wrapper refuses is recorded with its error; vLLM's kernels, absent here, leave a note."""
    def no_vllm(*a, **kw):
        raise ImportError("no vLLM kernels in this test")
    monkeypatch.setattr(kva, "_vllm_int4_runner", no_vllm)
    monkeypatch.setattr(kva, "_vllm_fa_paged", no_vllm)
    monkeypatch.setattr(kva, "DECODE_SWEEP", [dict(num_splits=None, tile_n=16, num_warps=4),
                                              dict(num_splits=3, tile_n=16, num_warps=4)])
    g = torch.Generator().manual_seed(2)
    d = kva.decode_case("toy", 2, 40, g, "cpu", sweep=True)
    assert d["ours_ms"] > 0 and "ours_sqnr_db" in d and "not importable" in d["vllm_int4"]
    ok, bad = d["ours_sweep"]
    assert ok["ms"] > 0 and d["ours_sweep_best"] == ok
    assert math.isnan(bad["ms"]) and "power of two" in bad["error"]
    md = kva._markdown(_report(decode=[d]))
    assert "| toy | 2 | 40 | " in md and "| 3 | 16 | 4 | - |" in md and "| default | 16 | 4 |" in md


def test_prefill_case_times_the_path_and_its_baselines(kva):
    g = torch.Generator().manual_seed(0)
    res = kva.prefill_case("toy", 40, g, "cpu")
    for key in ("ours_ms", "flash_bf16_ms", "bf16_sdpa_causal_ms"):
        assert res[key] > 0, key
    assert res["flash_varlen"] == "plain PyTorch (CPU)"
    md = kva._markdown(_report(prefill=[res]))
    assert "| toy | 40 | plain PyTorch (CPU) | " in md


def test_mixed_case_times_each_path(kva):
    g = torch.Generator().manual_seed(1)
    m = kva.mixed_case("toy", g, "cpu", decodes=3, ctx=37, chunks=((20, 0), (9, 5)))
    assert m["ours_ms"] > 0 and m["decode_rows_only_ms"] > 0
    assert m["tokens"] == 3 + 20 + 9
    # vLLM's FlashAttention needs its CUDA build: on the CPU the reason is kept instead of a time
    assert "vllm_fa_bf16_ms" in m or "vllm_fa_bf16" in m
    md = kva._markdown(_report(mixed=[m]))
    assert "| toy | 3 x 37 | (20, 0), (9, 5) |" in md
