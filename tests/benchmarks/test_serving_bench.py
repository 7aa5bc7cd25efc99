"""benchmarks/serving_bench.py on CPU, with a stand-in for the ``vllm`` command line."""

import json
import os
import sys

import pytest

from spinquant_testutils import load_script

FAKE_VLLM = r'''
import json, sys
argv = sys.argv[1:]
with open(argv[argv.index("--output-json") + 1], "w") as f:
    json.dump({"avg_latency": 0.25, "argv": argv}, f)
if "throughput" in argv:   # vLLM's summary lines; "--short" drops one output token per request
    n = int(argv[argv.index("--num-prompts") + 1])
    i = int(argv[argv.index("--random-input-len") + 1])
    o = int(argv[argv.index("--random-output-len") + 1]) - ("--short" in argv)
    print(f"Total num prompt tokens:  {n * i}")
    print(f"Total num output tokens:  {n * o}")
print("Model loading took 5.22 GiB and 1.0 s")
print("GPU KV cache size: 1,234 tokens")
sys.exit(3 if "--fail" in argv else 0)
'''


@pytest.fixture
def models(tmp_path):
    """One shape's folders as benchmarks/models.py writes them (an empty tokenizer folder)."""
    written = load_script("models").write_models(str(tmp_path / "models"), ["llama3-8b"], tokenizer=False)
    (tmp_path / "models" / "llama3-8b" / "tokenizer").mkdir()
    return written[0]


@pytest.fixture
def bench(tmp_path, models):
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM)
    mod = load_script("serving_bench")
    out = tmp_path / "out"

    def run(*extra):
        mod.main(["--out", str(out), "--name", "bench", "--models", models,
                  "--vllm", f"{sys.executable} {fake}", "--resume", str(out / "bench.json"), *extra])
        return json.loads((out / "bench.json").read_text())
    return run


def test_extra_flags_reach_every_run_and_logs_are_parsed(bench):
    doc = bench("--runs", "lat1:bf16", "lat16:bf16+fp8", """--extra=--served-model-name 'a b' --seed 3""")
    for name in ("lat1:bf16", "lat16:bf16+fp8"):
        rec = doc["runs"][name]
        argv = rec["result"]["argv"]
        assert rec["rc"] == 0 and argv[argv.index("--served-model-name") + 1] == "a b"
        assert argv[argv.index("--seed") + 1] == "3"
        assert rec["weight_memory_gib"] == 5.22 and rec["kv_cache_tokens"] == 1234
    assert "--quantization" in doc["runs"]["lat16:bf16+fp8"]["result"]["argv"]


def test_runs_reach_the_model_folders_with_dummy_weights_and_one_graph_list(bench, models):
    """Every run loads its config folder and the shape's tokenizer with dummy weights and
    captures the same CUDA-graph sizes; --cudagraph-sizes vllm leaves vLLM's own list."""
    mod = load_script("serving_bench")
    doc = bench("--runs", "lat1:spinquant_w4a4kv4", "lat1:bf16+int4kv")
    for name, cfg in (("lat1:spinquant_w4a4kv4", "spinquant_w4a4kv4"), ("lat1:bf16+int4kv", "bf16")):
        argv = doc["runs"][name]["result"]["argv"]
        assert argv[argv.index("--model") + 1] == os.path.join(models, cfg)
        assert argv[argv.index("--tokenizer") + 1] == os.path.join(models, "tokenizer")
        assert argv[argv.index("--load-format") + 1] == "dummy"
        graphs = json.loads(argv[argv.index("--compilation-config") + 1])
        assert graphs == {"cudagraph_capture_sizes": list(mod.CUDAGRAPH_SIZES)}
    argv = doc["runs"]["lat1:bf16+int4kv"]["result"]["argv"]
    assert argv[argv.index("--kv-cache-dtype") + 1] == "int4_per_token_head"
    doc = bench("--runs", "lat16:bf16", "--cudagraph-sizes", "vllm")
    assert "--compilation-config" not in doc["runs"]["lat16:bf16"]["result"]["argv"]
    with pytest.raises(SystemExit, match="comma-separated ints"):
        bench("--runs", "lat16:bf16", "--cudagraph-sizes", "1,two")


