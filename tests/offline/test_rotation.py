"""Rotation surgery leaves the float64 function unchanged; R4 blocks fit tensor parallelism."""
import types

import pytest
import torch

from spinquant_kernels.format import SpinQuantConfig
from spinquant_offline import cli, fake_quant, pipeline, rotation
from spinquant_offline.model import tiny_llama


def _rmsnorm_fp64(self, x):
    # HF's RMSNorm computes its statistic in float32 by design; the surgery is
    # exact algebra, so the check runs the norm at the model's float64.
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


CASES = [
    dict(),                                                                  # GQA 4q/2kv, tied, head_dim 16
    dict(hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=96),     # head_dim 64, 96 = 12*8
    dict(hidden=256, heads=2, kv_heads=2, head_dim=128, intermediate=160),   # head_dim 128, 160 = 20*8
    dict(arch="qwen2", intermediate=80),                                     # qkv bias, 80 = 20*4
    dict(arch="mistral", tie=False, intermediate=48),                        # untied, 48 = 12*4
    dict(bias=True, intermediate=112),                                       # o_proj bias, 112 = 28*4
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("kind", ["hadamard", "none"])
def test_rotated_model_matches_original(kw, kind, monkeypatch):
    m = tiny_llama(**kw)
    norm_cls = type(m.model.norm)
    monkeypatch.setattr(norm_cls, "forward", _rmsnorm_fp64)
    ids = torch.randint(0, m.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = m(ids).logits
    rotation.fuse_norms(m)
    R1, R2s = rotation.init_rotations(m, kind, torch.Generator().manual_seed(0))
    inter, hd = m.config.intermediate_size, rotation.head_dim(m)
    r4 = inter if kind == "hadamard" else 0
    rotation.absorb_rotations(m, R1, R2s, r4_size=r4)
    fake_quant.install(m, SpinQuantConfig(act_bits=16, kv_bits=16, rotation=kind, r4_size=r4,
                                          r3_size=hd if kind == "hadamard" else 0))
    out = m(ids).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-8, rel
    assert m.lm_head.weight.data_ptr() != m.model.embed_tokens.weight.data_ptr()
    for layer in m.model.layers:
        assert torch.all(layer.input_layernorm.weight == 1)


def test_random_orthogonal_rotations_are_absorbed_exactly(monkeypatch):
    m = tiny_llama(intermediate=96)
    monkeypatch.setattr(type(m.model.norm), "forward", _rmsnorm_fp64)
    ids = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    ref = m(ids).logits
    rotation.fuse_norms(m)
    g = torch.Generator().manual_seed(3)
    R1 = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))[0]
    R2s = [torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0] for _ in range(2)]
    rotation.absorb_rotations(m, R1, R2s, r4_size=48)  # block-diagonal R4: 2 blocks of 48 = 12*4
    fake_quant.install(m, SpinQuantConfig(act_bits=16, kv_bits=16, r4_size=48))
    assert ((m(ids).logits - ref).abs().max() / ref.abs().max()).item() < 1e-8


def test_rotation_reduces_activation_outliers():
    # A residual stream with one huge channel: a Hadamard R1 spreads it out.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    x[:, 3] *= 50
    R1 = rotation.init_rotations(tiny_llama(), "hadamard", g)[0]
    kurt = lambda t: (((t - t.mean()) / t.std()) ** 4).mean().item()
    assert kurt(x @ R1) < kurt(x) / 4


def test_bad_inputs_are_refused():
    m = tiny_llama()
    rotation.fuse_norms(m)
    R1, R2s = rotation.init_rotations(m, "hadamard")
    with pytest.raises(ValueError, match="one R2 per layer"):
        rotation.absorb_rotations(m, R1, R2s[:1])
    with pytest.raises(ValueError, match=r"R1 must be \(64, 64\)"):
        rotation.absorb_rotations(m, R1[:32, :32], R2s)
    with pytest.raises(ValueError, match="must divide intermediate_size 96"):
        rotation.absorb_rotations(m, R1, R2s, r4_size=36)


def test_unsupported_architecture_is_refused():
    import transformers
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        rotation.check_supported(transformers.GPT2LMHeadModel(cfg))


# ----------------------------------------------------------------------------
# block-diagonal R4 (the blocks a tensor-parallel shard holds)
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(intermediate=192),                           # 192 = 12 * 16
                                dict(arch="qwen2", intermediate=160),             # 160 = 20 * 8
                                dict(hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=224)])
@pytest.mark.parametrize("split", [2, 4, 8])
def test_block_diagonal_r4_is_absorbed_exactly(kw, split, monkeypatch):
    """R4 in blocks of intermediate / split (what TP = split needs): the rotated float64 model
    computes the unrotated logits, and only with the blocks the fake-quant model applies; a
    down_proj Hadamard over the whole intermediate dimension (what a full-size R4 would be)
    breaks it."""
    m = tiny_llama(**kw)
    monkeypatch.setattr(type(m.model.norm), "forward", _rmsnorm_fp64)
    ids = torch.randint(0, m.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(4))
    ref = m(ids).logits
    inter = m.config.intermediate_size
    r4 = inter // split
    rotation.fuse_norms(m)
    R1, R2s = rotation.init_rotations(m, "hadamard", torch.Generator().manual_seed(5))
    rotation.absorb_rotations(m, R1, R2s, r4_size=r4)
    cfg = pipeline.resolve_config(m, SpinQuantConfig(act_bits=16, kv_bits=16, rotation="hadamard",
                                                     r4_size=r4, tensor_parallel_sizes=(split,)))
    assert cfg.r4_size == r4 and split in cfg.tensor_parallel_sizes
    fake_quant.install(m, cfg)
    downs = [q for n, q in fake_quant.quant_linears(m).items() if n.endswith("down_proj")]
    assert [q.had_size for q in downs] == [r4] * len(m.model.layers)
    out = m(ids).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-10
    for q in downs:
        q.had_size = inter
    wrong = m(ids).logits
    assert ((wrong - ref).abs().max() / ref.abs().max()).item() > 1e-3


