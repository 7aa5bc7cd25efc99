"""benchmarks/serving_bench.py on CPU, with a stand-in for the ``vllm`` command line."""

import json
import sys

import pytest

from spinquant_testutils import load_script

FAKE_VLLM = r'''
import json, os, sys
argv = sys.argv[1:]
with open(argv[argv.index("--output-json") + 1], "w") as f:
    json.dump({"avg_latency": 0.25, "argv": argv,
               "prefill_env": os.environ.get("SPINQUANT_KV4_PREFILL"),
               "cfg_env": os.environ.get("SPINQUANT_KV4_PREFILL_CFG"),
               "unpack_env": os.environ.get("SPINQUANT_KV4_UNPACK")}, f)
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
def bench(tmp_path):
    fake = tmp_path / "fake_vllm.py"
    fake.write_text(FAKE_VLLM)
    models = tmp_path / "models"
    (models / "bf16").mkdir(parents=True)
    (models / "tokenizer").mkdir()
    mod = load_script("serving_bench")
    out = tmp_path / "out"

    def run(*extra):
        mod.main(["--out", str(out), "--models", str(models), "--vllm", f"{sys.executable} {fake}",
                  "--resume", str(out / "serving_raw.json"), *extra])
        return json.loads((out / "serving_raw.json").read_text())
    return run


def test_extra_flags_reach_every_run_and_logs_are_parsed(bench):
    doc = bench("--runs", "lat1:bf16", "lat16:bf16+fp8", """--extra=--compilation-config '{"a": [1, 2]}'""")
    for name in ("lat1:bf16", "lat16:bf16+fp8"):
        rec = doc["runs"][name]
        argv = rec["result"]["argv"]
        assert rec["rc"] == 0 and argv[argv.index("--compilation-config") + 1] == '{"a": [1, 2]}'
        assert rec["weight_memory_gib"] == 5.22 and rec["kv_cache_tokens"] == 1234
    assert "--quantization" in doc["runs"]["lat16:bf16+fp8"]["result"]["argv"]


def test_env_flags_set_the_run_environment_only(bench):
    doc = bench("--runs", "lat1:bf16+denseprefill", "lat1:bf16")
    dense, plain = doc["runs"]["lat1:bf16+denseprefill"], doc["runs"]["lat1:bf16"]
    assert dense["result"]["prefill_env"] == "dense" and dense["env"] == {"SPINQUANT_KV4_PREFILL": "dense"}
    assert dense["cmd"].startswith("SPINQUANT_KV4_PREFILL=dense ")
    assert "denseprefill" not in " ".join(dense["result"]["argv"])
    assert plain["result"]["prefill_env"] is None and plain["env"] == {}


def test_prefill_tile_and_unpack_flags(bench):
    """+pf<M>x<N>x<W>[s<S>] and +kvmagic set the KV4 kernel settings of that run only."""
    doc = bench("--runs", "lat1:bf16+pf256x64x8s2+kvmagic", "lat1:bf16+pf64x32x4")
    a, b = doc["runs"]["lat1:bf16+pf256x64x8s2+kvmagic"], doc["runs"]["lat1:bf16+pf64x32x4"]
    assert a["env"] == {"SPINQUANT_KV4_PREFILL_CFG": "256,64,8,2", "SPINQUANT_KV4_UNPACK": "magic"}
    assert (a["result"]["cfg_env"], a["result"]["unpack_env"]) == ("256,64,8,2", "magic")
    assert (b["result"]["cfg_env"], b["result"]["unpack_env"]) == ("64,32,4", None)
    with pytest.raises(ValueError, match="pf<BLOCK_M>x<TILE_N>x<WARPS>"):
        bench("--runs", "lat1:bf16+pf256x64")
    c = bench("--runs", "lat1:bf16+dc64x8s2+flashsplit")["runs"]["lat1:bf16+dc64x8s2+flashsplit"]
    assert c["env"] == {"SPINQUANT_KV4_DECODE_CFG": "64,8,2", "SPINQUANT_KV4_PREFILL": "flash_split"}
    with pytest.raises(ValueError, match="dc<TILE_N>x<WARPS>"):
        bench("--runs", "lat1:bf16+dc64")


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


def test_raw_file_records_the_kv4_default_and_refuses_another_builds(bench, tmp_path):
    """The KV4 path of the build is written into the raw file (report.py keys W4A4KV4 runs by
    it); resuming a file of a build with another default is refused; the constant matches the
    plugin's defaults and the report's."""
    from spinquant_vllm import attention as sa
    doc = bench("--runs", "lat1:bf16")
    mod = load_script("serving_bench")
    assert doc["kv4_default"] == mod.KV4_DEFAULT == f"{sa.PREFILL_DEFAULT}/{sa.UNPACK_DEFAULT}"
    assert tuple(mod.KV4_DEFAULT.split("/")) == load_script("report").KV4_CURRENT
    raw = tmp_path / "out" / "serving_raw.json"
    old = json.loads(raw.read_text())
    old["kv4_default"] = "triton/sub"
    raw.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match="'triton/sub', this one runs 'flash_split/magic'"):
        bench("--runs", "lat16:bf16")
