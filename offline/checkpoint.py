"""Checkpoint I/O: write a servable SpinQuant checkpoint atomically, read it back.

Layout (docs/ARCHITECTURE.md, "Checkpoint layout"): a Hugging Face style
directory with

* ``config.json``: the source model's config with ``tie_word_embeddings: false``,
  ``torch_dtype`` / ``dtype: bfloat16`` and ``quantization_config`` =
  ``SpinQuantConfig.to_dict()``;
* ``model.safetensors``:
  ``model.embed_tokens.weight`` / ``lm_head.weight`` (V, H) bf16; every norm
  weight bf16 (all ones: the gains are folded into the linears); for each
  quantized linear (``format.QUANTIZED_PROJECTIONS``) ``<name>.qweight (N, K/2)
  uint8`` (``pack_int4`` of the int4 codes), ``<name>.weight_scale (N,) float32``
  (the suffixes are ``format.QWEIGHT_SUFFIX`` / ``SCALE_SUFFIX``) and
  ``<name>.bias (N,)`` bf16 where the model has one;
* the tokenizer files and ``spinquant_meta.json`` (how it was made).

Writing is atomic: everything goes into a fresh sibling temporary directory,
which is renamed onto ``out_dir`` only when complete. On failure the temporary
directory is removed and ``out_dir`` is untouched. ``overwrite=True`` replaces an
existing checkpoint by two renames (old -> sibling backup, new -> out_dir) and
then deletes the backup; a failure in between puts the old one back.

Reading (:func:`load_checkpoint`) rebuilds the fake-quant model from the
directory alone and refuses any file whose tensors do not match the layout the
config implies, naming the tensor, the expected and the seen shape / dtype.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import os
import shutil
import tempfile
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from spinquant_kernels import format as fmt

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "spinquant_meta.json"
STORE_DTYPE = torch.bfloat16
# torch dtype -> the dtype string safetensors reports.
_ST_DTYPE = {torch.bfloat16: "BF16", torch.uint8: "U8", torch.float32: "F32",
             torch.float16: "F16", torch.int8: "I8"}


# ----------------------------------------------------------------------------
# the tensor layout
# ----------------------------------------------------------------------------
def quantized_linear_names(model: nn.Module) -> list[str]:
    """Module names of the linears stored as int4: ``format.QUANTIZED_PROJECTIONS`` of every layer."""
    from .fake_quant import quantized_projections

    names = []
    for i, layer in enumerate(model.model.layers):
        for parent_name in ("self_attn", "mlp"):
            for n, _ in quantized_projections(getattr(layer, parent_name)):
                names.append(f"model.layers.{i}.{parent_name}.{n}")
    return names


def _qweight(module: str) -> str:
    return f"{module}.{fmt.QWEIGHT_SUFFIX}"


def _scale(module: str) -> str:
    return f"{module}.{fmt.SCALE_SUFFIX}"


def expected_tensors(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{tensor name: (shape, dtype)}`` of ``model.safetensors`` for ``model``'s architecture.

    Works on the plain Hugging Face model and on the fake-quant one (whose
    :class:`QuantLinear` modules keep the ``weight`` / ``bias`` parameter names).
    """
    quantized = set(quantized_linear_names(model))
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            N, K = p.shape
            if K % fmt.PACK_FACTOR:
                raise ValueError(f"{module}: in_features must be a multiple of {fmt.PACK_FACTOR} "
                                 f"to pack int{fmt.WEIGHT_BITS}, got {K}")
            out[_qweight(module)] = ((N, K // fmt.PACK_FACTOR), fmt.PACKED_DTYPE)
            out[_scale(module)] = ((N,), fmt.SCALE_DTYPE)
        else:  # embeddings, lm_head, norms, biases
            out[name] = (tuple(p.shape), STORE_DTYPE)
    return out


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu().tolist()
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy arrays
        return obj.tolist()
    raise TypeError(f"spinquant_meta: value of type {type(obj).__name__} is not JSON serializable")


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------
def state_dict_for_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (CPU, contiguous, own storage).

    ``model`` is the fake-quant model after ``fake_quant.install`` and weight
    quantization: every quantized linear must hold ``weight_codes`` /
    ``weight_scale``; every norm weight must be 1 (folded).
    """
    from .fake_quant import quant_linears

    expected = expected_tensors(model)
    qls = quant_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    for module in quantized_linear_names(model):
        ql = qls.get(module)
        if ql is None:
            raise ValueError(f"{module} is not a QuantLinear: call fake_quant.install(model, cfg) "
                             "and quantize the weights before saving")
        if ql.weight_codes is None or ql.weight_scale is None:
            raise ValueError(f"{module} has no quantized weight (weight_codes is None): "
                             "run gptq.quantize_weights before saving")
        tensors[_qweight(module)] = fmt.pack_int4(ql.weight_codes.detach().cpu()).contiguous()
        tensors[_scale(module)] = ql.weight_scale.detach().cpu().to(fmt.SCALE_DTYPE).clone()
    quantized = set(quantized_linear_names(model))
    for name, p in model.named_parameters(remove_duplicate=False):
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            continue
        if _is_norm(name) and not bool((p == 1).all()):
            raise ValueError(f"{name} must be all ones in a SpinQuant checkpoint (fold the gains "
                             f"with rotation.fuse_norms), got values in "
                             f"[{float(p.min()):.6g}, {float(p.max()):.6g}]")
        # clone: tied or otherwise shared parameters must not share storage on disk
        tensors[name] = p.detach().to(device="cpu", dtype=STORE_DTYPE).clone().contiguous()
    _check_tensors(tensors, expected, source="the model")
    return tensors


def checkpoint_config(model: nn.Module, cfg: fmt.SpinQuantConfig) -> dict[str, Any]:
    """The ``config.json`` dictionary of the checkpoint of ``model``."""
    config = copy.deepcopy(model.config)
    d = config.to_diff_dict()  # what save_pretrained writes: values differing from the defaults
    d.pop("quantization_config", None)
    for key in [k for k in d if k.startswith("_")]:
        d.pop(key)
    d["architectures"] = [type(model).__name__]
    d["tie_word_embeddings"] = False
    d["torch_dtype"] = "bfloat16"
    d["dtype"] = "bfloat16"
    d["quantization_config"] = cfg.to_dict()
    return d


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, cfg: fmt.SpinQuantConfig,
                    tokenizer, meta: dict | None = None, overwrite: bool = False) -> str:
    """Write the checkpoint of the fake-quant ``model`` to ``out_dir`` atomically.

    Returns the absolute path written. Raises ``FileExistsError`` if
    ``out_dir`` exists and ``overwrite`` is False (before writing anything).
    On any failure no partial checkpoint and no temporary directory remain.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"checkpoint directory exists: {out_dir} (pass overwrite=True to replace it)")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not a directory; refusing to replace it")
    # Everything that can fail on bad input fails here, before any file exists.
    cfg.require_resolved("save_checkpoint")
    tensors = state_dict_for_checkpoint(model)
    config = checkpoint_config(model, cfg)
    config_text = json.dumps(config, indent=2, sort_keys=True)
    meta_text = json.dumps(meta or {}, indent=2, sort_keys=True, default=_json_default)

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        safetensors.torch.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        _write_text(os.path.join(tmp, CONFIG_FILE), config_text)
        tokenizer.save_pretrained(tmp)
        _write_text(os.path.join(tmp, META_FILE), meta_text)
        _publishable(tmp)
        _commit(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _publishable(root: str) -> None:
    """Flush file contents to disk (so the rename never publishes empty files after
    a crash) and give the tree ordinary permissions (mkdtemp makes it owner-only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for dirpath, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~umask)
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _commit(tmp: str, out_dir: str, overwrite: bool) -> None:
    if not os.path.lexists(out_dir):
        os.rename(tmp, out_dir)
        return
    if not overwrite:
        raise FileExistsError(f"checkpoint directory appeared while writing: {out_dir}")
    backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(backup)  # only the unique name is wanted
    os.rename(out_dir, backup)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(backup, out_dir)
        raise
    shutil.rmtree(backup, ignore_errors=True)


# ----------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint directory that does not match the SpinQuant layout."""


def _check_tensors(seen: dict[str, tuple[tuple[int, ...], Any] | torch.Tensor],
                   expected: dict[str, tuple[tuple[int, ...], torch.dtype]], source: str) -> None:
    """Same names, shapes and dtypes as ``expected``, else a :class:`CheckpointError` naming the tensor."""
    missing = sorted(set(expected) - set(seen))
    unexpected = sorted(set(seen) - set(expected))
    if missing:
        shape, dtype = expected[missing[0]]
        raise CheckpointError(f"{source}: missing tensor {missing[0]!r} (expected shape {list(shape)} "
                              f"{_ST_DTYPE.get(dtype, dtype)}); {len(missing)} missing in all: {missing[:8]}")
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}; "
                              f"{len(unexpected)} unexpected in all: {unexpected[:8]}")
    for name, (shape, dtype) in expected.items():
        s = seen[name]
        s_shape, s_dtype = (tuple(s.shape), _ST_DTYPE.get(s.dtype, str(s.dtype))) if torch.is_tensor(s) \
            else (tuple(s[0]), s[1])
        want = _ST_DTYPE.get(dtype, str(dtype))
        if s_shape != tuple(shape) or s_dtype != want:
            raise CheckpointError(f"{source}: tensor {name!r} must be shape {list(shape)} {want}, "
                                  f"got shape {list(s_shape)} {s_dtype}")


