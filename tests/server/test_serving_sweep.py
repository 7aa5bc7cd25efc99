"""benchmarks/serving_sweep.py drives a real server process and records complete points."""
import json
import shutil

import pytest
from spinquant_testutils import load_script


def _load_sweep():
    return load_script("serving_sweep")


@pytest.mark.skipif(shutil.which("spinquant") is None, reason="needs the installed `spinquant` console script")
def test_sweep_records_every_point_and_resumes(tiny_ckpt, tmp_path):
    sweep = _load_sweep()
    cfg = f"cpu=spinquant serve {tiny_ckpt} --engine cpu --port {{port}} --cpu-threads 1"
    args = ["--out", str(tmp_path), "--config", cfg, "--shapes", "8x4", "--concurrency", "1", "3",
            "--min-requests", "3", "--vocab", "200"]
    sweep.main(args)
    raw = tmp_path / "serving_sweep_raw.json"
    doc = json.loads(raw.read_text())
    assert set(doc["points"]) == {"cpu/8x4/c1", "cpu/8x4/c3"}
    for p in doc["points"].values():
        assert p["errors"] == 0 and p["completed"] == p["requests"] >= 3
        assert p["output_tokens"] == 4 * p["completed"]  # ignore_eos: every request gives its full output
        assert 0 < p["ttft_p50_s"] <= p["latency_p50_s"] and p["tpot_p50_s"] > 0
    # A resumed invocation with nothing left to do starts no server and keeps the points.
    sweep.main(args + ["--resume", str(raw)])
    doc2 = json.loads(raw.read_text())
    assert doc2["points"] == doc["points"] and len(doc2["invocations"]) == 2


def test_bad_config_and_shape_are_refused(tmp_path):
    sweep = _load_sweep()
    with pytest.raises(SystemExit, match="must contain"):
        sweep.main(["--out", str(tmp_path), "--config", "x=spinquant serve ckpt"])
    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path), "--config", "x=a {port}", "--shapes", "12"])


def test_start_margin_starts_no_server_it_cannot_use(tmp_path, capsys):
    # A command that would fail at once if it were started: with the whole deadline inside the
    # margin the sweep must not start it, and records the configuration as not run.
    sweep = _load_sweep()
    sweep.main(["--out", str(tmp_path), "--config", "x=false {port}", "--deadline-s", "100",
                "--start-margin-s", "100"])
    assert "too little time left to start x (12 points left)" in capsys.readouterr().out
    doc = json.loads((tmp_path / "serving_sweep_raw.json").read_text())
    assert doc["points"] == {} and "failures" not in doc
    # without the margin the same command is started, and its failure is recorded
    sweep.main(["--out", str(tmp_path), "--config", "x=false {port}", "--deadline-s", "100"])
    doc = json.loads((tmp_path / "serving_sweep_raw.json").read_text())
    assert "exited with code 1" in doc["failures"]["x"]
