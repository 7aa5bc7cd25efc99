"""The CLI: flags derived from the dataclasses, error paths (exit 2), a tiny end-to-end eval."""

import dataclasses
import json
import re

import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_offline import checkpoint, cli, evaluate, fake_quant, gptq, pipeline, rotation
from spinquant_offline.model import tiny_llama
from spinquant_testutils import byte_tokenizer




@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = tiny_llama(vocab=257, dtype=torch.float32)
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", weight_method="rtn", r4_size=96, r3_size=16)
    rotation.fuse_norms(model)
    fake_quant.install(model, cfg)
    gptq.quantize_weights(model, cfg)
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    checkpoint.save_checkpoint(out, model, cfg, byte_tokenizer(), {"test": True})
    return out


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def exit_code(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    return e.value.code, capsys.readouterr().err


# ----------------------------------------------------------------------------
# quantize
# ----------------------------------------------------------------------------
def test_quantize_defaults_come_from_the_dataclasses():
    args = parse("quantize", "--out", "x")
    cfg, opts = fmt.SpinQuantConfig(), pipeline.PipelineOptions()
    assert args.bits == cfg.preset
    assert args.rotation == cfg.rotation.value and args.weights == cfg.weight_method.value
    for f in dataclasses.fields(pipeline.PipelineOptions):
        assert getattr(args, f.name) == getattr(opts, f.name), f.name
    for name in ("act_clip", "kv_clip", "r4_size"):
        assert getattr(args, name) == getattr(cfg, name)
    actions = {a.dest: a for a in cli.build_parser()._subparsers._group_actions[0].choices["quantize"]._actions}
    assert actions["bits"].choices == [p.value for p in fmt.Preset]
    assert actions["rotation"].choices == [r.value for r in fmt.Rotation]
    assert actions["weights"].choices == [w.value for w in fmt.WeightMethod]


def test_quantize_passes_config_and_options_to_the_pipeline(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append((a, k)) or {"timings_s": {}})
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    out = tmp_path / "out"
    rc = cli.main(["quantize", "--model", str(model), "--out", str(out), "--rotation", "hadamard",
                   "--weights", "rtn", "--bits", "W4A8KV4", "--steps", "3", "--seed", "7", "--lr", "0.5",
                   "--act-order", "--no-progress", "--calib-samples", "4", "--seqlen", "64"])
    assert rc == 0
    (path, out_dir, cfg, opts), kw = calls[0]
    assert path == str(model) and out_dir == str(out) and kw == {"overwrite": False}
    assert cfg == fmt.SpinQuantConfig.from_preset("W4A8KV4", rotation="hadamard", weight_method="rtn")
    assert opts == pipeline.PipelineOptions(steps=3, seed=7, lr=0.5, act_order=True, progress=False,
                                            calib_samples=4, seqlen=64)
    assert json.loads(capsys.readouterr().out)["config"] == "W4A8KV4"


def test_r4_size_flag_is_unset_by_default_and_passed_when_given(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append(a[2]) or {})
    assert parse("quantize", "--out", "x").r4_size is None
    assert cli.main(["quantize", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["quantize", "--out", str(tmp_path / "b"), "--r4-size", "128"]) == 0
    assert cli.main(["quantize", "--out", str(tmp_path / "c"), "--rotation", "none"]) == 0
    assert [(c.r4_size, c.r3_size) for c in calls] == [(None, None), (128, None), (0, 0)]


@pytest.mark.parametrize("argv, match", [
    (("--r4-size", "0"), "r4_size must be > 0 with rotation 'learned'"),
    (("--rotation", "none", "--r4-size", "64"), "r4_size must be 0 with rotation 'none'.*got 64"),
    (("--r4-size", "-2"), "r4_size must be an int >= 0 or None.*got -2"),
])
def test_bad_r4_size_exits_2_naming_it(capsys, tmp_path, argv, match):
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o"), *argv)
    assert code == 2 and re.search(match, err), err


def test_quantize_reuses_learned_rotations(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append(k) or {})
    rots = tmp_path / "rotations.pt"
    rots.write_bytes(b"")
    assert cli.main(["quantize", "--out", str(tmp_path / "o"), "--rotations", str(rots)]) == 0
    assert calls == [{"overwrite": False, "rotations_path": str(rots)}]
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o2"), "--rotations", str(rots),
                          "--rotation", "hadamard")
    assert code == 2 and "--rotations needs --rotation learned" in err
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o2"), "--rotations", str(tmp_path / "no"))
    assert code == 2 and "does not exist" in err


def test_quantize_without_model_uses_the_bundled_one(monkeypatch, tmp_path):
    from spinquant_offline.model import default_model_path

    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append(a) or {})
    cli.main(["quantize", "--out", str(tmp_path / "o"), "--no-progress"])
    assert calls[0][0] == default_model_path()