def read_config(ckpt_dir: str | os.PathLike) -> tuple[dict[str, Any], fmt.SpinQuantConfig]:
    """``(model config dict without quantization_config, SpinQuantConfig)`` of a checkpoint."""
    path = os.path.join(os.fspath(ckpt_dir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"not a checkpoint directory: {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(d).__name__}")
    if "quantization_config" not in d:
        raise CheckpointError(f"{path} has no quantization_config: not a SpinQuant checkpoint")
    qc = d.pop("quantization_config")
    try:
        cfg = fmt.SpinQuantConfig.from_dict(qc)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad quantization_config: {e}") from e
    if d.get("tie_word_embeddings", True):
        raise CheckpointError(f"{path}: tie_word_embeddings must be false (lm_head is stored "
                              f"separately), got {d.get('tie_word_embeddings')!r}")
    return d, cfg


def build_model(config_dict: dict[str, Any], dtype: torch.dtype = torch.float32) -> nn.Module:
    """The (randomly initialised) Hugging Face model a checkpoint config describes."""
    import transformers

    from .model import SUPPORTED_ARCHITECTURES

    model_type = config_dict.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"config.json model_type {model_type!r} is unknown to transformers")
    config = transformers.CONFIG_MAPPING[model_type].from_dict(dict(config_dict))
    arch = (config_dict.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"config.json architectures {config_dict.get('architectures')!r}: "
                              f"supported are {list(SUPPORTED_ARCHITECTURES)}")
    cls = getattr(transformers, arch)
    model = cls._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(dtype).eval()


