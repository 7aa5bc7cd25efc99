"""The metrics of benchmarks/served_accuracy.py (vLLM part runs on the H100 only)."""
import math

import pytest
import torch
from spinquant_testutils import load_script


def _load():
    return load_script("served_accuracy")


def test_ppl_from_token_logprobs_matches_cross_entropy():
    sa = _load()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 17, (3, 9), generator=g)
    lp = torch.log_softmax(logits, -1)
    # token i's log-probability comes from position i-1 (prompt_logprobs convention)
    per_window = [[float(lp[w, i - 1, ids[w, i]]) for i in range(1, 9)] for w in range(3)]
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert sa.ppl_from_token_logprobs(per_window) == pytest.approx(math.exp(float(ce)), rel=1e-12)
    with pytest.raises(ValueError, match="no token"):
        sa.ppl_from_token_logprobs([[]])


def test_agreement_metrics():
    sa = _load()
    a = [[1, 2, 3, 4], [5, 6, 7, 8]]
    b = [[1, 2, 9, 4], [5, 6, 7, 8]]
    assert sa.position_match(a, b) == pytest.approx(7 / 8)
    assert sa.first_divergence(a, b) == [2, 4]
    assert sa.position_match([[1, 2]], [[1, 2, 3]]) == pytest.approx(2 / 3)  # a short one misses the rest
    with pytest.raises(ValueError, match="numbers of continuations"):
        sa.position_match(a, b[:1])


def test_variant_names_are_checked():
    sa = _load()
    assert sa.parse_variant("spinquant+compile") == ("spinquant", True)
    assert sa.parse_variant("int4kv") == ("int4kv", False)
    with pytest.raises(ValueError, match="variant must be one of"):
        sa.parse_variant("fp8")
    with pytest.raises(ValueError, match="modifier"):
        sa.parse_variant("kv16+eager")


def test_teacher_forced_and_greedy_agree_on_the_model_itself():
    """Continuations the model generated itself are predicted by it at every position."""
    sa = _load()
    from spinquant_offline.model import tiny_llama

    model = tiny_llama().eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9, 10, 11]]
    conts = sa.greedy_generate(model, prompts, 6)
    assert [len(c) for c in conts] == [6, 6]
    assert sa.teacher_forced(model, prompts, conts) == 1.0
    wrong = [[(t + 1) % model.config.vocab_size for t in c] for c in conts]
    assert sa.teacher_forced(model, prompts, wrong) == 0.0


def test_offline_reference_and_noise_floor_end_to_end(tmp_path):
    """With no vLLM variant the script still evaluates the checkpoint offline (fp32 and bf16,
    its KV setting and 16-bit KV) and records the bf16-vs-fp32 agreement floor."""
    import json

    from spinquant_kernels import format as fmt
    from spinquant_offline import checkpoint, fake_quant, gptq, rotation
    from spinquant_offline.model import tiny_llama
    from spinquant_testutils import byte_tokenizer

    model = tiny_llama(vocab=257, dtype=torch.float32)
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", weight_method="rtn", r4_size=96, r3_size=16)
    rotation.fuse_norms(model)
    fake_quant.install(model, cfg)
    gptq.quantize_weights(model, cfg)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt, model, cfg, byte_tokenizer(), {})
    sa = _load()
    sa.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--device", "cpu", "--variants",
             "--windows", "2", "--seqlen", "64", "--prompts", "3", "--prompt-len", "16", "--new-tokens", "4",
             "--tag", "t"])
    doc = json.loads((tmp_path / "out" / "served_accuracy_t.json").read_text())
    assert set(doc["offline"]["ppl"]) == {"float32/kvckpt", "float32/kv16", "bfloat16/kvckpt", "bfloat16/kv16"}
    assert all(math.isfinite(v) and v > 1 for v in doc["offline"]["ppl"].values())
    floor = doc["offline"]["noise_floor_bf16_vs_fp32"]["kvckpt"]
    assert 0 <= floor["greedy_position_match"] <= 1 and 0 <= floor["greedy_teacher_forced"] <= 1
    assert doc["vllm"] == {} and doc["device"].startswith("cpu") and doc["versions"]["torch"]
    with pytest.raises(SystemExit, match="float32"):
        sa.main(["--ckpt", str(ckpt), "--out", str(tmp_path), "--offline-dtypes", "bfloat16"])