def _sized(inter: int, hidden: int = 64, heads: int = 4):
    """A stand-in with the config fields resolve_config reads."""
    return types.SimpleNamespace(config=types.SimpleNamespace(
        intermediate_size=inter, hidden_size=hidden, num_attention_heads=heads, head_dim=hidden // heads))


@pytest.mark.parametrize("inter, tps, r4, recorded", [
    (1536, None, 1536, (1,)),                     # SmolLM2: nothing asked, the paper's R4
    (1536, (1, 2, 4, 8), 192, (1, 2, 4, 8)),      # 192 = 12 * 16 = 1536 / 8
    (1536, (2,), 768, (1, 2)),
    (1536, (3,), 512, (1, 3)),                    # 512 = 2^9: the largest order dividing 512
    (14336, (1, 2, 4, 8), 1792, (1, 2, 4, 8)),    # Llama-3 8B: 28 * 64
    (11008, (8,), 1376, (1, 2, 4, 8)),            # Llama-2 7B: 172 * 8
    (4864, (1, 2, 4, 8), 608, (1, 2, 4, 8)),      # Qwen2.5-0.5B: 76 * 8
    (18944, (4, 8), 2368, (1, 2, 4, 8)),          # Qwen2.5-7B: 148 * 16
])
def test_resolve_config_fits_r4_to_the_tensor_parallel_sizes(inter, tps, r4, recorded):
    cfg = pipeline.resolve_config(_sized(inter), SpinQuantConfig(tensor_parallel_sizes=tps))
    assert (cfg.r4_size, cfg.tensor_parallel_sizes) == (r4, recorded)
    assert SpinQuantConfig.from_dict(cfg.to_dict()) == cfg


def test_resolve_config_checks_a_given_r4_against_the_tensor_parallel_sizes():
    cfg = pipeline.resolve_config(_sized(1536), SpinQuantConfig(r4_size=384))
    assert cfg.tensor_parallel_sizes == (1, 2, 4)            # every degree the blocks fit
    cfg = pipeline.resolve_config(_sized(1536), SpinQuantConfig(r4_size=128, tensor_parallel_sizes=(4,)))
    assert cfg.tensor_parallel_sizes == (1, 2, 3, 4, 6, 12)
    none = pipeline.resolve_config(_sized(48), SpinQuantConfig(rotation="none", tensor_parallel_sizes=(8,)))
    assert none.r4_size == 0 and none.tensor_parallel_sizes == (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)
    with pytest.raises(pipeline.ConfigMismatchError,
                       match=r"r4_size 1536 does not fit tensor parallel size 2: each rank holds 768 "
                             r"of the intermediate_size 1536.*dividing 768"):
        pipeline.resolve_config(_sized(1536), SpinQuantConfig(r4_size=1536, tensor_parallel_sizes=(1, 2)))
    with pytest.raises(pipeline.ConfigMismatchError, match=r"tensor parallel size 5 must divide .*1536"):
        pipeline.resolve_config(_sized(1536), SpinQuantConfig(tensor_parallel_sizes=(5,)))


def test_install_refuses_recorded_tensor_parallel_sizes_that_do_not_match():
    m = tiny_llama(intermediate=96)
    cfg = SpinQuantConfig(act_bits=16, kv_bits=16, rotation="hadamard", r4_size=48, r3_size=16,
                          tensor_parallel_sizes=(1, 2, 4))   # 96 / 48 = 2: only (1, 2) fit
    with pytest.raises(ValueError, match=r"tensor_parallel_sizes=\[1, 2, 4\] does not match r4_size=48 "
                                         r"and intermediate_size 96.*\[1, 2\]"):
        fake_quant.install(m, cfg)


def test_cli_tensor_parallel_sizes_flag(monkeypatch, tmp_path, capsys):
    calls = []
    monkeypatch.setattr(pipeline, "quantize", lambda *a, **k: calls.append(a[2]) or {})
    assert cli.main(["quantize", "--out", str(tmp_path / "a"), "--tensor-parallel-sizes", "8,2,1,4"]) == 0
    assert cli.main(["quantize", "--out", str(tmp_path / "b"), "--tp", "2", "--r4-size", "768"]) == 0
    assert cli.main(["quantize", "--out", str(tmp_path / "c")]) == 0
    assert [(c.tensor_parallel_sizes, c.r4_size) for c in calls] == [((1, 2, 4, 8), None), ((2,), 768),
                                                                      (None, None)]
    for bad in ("2,x", "0,2"):
        with pytest.raises(SystemExit) as e:
            cli.main(["quantize", "--out", str(tmp_path / "d"), "--tensor-parallel-sizes", bad])
        assert e.value.code == 2 and "--tensor-parallel-sizes" in capsys.readouterr().err
