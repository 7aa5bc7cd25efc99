"""benchmarks/kernels.py --merge: one table from a run made in parts (no GPU needed)."""

import json

import pytest

from spinquant_testutils import load_script


def _part(tmp_path, name, rows, device="NVIDIA H100 80GB HBM3", tuned=None, timing="median"):
    doc = {"device": device, "torch": "2.11.0", "triton": "3.6.0", "timing": timing, "date_utc": name,
           "command": f"kernels.py --tag {name}", "wall_s": 10.0, "rows": rows,
           "tuned_configs": tuned or {}, "hq_sweep": None}
    path = tmp_path / f"kernels_{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


def _row(shape, M, us):
    return {"shape": shape, "M": M, "bf16_us": us}


def test_later_parts_replace_rows_and_order_follows_the_shapes(tmp_path):
    mod = load_script("kernels")
    a = _part(tmp_path, "a", [_row("down", 1, 5.0), _row("qkv", 16, 1.0), _row("qkv", 1, 2.0)], tuned={"k1": "x"})
    b = _part(tmp_path, "b", [_row("down", 1, 7.0), _row("gate_up", 1, 3.0)], tuned={"k2": "y"})
    res = mod.merge_runs([a, b])
    assert [(r["shape"], r["M"]) for r in res["rows"]] == [("qkv", 1), ("qkv", 16), ("gate_up", 1), ("down", 1)]
    assert res["rows"][-1]["bf16_us"] == 7.0  # b's row replaced a's
    assert res["tuned_configs"] == {"k1": "x", "k2": "y"}
    assert [p["file"] for p in res["parts"]] == ["kernels_a.json", "kernels_b.json"]
    assert res["wall_s"] == 20.0 and " && " in res["command"]


@pytest.mark.parametrize("key,other", [("device", {"device": "NVIDIA H200"}), ("timing", {"timing": "mean"})])
def test_parts_that_differ_are_refused(tmp_path, key, other):
    mod = load_script("kernels")
    a = _part(tmp_path, "a", [_row("qkv", 1, 2.0)])
    b = _part(tmp_path, "b", [_row("o", 1, 2.0)], **other)
    with pytest.raises(ValueError, match=f"different '{key}'"):
        mod.merge_runs([a, b])
    assert mod.merge_runs([a, _part(tmp_path, "c", [_row("o", 1, 2.0)])])["device"] == "NVIDIA H100 80GB HBM3"
