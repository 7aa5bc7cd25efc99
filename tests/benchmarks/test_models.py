"""benchmarks/models.py: the model folders every serving benchmark runs on."""

import json

import pytest

from spinquant_kernels import format as fmt
from spinquant_kernels import hadamard
from spinquant_testutils import load_script


def _decomposes(n: int) -> bool:
    try:
        hadamard.decompose(n)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("n", [1, 14, 3584, 11008, 14336, 18944, 28672, 2 * 3 * 5 * 7 * 11])
def test_r4_block_is_the_largest_decomposable_divisor(n):
    mod = load_script("models")
    r4 = mod.r4_block(n)
    assert n % r4 == 0 and _decomposes(r4)
    assert not any(n % d == 0 and _decomposes(d) for d in range(r4 + 1, n + 1))
    with pytest.raises(ValueError, match="positive int"):
        mod.r4_block(0)


def test_every_shape_and_variant_parses_with_transformers_and_the_format(tmp_path):
    from transformers import AutoConfig

    mod = load_script("models")
    written = mod.write_models(str(tmp_path), list(mod.SHAPES), tokenizer=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mod.SHAPES)  # no temp folder left
    assert [str(tmp_path / n) for n in mod.SHAPES] == written
    # the published sizes each benchmark's shape stands for
    sizes = {"llama3-8b": (4096, 14336, 32, 32, 8, 128256), "llama3-70b": (8192, 28672, 80, 64, 8, 128256),
             "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064)}
    for name, (hidden, inter, layers, heads, kv_heads, vocab) in sizes.items():
        for variant, preset in mod.VARIANTS.items():
            folder = tmp_path / name / variant
            cfg = AutoConfig.from_pretrained(str(folder))
            assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                    cfg.num_key_value_heads, cfg.vocab_size) == (hidden, inter, layers, heads, kv_heads, vocab)
            assert cfg.tie_word_embeddings is False
            raw = json.loads((folder / "config.json").read_text())
            if preset is None:
                assert "quantization_config" not in raw
                continue
            q = fmt.SpinQuantConfig.from_dict(raw["quantization_config"])
            assert q.preset == fmt.Preset(preset).value
            assert q.r4_size > 1 and inter % q.r4_size == 0 and _decomposes(q.r4_size)
            assert q.r3_size == (hidden // heads if q.quantize_kv else 0)
    llama = json.loads((tmp_path / "llama3-8b" / "bf16" / "config.json").read_text())
    assert (llama["rope_theta"], llama["max_position_embeddings"], llama["torch_dtype"]) == (500000.0, 8192, "bfloat16")


def test_existing_folders_are_replaced_only_with_overwrite(tmp_path):
    mod = load_script("models")
    mod.write_models(str(tmp_path), ["llama3-8b"], tokenizer=False)
    marker = tmp_path / "llama3-8b" / "bf16" / "mine.txt"
    marker.write_text("kept")
    with pytest.raises(FileExistsError, match="--overwrite"):
        mod.write_models(str(tmp_path), ["qwen2.5-7b", "llama3-8b"], tokenizer=False)
    # refused before anything was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-8b"] and marker.read_text() == "kept"
    assert mod.main(["--out", str(tmp_path), "--only", "llama3-8b"]) == 1
    mod.write_models(str(tmp_path), ["llama3-8b"], overwrite=True, tokenizer=False)
    assert not marker.exists() and (tmp_path / "llama3-8b" / "spinquant_w4a4kv4" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3-8b"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    mod = load_script("models")

    def broken(dest):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "build_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        mod.write_models(str(tmp_path), ["llama3-70b"])
    assert list(tmp_path.iterdir()) == []


def test_unknown_names_are_refused(tmp_path):
    mod = load_script("models")
    with pytest.raises(ValueError, match="shapes must be among"):
        mod.write_models(str(tmp_path), ["llama2-7b"], tokenizer=False)
    with pytest.raises(ValueError, match="variant must be one of"):
        mod.config_json("llama3-8b", "w4a16")


def test_command_writes_a_loadable_tokenizer(tmp_path, capsys):
    """The whole command for one shape: its tokenizer folder loads and round-trips text."""
    from transformers import AutoTokenizer

    mod = load_script("models")
    assert mod.main(["--out", str(tmp_path), "--only", "llama3-8b"]) == 0
    printed = capsys.readouterr().out
    assert "spinquant W4A4KV4 r4_size=14336 r3_size=128" in printed and "tokenizer/" in printed
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llama3-8b" / "tokenizer"))
    assert len(tok) == 49152
    ids = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < 20 and tok.decode(ids) == "The capital of France is"
