"""Rotation surgery leaves the float64 function unchanged."""
import pytest
import torch

from spinquant_kernels.format import SpinQuantConfig
from spinquant_offline import fake_quant, rotation
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
