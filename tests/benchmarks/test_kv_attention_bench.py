"""benchmarks/kv_attention.py's prefill sweep, mixed-batch case and report, run on the CPU
(the Triton interpreter) at toy sizes with the timer replaced: the code paths the H100 run
takes, not its timings."""

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


def test_prefill_sweep_runs_every_variant_and_keeps_failures(kva, monkeypatch):
    monkeypatch.setattr(kva, "PREFILL_VARIANTS", kva.PREFILL_VARIANTS[:4] + (
        (16, 16, 4, "nibble", True, None),))    # refused by the kernel wrapper: recorded
    g = torch.Generator().manual_seed(0)
    res = kva.prefill_case("toy", 40, g, "cpu")
    assert [x["unpack"] for x in res["sweep"]] == ["sub", "sub", "fold", "magic", "nibble"]
    assert all(x["ms"] > 0 for x in res["sweep"][:4])
    bad = res["sweep"][4]
    assert math.isnan(bad["ms"]) and "unpack must be one of" in bad["error"]
    md = kva._markdown({"device": "cpu", "torch": "t", "triton": "t", "vllm": "v",
                        "decode": [], "write": [], "prefill": [res], "mixed": []})
    assert "| bm128 tn32 w4 sub inorder | " in md and "| bm16 tn16 w4 nibble | - |" in md
    assert res["ours_flash_ms"] > 0 and res["flash_bf16_ms"] > 0


def test_mixed_case_times_each_path(kva):
    g = torch.Generator().manual_seed(1)
    m = kva.mixed_case("toy", g, "cpu", decodes=3, ctx=37, chunks=((20, 0), (9, 5)))
    for key in ("whole_prefill_ms", "mixed_sub_ms", "mixed_fold_ms", "mixed_magic_ms",
                "flash_ms", "flash_split_ms", "decode_rows_only_ms"):
        assert m[key] > 0, key
    assert m["tokens"] == 3 + 20 + 9
    # bf16 varlen flash needs CUDA: on the CPU its error is kept instead of a time
    assert "bf16_varlen_flash_ms" in m or "bf16_varlen_flash_error" in m
    md = kva._markdown({"device": "cpu", "torch": "t", "triton": "t", "vllm": "v",
                        "decode": [], "write": [], "prefill": [], "mixed": [m]})
    assert "| toy | 3 x 37 | (20, 0), (9, 5) |" in md
