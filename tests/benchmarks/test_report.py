"""benchmarks/report.py: how serving_bench run names become summary keys."""

import pytest

from spinquant_testutils import load_script


@pytest.mark.parametrize("cfg,key", [
    ("bf16", "bf16"), ("bf16+fp8", "fp8"), ("bf16+fp8+fp8kv", "fp8_kv8"), ("bf16+int4kv", "bf16_int4kv"),
    ("spinquant_w4a4kv4+compile", "spinquant_w4a4kv4_compile"),
    ("spinquant_w4a4kv16+compile+fp8kv", "spinquant_w4a4kv16_compile_fp8kv"),
    ("spinquant_w4a4kv16+eager", None), ("llama70b", None)])
def test_serving_keys(cfg, key):
    assert load_script("report").serving_key(cfg) == key


def test_flagged_runs_get_their_own_column():
    runs = {"tp:spinquant_w4a4kv4": {"rc": 0, "cmd": "bench", "prompt_tokens": 409600,
                                     "output_tokens": 102400, "result": {"num_requests": 400, "elapsed_time": 10.0}},
            "tp:spinquant_w4a4kv4+compile": {"rc": 0, "cmd": "bench", "prompt_tokens": 409600,
                                             "output_tokens": 102400, "result": {"num_requests": 400, "elapsed_time": 8.0}}}
    out = load_script("report")._serving_file(runs)["output_tok_s"]
    assert out == {"spinquant_w4a4kv4": 10240.0, "spinquant_w4a4kv4_compile": 12800.0}


def _pt(cfg, c, tok_s, shape=(1024, 256)):
    return {"config": cfg, "concurrency": c, "prompt_tokens": shape[0], "max_tokens": shape[1],
            "output_tokens_per_s": tok_s, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tpot_p50_s": 0.004,
            "tpot_p99_s": 0.005, "requests": 2 * c, "errors": 0}


def test_sweep_section_ratios_and_missing_configs(tmp_path):
    import json
    report = load_script("report")
    pts = [_pt("bf16", 8, 1000.0), _pt("fp8", 8, 1500.0), _pt("spinquant_w4a4kv16", 8, 1800.0),
           _pt("spinquant_w4a4kv16", 1, 250.0), _pt("bf16", 1, 150.0), _pt("spinquant_w4a4kv4", 128, 5000.0),
           _pt("spinquant_w4a4kv4", 32, 3000.0), _pt("bf16_int4kv", 32, 2000.0)]
    doc = {"points": {f"{p['config']}/1024x256/c{p['concurrency']}": p for p in pts},
           "invocations": [{"command": "serving_sweep.py", "date": "d", "device": "H100", "versions": {}}]}
    path = tmp_path / "serving_sweep_raw.json"
    path.write_text(json.dumps(doc))
    sw = report.sweep_section(str(path))
    # numeric concurrency order
    assert list(sw["points"]) == ["1024x256/c1", "1024x256/c8", "1024x256/c32", "1024x256/c128"]
    assert sw["ratios"]["1024x256/c8"]["spinquant_w4a4kv16"] == {"vs_bf16": 1.8, "vs_fp8": 1.2}
    assert sw["ratios"]["1024x256/c1"]["spinquant_w4a4kv16"] == {"vs_bf16": round(250 / 150, 4)}
    assert sw["ratios"]["1024x256/c32"] == {"spinquant_w4a4kv4": {"vs_bf16_int4kv": 1.5}}  # vLLM's 4-bit KV
    assert "1024x256/c128" not in sw["ratios"]  # no baseline measured at that point: no ratio made up
    assert sw["configs_not_measured"] == ["fp8_fp8kv"]
    text = "\n".join(report.wins_and_losses({"serving_sweep": sw}))
    assert "spinquant_w4a4kv4 vs bf16_int4kv (output tok/s): ahead at 1 of 1 points." in text


def test_wins_and_losses_are_computed_and_skip_what_is_missing():
    report = load_script("report")
    summary = {
        "kernels": {"source": "k.json", "w4a4_layer_speedup_vs_bf16": {"1": 2.0, "2048": 0.9},
                    "w4a4_layer_speedup_vs_fp8": {"1": 1.5, "2048": 0.6}},
        "serving_sweep": {"ratios": {"1024x256/c1": {"spinquant_w4a4kv16": {"vs_fp8": 1.1}},
                                     "1024x256/c128": {"spinquant_w4a4kv16": {"vs_fp8": 0.9}}}}}
    text = "\n".join(report.wins_and_losses(summary))
    assert "vs cuBLAS bf16 (`k.json`): faster at M = 1; slower at M = 2048" in text
    assert ("spinquant_w4a4kv16 vs fp8 (output tok/s): ahead at 1 of 2 points (1024x256/c1 1.10x); "
            "behind at 1024x256/c128 0.90x. Losses at high concurrency:") in text
    assert "vs bf16 (output tok/s)" not in text and "Accuracy" not in text  # nothing measured: no line
    assert report.wins_and_losses({}) == []