@pytest.mark.parametrize("argv, needle", [
    (["--model", "/no/such/model.gguf"], "--model '/no/such/model.gguf' does not exist"),
    (["--bits", "W3A3KV3"], "argument --bits: invalid choice: 'W3A3KV3'"),
    (["--rotation", "random"], "argument --rotation: invalid choice"),
    (["--weights", "awq"], "argument --weights: invalid choice"),
    (["--steps", "0"], "PipelineOptions.steps must be an int >= 1, got 0"),
    (["--steps", "ten"], "argument --steps: invalid int value"),
    (["--act-clip", "1.5"], "act_clip must be in (0, 1], got 1.5"),
    (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
])
def test_quantize_bad_input_exits_2(monkeypatch, capsys, tmp_path, argv, needle):
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: pytest.fail("pipeline must not run"))
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o"), *argv)
    assert code == 2
    assert needle in err


def test_quantize_refuses_existing_out_without_overwrite(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append(k) or {})
    (tmp_path / "o").mkdir()
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o"))
    assert code == 2 and "pass --overwrite" in err and not calls
    assert cli.main(["quantize", "--out", str(tmp_path / "o"), "--overwrite"]) == 0
    assert calls == [{"overwrite": True}]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_quantize_cuda_without_gpu_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: pytest.fail("pipeline must not run"))
    code, err = exit_code(capsys, "quantize", "--out", str(tmp_path / "o"), "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_missing_subcommand_exits_2(capsys):
    code, err = exit_code(capsys)
    assert code == 2 and "quantize,eval" in err


# ----------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------
def test_eval_defaults_come_from_evaluate():
    args = parse("eval", "ck")
    assert args.tasks == list(evaluate.EIGHT_TASKS)
    assert args.seqlen == 2048 and args.ppl_windows is None and args.zeroshot_limit is None


@pytest.mark.parametrize("argv, needle", [
    (["/no/such/ckpt"], "CKPT '/no/such/ckpt' does not exist"),
    (["{ck}", "--tasks", "mmlu"], "unknown zero-shot task 'mmlu'"),
    (["{ck}", "--ppl-windows", "-1"], "--ppl-windows must be >= 0, got -1"),
    (["{ck}", "--seqlen", "1"], "--seqlen must be >= 2, got 1"),
])
def test_eval_bad_input_exits_2(capsys, tiny_ckpt, argv, needle):
    code, err = exit_code(capsys, "eval", *[a.format(ck=tiny_ckpt) for a in argv])
    assert code == 2
    assert needle in err


def test_eval_refuses_a_corrupt_checkpoint(capsys, tiny_ckpt, tmp_path):
    import shutil

    import safetensors.torch

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    sd = safetensors.torch.load_file(str(bad / "model.safetensors"))
    del sd["model.layers.0.mlp.gate_proj.qweight"]
    safetensors.torch.save_file(sd, str(bad / "model.safetensors"))
    code, err = exit_code(capsys, "eval", str(bad), "--ppl-windows", "1")
    assert code == 2 and "model.layers.0.mlp.gate_proj.qweight" in err


def test_eval_end_to_end_on_a_tiny_checkpoint(capsys, tiny_ckpt, tmp_path):
    from spinquant_offline import data

    out = tmp_path / "res" / "eval.json"
    rc = cli.main(["eval", str(tiny_ckpt), "--ppl-windows", "2", "--seqlen", "32", "--tasks", "piqa", "siqa",
                   "--zeroshot-limit", "3", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == res
    model, tok, cfg = checkpoint.load_checkpoint(tiny_ckpt)
    want = evaluate.perplexity(model, data.eval_ids(tok), seqlen=32, max_windows=2)
    assert res["perplexity"]["wiki"] == pytest.approx(want, rel=1e-9)
    assert res["perplexity"]["windows"] == 2
    assert res["zeroshot"]["piqa"]["n"] == 3 and res["zeroshot"]["socialiqa"]["n"] == 3
    assert res["zeroshot"]["average"]["tasks"] == ["piqa", "socialiqa"]
    assert fmt.SpinQuantConfig.from_dict(res["quantization"]) == cfg
    rc = cli.main(["eval", str(tiny_ckpt), "--ppl-windows", "0", "--zeroshot-limit", "0"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and "perplexity" not in res and "zeroshot" not in res


@pytest.mark.slow
def test_quantize_and_eval_the_real_smollm2(tmp_path, capsys):
    """The bundled SmolLM2 through both subcommands (Hadamard + RTN: no calibration run)."""
    from spinquant_offline.model import default_model_path

    out = tmp_path / "smollm2-w4a4kv4"
    assert cli.main(["quantize", "--out", str(out), "--rotation", "hadamard", "--weights", "rtn",
                     "--no-progress"]) == 0
    capsys.readouterr()
    args = ["--ppl-windows", "2", "--seqlen", "128", "--tasks", "piqa", "--zeroshot-limit", "8"]
    assert cli.main(["eval", str(out), *args]) == 0
    quant = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", default_model_path(), *args]) == 0
    fp = json.loads(capsys.readouterr().out)
    assert fp["quantization"] is None and quant["quantization"]["rotation"] == "hadamard"
    # 4-bit activations and KV cost perplexity; both stay finite
    assert 1.0 < fp["perplexity"]["wiki"] < quant["perplexity"]["wiki"] < float("inf")
    assert quant["zeroshot"]["piqa"]["n"] == 8