def test_suites_name_known_runs_and_the_model_folders_models_py_writes():
    mod = load_script("serving_bench")
    configs = set(load_script("models").VARIANTS)
    for runs in mod.SUITES.values():
        for run in runs:
            _, cfg, _ = mod.parse_run(run)
            assert cfg in configs


def test_suite_runs_its_list(bench):
    doc = bench("--suite", "latency")
    assert sorted(doc["runs"]) == sorted(load_script("serving_bench").SUITES["latency"])
    assert all(rec["rc"] == 0 for rec in doc["runs"].values())


def test_missing_model_folders_are_named_with_the_command_that_makes_them(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"lacks .*w4a4kv8.*benchmarks/models.py"):
        bench("--runs", "lat1:spinquant_w4a4kv8")
    assert not (tmp_path / "out" / "bench.json").exists()


def test_skip_done_reruns_only_failed_runs(bench):
    bench("--runs", "lat1:bf16", "tp:bf16", "--extra=--fail")
    doc = bench("--runs", "lat1:bf16", "--extra=")
    assert doc["runs"]["lat1:bf16"]["rc"] == 0 and doc["runs"]["tp:bf16"]["rc"] == 3
    first = doc["runs"]["lat1:bf16"]["wall_s"]
    doc = bench("--runs", "lat1:bf16", "tp:bf16", "--skip-done")
    assert doc["runs"]["lat1:bf16"]["wall_s"] == first  # not run again
    assert doc["runs"]["tp:bf16"]["rc"] == 0  # the failed one ran again
    assert len(doc["invocations"]) == 3


def test_bad_run_names_are_refused(bench):
    with pytest.raises(ValueError, match="run kind"):
        bench("--runs", "bogus:bf16")
    with pytest.raises(ValueError, match="run flag"):
        bench("--runs", "tp:bf16+int3kv")
    with pytest.raises(ValueError, match="run flag"):
        bench("--runs", "tp:spinquant_w4a4kv4+denseprefill")


def test_log_keeps_the_engine_traceback_of_a_failed_run():
    """A failed run's log excerpt holds the engine's root cause printed long before
    the last lines; a successful run keeps only the tail."""
    mod = load_script("serving_bench")
    text = "\n".join(["start"] + ["ERROR EngineCore: Traceback (most recent call last):",
                                  "torch.OutOfMemoryError: CUDA out of memory"]
                     + [f"progress {i}" for i in range(200)] + ["EngineDeadError"])
    failed = mod.log_excerpt(text, 1, tail=10)
    assert "torch.OutOfMemoryError: CUDA out of memory" in failed
    assert failed.splitlines()[-1] == "EngineDeadError" and "progress 150" not in failed
    ok = mod.log_excerpt(text, 0, tail=10)
    assert "OutOfMemoryError" not in ok and len(ok.splitlines()) == 10


def test_throughput_runs_check_the_workload_vllm_really_ran(bench):
    doc = bench("--runs", "tp:bf16", "tpkv:bf16")
    for name, (i, o, n) in (("tp:bf16", (1024, 256, 400)), ("tpkv:bf16", (4096, 512, 1000))):
        rec = doc["runs"][name]
        argv = rec["result"]["argv"]
        assert argv[argv.index("--random-input-len") + 1] == str(i)
        assert argv[argv.index("--random-output-len") + 1] == str(o)
        assert "--input-len" not in argv and "--output-len" not in argv
        assert rec["rc"] == 0 and (rec["prompt_tokens"], rec["output_tokens"]) == (i * n, o * n)
    doc = bench("--runs", "tp:bf16+eager", "--extra=--short")
    rec = doc["runs"]["tp:bf16+eager"]
    assert rec["rc"] == "wrong_workload" and "(409600, 102000)" in rec["workload_error"]
