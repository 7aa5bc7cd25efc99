"""Checkpoint I/O: exact round trip, the documented layout, atomic writes, refusals."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from spinquant_kernels import format as fmt
from spinquant_offline import checkpoint, fake_quant, gptq, rotation
from spinquant_offline.model import tiny_llama
from spinquant_testutils import byte_tokenizer




def quantized_tiny(bias: bool = True, seed: int = 0, **kw):
    """A folded, fake-quantized (W4A4KV4, RTN, R3 + R4 online) tiny Llama.

    The 16-bit tensors are rounded to bf16 in memory, as the checkpoint stores
    them, so the reloaded model must reproduce the logits exactly.
    """
    model = tiny_llama(vocab=257, dtype=torch.float32, bias=bias, seed=seed, **kw)
    cfg = fmt.SpinQuantConfig.from_preset("W4A4KV4", weight_method="rtn", r4_size=96, r3_size=16)
    rotation.fuse_norms(model)
    fake_quant.install(model, cfg)
    gptq.quantize_weights(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("proj.weight"):
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model, cfg


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, cfg = quantized_tiny()
    tok = byte_tokenizer()
    out = tmp_path_factory.mktemp("ckpt") / "tiny-w4a4kv4"
    meta = {"seed": 0, "losses": torch.tensor([2.5, 2.0]), "rotation": fmt.Rotation.LEARNED}
    checkpoint.save_checkpoint(out, model, cfg, tok, meta)
    return model, cfg, tok, out


def ids(n=2, t=33, vocab=257):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_logits(saved):
    model, cfg, tok, out = saved
    loaded, tok2, cfg2 = checkpoint.load_checkpoint(out)
    assert cfg2 == cfg
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    for name, ql in fake_quant.quant_linears(model).items():
        other = fake_quant.quant_linears(loaded)[name]
        assert torch.equal(other.weight_codes, ql.weight_codes), name
        assert torch.equal(other.weight_scale, ql.weight_scale), name
        assert other.had_size == ql.had_size
    text = "héllo, wörld"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    meta = checkpoint.read_meta(out)
    assert meta == {"seed": 0, "losses": [2.5, 2.0], "rotation": "learned"}


def test_round_trip_qwen2_with_qkv_biases(tmp_path):
    model, cfg = quantized_tiny(bias=False, arch="qwen2", layers=1)
    checkpoint.save_checkpoint(tmp_path / "q", model, cfg, byte_tokenizer(), {})
    loaded, _, _ = checkpoint.load_checkpoint(tmp_path / "q", load_tokenizer=False)
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert "model.layers.0.self_attn.k_proj.bias" in checkpoint.expected_tensors(loaded)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_layout_matches_the_architecture_doc(saved):
    model, cfg, _, out = saved
    assert sorted(os.listdir(out)) == sorted(
        ["config.json", "model.safetensors", "spinquant_meta.json", "tokenizer.json", "tokenizer_config.json"])
    conf = json.loads((out / "config.json").read_text())
    assert conf["tie_word_embeddings"] is False
    assert conf["torch_dtype"] == "bfloat16"
    assert conf["architectures"] == ["LlamaForCausalLM"]
    assert fmt.SpinQuantConfig.from_dict(conf["quantization_config"]) == cfg
    sd = safetensors.torch.load_file(str(out / "model.safetensors"))
    V, H, N_mlp = 257, 64, 96
    assert sd["model.embed_tokens.weight"].shape == (V, H)
    assert sd["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert sd["lm_head.weight"].shape == (V, H) and sd["lm_head.weight"].dtype == torch.bfloat16
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            assert t.dtype == torch.bfloat16 and bool((t == 1).all()), name
    qls = fake_quant.quant_linears(model)
    assert len(qls) == 2 * 7
    for name, ql in qls.items():
        qw, sw = sd[f"{name}.qweight"], sd[f"{name}.weight_scale"]
        assert qw.dtype == torch.uint8 and qw.shape == (ql.out_features, ql.in_features // 2)
        assert sw.dtype == torch.float32 and sw.shape == (ql.out_features,)
        assert torch.equal(fmt.unpack_int4(qw), ql.weight_codes)
        assert f"{name}.weight" not in sd
        if ql.bias is not None:
            assert sd[f"{name}.bias"].dtype == torch.bfloat16
    assert sd["model.layers.0.mlp.down_proj.qweight"].shape == (H, N_mlp // 2)


def test_existing_directory_is_kept_unless_overwrite(saved, tmp_path):
    model, cfg, tok, _ = saved
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        checkpoint.save_checkpoint(out, model, cfg, tok, {})
    assert (out / "keep.txt").read_text() == "old"
    checkpoint.save_checkpoint(out, model, cfg, tok, {"v": 2}, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert checkpoint.read_meta(out) == {"v": 2}
    assert os.listdir(tmp_path) == ["ck"]


def _fail_midway(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise OSError("disk full (injected)")


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(saved, tmp_path, monkeypatch, existing):
    model, cfg, tok, good = saved
    out = tmp_path / "ck"
    if existing:
        shutil.copytree(good, out)
    before = sorted(os.listdir(out)) if existing else None
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save_checkpoint(out, model, cfg, tok, {}, overwrite=existing)
    # no temp dir, no backup, and the old checkpoint (if any) intact and loadable
    assert os.listdir(tmp_path) == (["ck"] if existing else [])
    if existing:
        monkeypatch.undo()
        assert sorted(os.listdir(out)) == before
        checkpoint.load_checkpoint(out, load_tokenizer=False)


def test_failure_in_a_later_step_also_cleans_up(saved, tmp_path):
    model, cfg, _, _ = saved

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("tokenizer write failed (injected)")

    with pytest.raises(RuntimeError, match="injected"):
        checkpoint.save_checkpoint(tmp_path / "ck", model, cfg, BrokenTokenizer(), {})
    assert os.listdir(tmp_path) == []


def test_save_refuses_unquantized_or_unfolded_models(tmp_path):
    tok = byte_tokenizer()
    cfg = fmt.SpinQuantConfig.from_preset("W4A16KV16", weight_method="rtn", rotation="none")
    model = tiny_llama(vocab=257, dtype=torch.float32)
    rotation.fuse_norms(model)
    fake_quant.install(model, cfg)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj has no quantized weight"):
        checkpoint.save_checkpoint(tmp_path / "a", model, cfg, tok, {})
    model = tiny_llama(vocab=257, dtype=torch.float32)  # norms not folded
    fake_quant.install(model, cfg)
    gptq.quantize_weights(model, cfg)
    with pytest.raises(ValueError, match=r"layernorm\.weight must be all ones"):
        checkpoint.save_checkpoint(tmp_path / "b", model, cfg, tok, {})
    with pytest.raises(TypeError, match="not JSON serializable"):
        fused, _ = quantized_tiny()
        checkpoint.save_checkpoint(tmp_path / "c", fused, cfg, tok, {"bad": object()})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------
# corrupt or mismatched checkpoints
# ----------------------------------------------------------------------------
@pytest.fixture
def broken(saved, tmp_path):
    """A writable copy of the good checkpoint and a function rewriting its tensors."""
    out = tmp_path / "ck"
    shutil.copytree(saved[3], out)
    path = out / "model.safetensors"

    def rewrite(edit):
        sd = safetensors.torch.load_file(str(path))
        edit(sd)
        safetensors.torch.save_file(sd, str(path))
    return out, rewrite


def _load(out):
    return checkpoint.load_checkpoint(out, load_tokenizer=False)


def test_missing_tensor_is_named(broken):
    out, rewrite = broken
    rewrite(lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight_scale"))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight_scale'.*\[96\] F32"):
        _load(out)


def test_unexpected_tensor_is_named(broken):
    out, rewrite = broken
    rewrite(lambda sd: sd.__setitem__("model.layers.0.mlp.down_proj.weight", torch.zeros(64, 96)))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"unexpected tensor 'model\.layers\.0\.mlp\.down_proj\.weight'"):
        _load(out)


def test_wrong_shape_is_named_with_both_shapes(broken):
    out, rewrite = broken
    rewrite(lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.qweight",
                                      sd["model.layers.0.self_attn.k_proj.qweight"][:, :16].contiguous()))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'model\.layers\.0\.self_attn\.k_proj\.qweight' must be shape \[32, 32\] U8, "
                             r"got shape \[32, 16\] U8"):
        _load(out)


def test_wrong_dtype_is_named(broken):
    out, rewrite = broken
    rewrite(lambda sd: sd.__setitem__("lm_head.weight", sd["lm_head.weight"].float()))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"'lm_head\.weight' must be shape \[257, 64\] BF16, got shape \[257, 64\] F32"):
        _load(out)


def test_config_that_does_not_match_the_tensors(broken):
    out, _ = broken
    conf = json.loads((out / "config.json").read_text())
    conf["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(conf))
    with pytest.raises(checkpoint.CheckpointError, match=r"gate_proj\.qweight' must be shape \[128, 32\]"):
        _load(out)


def test_non_finite_scale_is_named(broken):
    out, rewrite = broken

    def edit(sd):
        sd["model.layers.1.self_attn.o_proj.weight_scale"][3] = float("nan")
    rewrite(edit)
    with pytest.raises(checkpoint.CheckpointError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight_scale'"):
        _load(out)


def test_truncated_or_garbage_weights_file(broken):
    out, _ = broken
    path = out / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        _load(out)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        _load(out)


def test_bad_config_files(broken):
    out, _ = broken
    conf = json.loads((out / "config.json").read_text())
    bad = dict(conf, quantization_config=dict(conf["quantization_config"], act_bits=3))
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(checkpoint.CheckpointError, match="act_bits"):
        _load(out)
    (out / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if k != "quantization_config"}))
    with pytest.raises(checkpoint.CheckpointError, match="no quantization_config"):
        _load(out)
    (out / "config.json").write_text(json.dumps(dict(conf, tie_word_embeddings=True)))
    with pytest.raises(checkpoint.CheckpointError, match="tie_word_embeddings"):
        _load(out)
    (out / "config.json").write_text("{not json")
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        _load(out)
    os.remove(out / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(out)