@torch.no_grad()
def load_checkpoint(ckpt_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", load_tokenizer: bool = True):
    """Rebuild the fake-quant model of a checkpoint: ``(model, tokenizer, cfg)``.

    The model is the Hugging Face model of ``config.json`` in ``dtype`` with
    ``fake_quant.install(model, cfg)`` applied and every quantized linear's
    codes set from ``qweight`` / ``weight_scale``; it computes what the
    checkpoint's runtime computes. Raises :class:`CheckpointError` naming the
    tensor when ``model.safetensors`` is corrupt or does not match the config.
    """
    from . import fake_quant

    ckpt_dir = os.fspath(ckpt_dir)
    config_dict, cfg = read_config(ckpt_dir)
    model = build_model(config_dict, dtype)
    expected = expected_tensors(model)
    path = os.path.join(ckpt_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint has no weights file: {path} does not exist")
    try:
        handle = safetensors.safe_open(path, framework="pt")
    except safetensors.SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    with handle as f:
        meta = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        _check_tensors(meta, expected, source=path)
        tensors = {k: f.get_tensor(k) for k in expected}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values")
        if name.endswith("." + fmt.SCALE_SUFFIX) and not bool((t > 0).all()):
            raise CheckpointError(f"{path}: tensor {name!r} must be > 0, got min {float(t.min()):.3g}")

    fake_quant.install(model, cfg)
    qls = fake_quant.quant_linears(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for module in quantized_linear_names(model):
        q = fmt.unpack_int4(tensors.pop(_qweight(module)))
        qls[module].set_quantized_weight(q, tensors.pop(_scale(module)))
    for name, t in tensors.items():
        params[name].copy_(t.to(params[name].dtype))
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = None
    if load_tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir)
    return model, tokenizer, cfg


def read_meta(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``spinquant_meta.json`` of a checkpoint ({} when absent)."""
    path = os.path.join(os.fspath(ckpt_dir), META_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
