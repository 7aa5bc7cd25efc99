"""benchmarks/report.py: how serving_bench run names become summary keys."""

import pytest

from spinquant_testutils import load_script


@pytest.mark.parametrize("cfg,key", [
    ("bf16", "bf16"), ("bf16+fp8", "fp8"), ("bf16+fp8+fp8kv", "fp8_kv8"), ("bf16+int4kv", "bf16_int4kv"),
    ("spinquant_w4a4kv4+denseprefill", "spinquant_w4a4kv4_denseprefill"),
    ("spinquant_w4a4kv16+hqfma+splitk", "spinquant_w4a4kv16_hqfma_splitk"),
    ("spinquant_w4a4kv16+eager", None), ("llama70b", None)])
def test_serving_keys(cfg, key):
    assert load_script("report").serving_key(cfg) == key


def test_env_switch_runs_get_their_own_column():
    runs = {"tp:spinquant_w4a4kv4": {"rc": 0, "cmd": "bench --output-len 256",
                                     "result": {"num_requests": 400, "elapsed_time": 10.0}},
            "tp:spinquant_w4a4kv4+denseprefill": {"rc": 0, "cmd": "bench --output-len 256",
                                                  "result": {"num_requests": 400, "elapsed_time": 8.0}}}
    out = load_script("report")._serving_file(runs)["output_tok_s"]
    assert out == {"spinquant_w4a4kv4": 10240.0, "spinquant_w4a4kv4_denseprefill": 12800.0}
