"""Fake quant, RTN/GPTQ and rotation learning on tiny random models."""
import pytest
import torch

from spinquant_kernels import format as fmt
from spinquant_offline import fake_quant, gptq, pipeline, rotation
from spinquant_offline.cayley import orthogonality_error
from spinquant_offline.learn import learn_rotations
from spinquant_offline.model import tiny_llama


def _sqnr_db(ref, x):
    return (10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum())).item()


def test_ste_act_forward_quantizes_and_backward_is_identity():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    y = fake_quant.ste_act(x, 4)
    assert torch.equal(y.detach(), fmt.fake_quant_asym(x.detach(), 4))
    assert len(torch.unique(y[0].detach())) <= 16
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_quant_linear_matches_format_math():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=False)
    ql = fake_quant.QuantLinear(lin, act_bits=4, had_size=96)
    q, s = fmt.quantize_weight(lin.weight.detach(), 4)
    ql.set_quantized_weight(q, s)
    x = torch.randn(7, 96, generator=g)
    from spinquant_kernels.hadamard import hadamard_transform_ref
    qx, sx, zx = fmt.quantize_act(hadamard_transform_ref(x, 96), 4)
    ref = fmt.w4a4_matmul_ref(qx, sx, zx, q, s)
    assert torch.allclose(ql(x), ref, atol=1e-4, rtol=1e-4)


def test_kv_quant_changes_attention_only_when_enabled():
    m = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    rotation.fuse_norms(m)
    fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=16, rotation="none"))
    a = m(ids).logits
    fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=4, rotation="none"))
    b = m(ids).logits
    assert not torch.allclose(a, b)
    assert _sqnr_db(a, b) > 10


def test_gptq_beats_rtn_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    K, N = 128, 64
    basis = torch.randn(K, K, generator=g)
    X = torch.randn(2048, K, generator=g) @ basis * torch.linspace(0.1, 3, K)
    W = torch.randn(N, K, generator=g)
    H = 2 * X.T @ X / X.shape[0]
    for act_order in (False, True):
        qg, sg = gptq.gptq(W, H, 4, act_order=act_order)
        qr, sr = gptq.rtn(W, 4)
        assert qg.dtype == torch.int8 and int(qg.min()) >= -8 and int(qg.max()) <= 7
        err_g = (X @ (fmt.dequantize_weight(qg, sg) - W).T).pow(2).mean()
        err_r = (X @ (fmt.dequantize_weight(qr, sr) - W).T).pow(2).mean()
        assert err_g < 0.8 * err_r


