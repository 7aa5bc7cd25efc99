"""Schemathesis over the server's own /openapi.json: no input may produce a 5xx."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("schemathesis")


def test_no_server_errors_on_generated_requests(live_factory, tmp_path):
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis CLI (st) not on PATH")
    # Small limits keep generated requests cheap (context 64 tokens, 4 choices).
    srv = live_factory(engine_kw={"max_model_len": 64}, max_choices=4, max_request_bytes=64 * 1024)
    cmd = [st, "run", srv.url + "/openapi.json", "--url", srv.url,
           "--checks", "not_a_server_error", "--max-examples", "30", "--seed", "1234",
           "--request-timeout", "30", "--phases", "examples,coverage,fuzzing", "--workers", "1",
           "--generation-database", "none", "--no-color"]
    env = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    sys.stdout.write(out[-4000:])
    assert proc.returncode == 0, out[-6000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", out)
    assert counts is not None and int(counts.group(1)) >= 100, out[-2000:]
    srv.wait_idle()
    metrics = httpx.get(srv.url + "/metrics").text
    assert 'status="5' not in metrics, [ln for ln in metrics.splitlines() if 'status="5' in ln]