def test_report_main_writes_the_sweep_table_and_plot(tmp_path):
    # report.py end to end on a results folder holding only a sweep: summary entry, table, PNG
    import json
    pytest.importorskip("matplotlib")
    report = load_script("report")
    (tmp_path / "serving").mkdir()
    pts = {f"{c}/128x64/c{n}": _pt(c, n, t, shape=(128, 64))
           for c, n, t in [("bf16", 1, 100.0), ("bf16", 8, 700.0), ("spinquant_w4a4kv16", 1, 160.0),
                           ("spinquant_w4a4kv16", 8, 1000.0), ("spinquant_w4a4kv16", 32, 3000.0)]}
    (tmp_path / "serving" / "2026-11-23_llama3-8b_sweep.json").write_text(json.dumps(
        {"points": pts, "invocations": [{"command": "serving_sweep.py --x", "date": "2026-11-23", "device": "H100",
                                         "versions": {}}]}))
    report.main(["--results", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["serving_sweep"]["ratios"]["128x64/c8"]["spinquant_w4a4kv16"] == {"vs_bf16": round(1000 / 700, 4)}
    md = (tmp_path / "REPORT.md").read_text()
    assert "| 128x64/c32 | - | 3000 / 4.00 / 0.10 | - | - |" in md  # bf16 not measured there: a dash
    assert "ahead at 2 of 2 points" in md
    assert "| vs_bf16 1.43x | - |" in md  # one baseline measured: the ratio says which
    assert (tmp_path / "serving_sweep.png").stat().st_size > 10_000


def test_served_section_lists_requested_variants_without_a_result(tmp_path):
    import json
    report = load_script("report")
    path = tmp_path / "served_accuracy_x.json"
    path.write_text(json.dumps({
        "command": "served_accuracy.py --ckpt c --variants kv16 spinquant+compile --timeout-s 170",
        "quantization_config": {}, "offline": {"ppl": {"float32/kv16": 32.0}},
        "vllm": {"kv16": {"ppl": 32.2, "start_s": 10.0}}}))
    rec = report.served_section([str(path)])[f"{tmp_path.name}/x"]   # keyed by folder and tag
    assert rec["not_measured"] == ["spinquant+compile"] and list(rec["vllm"]) == ["kv16"]


@pytest.mark.parametrize("spin,verdict", [(0.52, "missed"), (0.50, "met")])
def test_latency_verdict_against_the_issue_target(spin, verdict):
    report = load_script("report")
    lines = report.wins_and_losses({"serving": {"headline_source": "s.json", "latency_bs1_s": {
        "spinquant_w4a4kv16": spin, "bf16": 0.85, "fp8": 0.57}}})
    assert len(lines) == 1 and f"{spin / 0.85:.2f}x bf16's" in lines[0]
    assert lines[0].endswith(f"(issue target <= 0.6x bf16: {verdict}).")


def test_serving_headline_skips_a_newer_file_without_the_1024_runs(tmp_path, monkeypatch):
    """A later file holding only 4096/512 runs does not blank the 1024/256 headline; the
    4096/512 numbers come from the newest file with both SpinQuant caches, with its note."""
    import json
    report = load_script("report")
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))

    def run(tok_s, out_len):
        in_len = 1024 if out_len == 256 else 4096
        return {"rc": 0, "cmd": "bench", "prompt_tokens": 100 * in_len, "output_tokens": 100 * out_len,
                "result": {"num_requests": 100, "elapsed_time": 100 * out_len / tok_s}}
    old = {"runs": {"tp:bf16": run(1000, 256), "tp:bf16+fp8": run(1500, 256),
                    "tp:spinquant_w4a4kv16": run(1200, 256),
                    "tpkv:spinquant_w4a4kv4": run(900, 512), "tpkv:spinquant_w4a4kv16": run(1000, 512)},
           "invocations": [{"date": "2026-01-01", "device": "H100", "command": "a", "versions": {}}]}
    new = {"runs": {"tpkv:spinquant_w4a4kv4+compile": run(950, 512), "tpkv:spinquant_w4a4kv4": run(800, 512),
                    "tpkv:spinquant_w4a4kv16": run(1010, 512)},
           "invocations": [{"date": "2026-02-01", "device": "H100", "command": "b", "versions": {}}],
           "note": "compiled and eager side by side"}
    paths = []
    for name, doc in (("a_throughput.json", old), ("b_throughput.json", new)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(str(tmp_path / name))
    s = report.serving_section(paths)
    assert s["headline_source"] == "a_throughput.json" and s["output_tok_s"]["fp8"] == 1500.0
    assert s["tpkv_source"] == "b_throughput.json" and s["tpkv_note"] == "compiled and eager side by side"
    assert s["tpkv_output_tok_s"] == {"spinquant_w4a4kv4_compile": 950.0, "spinquant_w4a4kv4": 800.0,
                                      "spinquant_w4a4kv16": 1010.0}
    md = tmp_path / "R.md"
    report.write_report({"serving": s}, [], [], str(md))
    text = md.read_text()
    assert "### `b_throughput.json`\n\n4096 in / 512 out" in text   # no empty 1024/256 table


def test_runs_are_reported_under_the_workload_vllm_counted():
    """The workload comes from the token counts vLLM printed, not the command's lengths; a run
    of another workload is kept apart; a run without the counts is refused."""
    report = load_script("report")

    def run(n, inp, outp, elapsed=10.0, cmd="vllm bench throughput --input-len 4096 --output-len 512"):
        return {"rc": 0, "cmd": cmd, "prompt_tokens": n * inp, "output_tokens": n * outp,
                "result": {"num_requests": n, "elapsed_time": elapsed}}
    f = report._serving_file({"tp:bf16": run(400, 1024, 256), "tpkv:bf16": run(1000, 4096, 512, 20.0),
                              "tp:bf16+fp8": run(400, 1024, 128)})
    assert f["output_tok_s"] == {"bf16": 10240.0} and f["tpkv_output_tok_s"] == {"bf16": 25600.0}
    assert f["other_output_tok_s"] == {"1024 in / 128 out, 400 prompts": {"fp8": 5120.0}}
    bare = {"rc": 0, "cmd": "vllm bench throughput", "result": {"num_requests": 400, "elapsed_time": 10.0}}
    with pytest.raises(ValueError, match="no prompt_tokens / output_tokens"):
        report._serving_file({"tp:bf16": bare})


@pytest.mark.parametrize("cfg,default,key", [
    ("spinquant_w4a4kv4", None, "spinquant_w4a4kv4"),                 # no kv4_default: the plugin's path
    ("spinquant_w4a4kv4+compile", None, "spinquant_w4a4kv4_compile"),
    ("spinquant_w4a4kv4", "triton/sub", "spinquant_w4a4kv4_triton_sub"),
    ("spinquant_w4a4kv4+flashsplit+kvmagic", "triton/sub", "spinquant_w4a4kv4"),
    ("spinquant_w4a4kv4+flashsplit", "triton/sub", "spinquant_w4a4kv4_flash_split_sub"),
    ("spinquant_w4a4kv4", "flash_split/magic", "spinquant_w4a4kv4"),
    ("spinquant_w4a4kv4+eager", "flash_split/magic", None),
    ("spinquant_w4a4kv16+kvmagic", "triton/sub", "spinquant_w4a4kv16_kvmagic")])
def test_kv4_runs_are_keyed_by_the_path_they_took(cfg, default, key):
    assert load_script("report").run_key(cfg, default) == key


def test_a_flag_that_hides_the_kv4_path_is_refused():
    with pytest.raises(ValueError, match="flag 'kvsub' is not one of the KV4 path flags"):
        load_script("report").run_key("spinquant_w4a4kv4+kvsub", "triton/sub")


def test_find_orders_by_the_recorded_date_and_skips_parts(tmp_path):
    """Accuracy files are merged oldest first by the date they record (a name that sorts first
    can hold the later run); only whole kernel runs (``*_gemm.json``) count, newest by date."""
    import json
    report = load_script("report")
    (tmp_path / "accuracy").mkdir()
    (tmp_path / "kernels").mkdir()
    for name, date in (("2026-01-01_smollm2_b.json", "2026-01-01T20:00"), ("2026-01-01_smollm2_a.json", "2026-01-01T23:00")):
        (tmp_path / "accuracy" / name).write_text(json.dumps({"date": date, "jobs": {}}))
    assert [p.rsplit("/", 1)[1] for p in report.find(str(tmp_path), "accuracy", "date")] == [
        "2026-01-01_smollm2_b.json", "2026-01-01_smollm2_a.json"]
    for name, date in (("2026-01-01_1800_h100_gemm.json", "2026-01-01T18:00"),
                       ("2026-01-01_2300_h100_gemm_part_qkv_o.json", "2026-01-01T23:00"),
                       ("2026-01-01_2200_h100_gemm.json", "2026-01-01T22:00")):
        (tmp_path / "kernels" / name).write_text(json.dumps({"date_utc": date}))
    assert report.find(str(tmp_path), "kernels", "date_utc")[-1].endswith("2026-01-01_2200_h100_gemm.json")


def _lat(avg, batch=1, cfg="bf16"):
    return {"kind": f"lat{batch}", "config": cfg, "rc": 0,
            "cmd": f"vllm bench latency --input-len 512 --output-len 128 --batch-size {batch}",
            "result": {"avg_latency": avg}}


def test_latency_comes_from_the_newest_latency_file(tmp_path, monkeypatch):
    """Throughput and latency live in separate files: the headline's throughput comes from the
    newest throughput file, its batch-1 latency from the newest file (by recorded date, not by
    name) with batch-1 runs; a file holding only an eager run is not a latency headline."""
    import json
    report = load_script("report")
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    (tmp_path / "serving").mkdir()
    tp = {"rc": 0, "cmd": "bench", "prompt_tokens": 400 * 1024, "output_tokens": 400 * 256,
          "result": {"num_requests": 400, "elapsed_time": 10.0}}
    inv = lambda date: [{"date": date, "device": "H100", "command": "serving_bench.py", "versions": {}}]
    docs = {"2026-01-03_throughput.json": {"runs": {"tp:bf16": tp}, "invocations": inv("2026-01-03T00:00")},
            "2026-01-01_2300_latency.json": {"runs": {"lat1:bf16": _lat(0.85), "lat1:spinquant_w4a4kv16":
                                                      _lat(0.52, cfg="spinquant_w4a4kv16")},
                                             "invocations": inv("2026-01-01T23:00")},
            "2026-01-01_0900_latency.json": {"runs": {"lat1:bf16": _lat(0.80), "lat16:bf16": _lat(1.1, 16)},
                                             "invocations": inv("2026-01-01T09:00")},
            "2026-01-02_latency.json": {"runs": {"lat1:spinquant_w4a4kv16+eager": _lat(5.4)},
                                        "invocations": inv("2026-01-02T00:00")}}
    for name, doc in docs.items():
        (tmp_path / "serving" / name).write_text(json.dumps(doc))
    assert [p.rsplit("/", 1)[1] for p in report.find(str(tmp_path), "latency")] == [
        "2026-01-01_0900_latency.json", "2026-01-01_2300_latency.json", "2026-01-02_latency.json"]
    s = report.serving_section(report.find(str(tmp_path), "throughput") + report.find(str(tmp_path), "latency"))
    assert s["headline_source"] == "serving/2026-01-03_throughput.json" and s["output_tok_s"] == {"bf16": 10240.0}
    assert s["latency_source"] == "serving/2026-01-01_2300_latency.json"
    assert s["latency_bs1_s"] == {"bf16": 0.85, "spinquant_w4a4kv16": 0.52} and "latency_bs16_s" not in s
    assert s["by_file"]["serving/2026-01-02_latency.json"]["latency_bs1_eager_s"] == {"spinquant_w4a4kv16+eager": 5.4}
    md = tmp_path / "R.md"
    report.write_report({"serving": s}, [], [], str(md))
    text = md.read_text()
    assert "`vllm bench latency` batch 1, 512/128 (`serving/2026-01-01_2300_latency.json`): W4A4KV16 0.520 s" in text
    assert "| bf16 |  |  |  | 0.8 | 1.1 |" in text   # the older latency file keeps its own table
    assert "### `serving/2026-01-02_latency.json`\n\nBatch-1 latency with `--enforce-eager`: " \
           "spinquant_w4a4kv16+eager 5.400 s" in text


def test_report_main_reads_the_latency_files(tmp_path):
    import json
    pytest.importorskip("matplotlib")
    report = load_script("report")
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "2026-01-01_llama3-8b_latency.json").write_text(json.dumps(
        {"runs": {"lat1:bf16": _lat(0.85), "lat1:spinquant_w4a4kv16": _lat(0.50, cfg="spinquant_w4a4kv16")},
         "invocations": [{"date": "2026-01-01T00:00", "device": "H100", "command": "c", "versions": {}}]}))
    report.main(["--results", str(tmp_path)])
    serving = json.loads((tmp_path / "summary.json").read_text())["serving"]
    assert serving["latency_bs1_s"] == {"bf16": 0.85, "spinquant_w4a4kv16": 0.5}
    assert "(issue target <= 0.6x bf16: met)" in (tmp_path / "REPORT.md").read_text()