def test_gptq_shape_errors():
    with pytest.raises(ValueError, match=r"Hessian must be \(8, 8\)"):
        gptq.gptq(torch.randn(4, 8), torch.eye(7), 4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pipeline_builds_quantized_model(method):
    m = tiny_llama(dtype=torch.float32, intermediate=96)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    ref = m(ids).logits
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", rotation="hadamard", weight_method=method)
    opts = pipeline.PipelineOptions(calib_samples=4, gptq_samples=4, seqlen=32, progress=False)
    m, cfg, meta = pipeline.build(m, None, cfg, opts, calib_ids=ids)
    assert cfg.r4_size == 96 and cfg.r3_size == 16
    for lin in fake_quant.quant_linears(m).values():
        assert lin.weight_codes is not None
        assert torch.equal(lin.weight, fmt.dequantize_weight(lin.weight_codes, lin.weight_scale))
    out = m(ids).logits
    assert _sqnr_db(ref, out) > 3  # a random tiny model at W4A4KV4 stays correlated


def test_install_refuses_an_unresolved_config():
    m = tiny_llama(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"fake_quant\.install needs SpinQuantConfig\.r4_size as an int"):
        fake_quant.install(m, fmt.SpinQuantConfig(act_bits=16, kv_bits=16))
    assert not fake_quant.quant_linears(m)


def test_install_wraps_the_format_projections_and_r4_only_on_down_proj():
    m = fake_quant.install(tiny_llama(dtype=torch.float32, intermediate=96),
                           fmt.SpinQuantConfig(act_bits=16, kv_bits=16, r4_size=48))
    qls = fake_quant.quant_linears(m)
    assert [n.split(".", 3)[3] for n in qls if n.startswith("model.layers.0.")] == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert {n.rsplit(".", 1)[1] for n in qls} <= fmt.QUANTIZED_PROJECTIONS
    assert {n.rsplit(".", 1)[1]: q.had_size for n, q in qls.items() if q.had_size} == {"down_proj": 48}


@pytest.mark.parametrize("kw, want", [
    ({}, (96, 16)),                                 # derived: the whole intermediate size, head_dim
    ({"r4_size": 48, "r3_size": 8}, (48, 8)),       # given: kept
    ({"rotation": "none"}, (0, 0)),
    ({"kv_bits": 16}, (96, 0)),
])
def test_resolve_config_derives_none_and_keeps_given_sizes(kw, want):
    m = tiny_llama(dtype=torch.float32, intermediate=96)
    cfg = pipeline.resolve_config(m, fmt.SpinQuantConfig(**{"rotation": "hadamard", **kw}))
    assert (cfg.r4_size, cfg.r3_size) == want and cfg.resolved


@pytest.mark.parametrize("intermediate, kw, match", [
    (96, {"r4_size": 64}, r"r4_size 64 must divide the model's intermediate_size 96"),
    (96, {"r3_size": 12}, r"r3_size 12 must divide the model's head_dim 16"),
    (96, {"r4_size": 6}, r"r4_size 6 \(as given\): no Hadamard matrix of order 6"),
    (90, {}, r"r4_size 90 \(the model's intermediate_size\): no Hadamard matrix of order 90"),
])
def test_resolve_config_refuses_sizes_the_model_cannot_take(intermediate, kw, match):
    m = tiny_llama(dtype=torch.float32, intermediate=intermediate)
    with pytest.raises(ValueError, match=match):
        pipeline.resolve_config(m, fmt.SpinQuantConfig(rotation="hadamard", **kw))


def test_learning_lowers_the_quantized_loss_and_keeps_orthogonality():
    m = tiny_llama(dtype=torch.float32, hidden=64, intermediate=96, layers=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (8, 48), generator=g)
    rotation.fuse_norms(m)
    cfg = pipeline.resolve_config(m, fmt.SpinQuantConfig.from_preset("W4A4KV4", rotation="learned",
                                                                     weight_method="rtn"))
    fake_quant.install(m, cfg)
    R1, R2s = rotation.init_rotations(m, "hadamard", g)
    R1n, R2n, hist = learn_rotations(m, cfg, ids, steps=30, lr=1.5, batch_size=8, R1=R1, R2s=R2s,
                                     weight_fake_bits=4, progress=False)
    assert len(hist["loss"]) == 30
    assert hist["lr"][0] == pytest.approx(1.5) and hist["lr"][-1] < 0.1
    assert sum(hist["loss"][-5:]) / 5 < sum(hist["loss"][:5]) / 5
    assert orthogonality_error(R1n) < 1e-5
    assert all(orthogonality_error(r) < 1e-5 for r in R2n)


@pytest.mark.parametrize("clip_search", [True, False])
def test_weight_clip_search_option_reaches_learning_and_rtn(clip_search):
    m = tiny_llama(dtype=torch.float32, intermediate=96)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", rotation="learned", weight_method="rtn")
    opts = pipeline.PipelineOptions(steps=2, calib_samples=2, gptq_samples=2, seqlen=16, progress=False,
                                    weight_clip_search=clip_search)
    seen = []
    orig = fake_quant.ste_weight

    def spy(w, bits, cs=True):
        seen.append(cs)
        return orig(w, bits, cs)

    fake_quant.ste_weight, saved = spy, fake_quant.ste_weight
    try:
        m, cfg, _ = pipeline.build(m, None, cfg, opts, calib_ids=ids)
    finally:
        fake_quant.ste_weight = saved
    assert seen and set(seen) == {clip_search}
    for lin in fake_quant.quant_linears(m).values():
        absmax = fmt.sym_scale(lin.weight_codes.float() * lin.weight_scale[:, None], 4).squeeze(1)
        # absmax scales reproduce themselves exactly; the clip search picks smaller ones somewhere
        assert torch.allclose(lin.weight_scale, absmax) == (not clip_search)


def test_gptq_damps_more_when_the_hessian_is_slightly_indefinite():
    g = torch.Generator().manual_seed(7)
    K = 32
    X = torch.randn(8, K, generator=g)
    H = X.T @ X  # rank 8: positive semi-definite only
    H -= 0.05 * torch.mean(torch.diag(H)) * torch.eye(K)  # eigenvalues down to -5% of the mean diagonal
    w = torch.randn(16, K, generator=g)
    with pytest.raises(Exception):
        torch.linalg.cholesky(H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(K))  # default damping fails
    with pytest.warns(RuntimeWarning, match="damping 0.1"):
        q, scale = gptq.gptq(w, H, 4)
    assert q.shape == (16, K) and torch.isfinite(scale).all()
    with pytest.raises(ValueError, match=r"not positive definite even with damping 1 x"):
        gptq.gptq(w, -torch.eye(K), 4)
