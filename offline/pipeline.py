"""The offline pipeline: rotations and quantized weights first, then the checkpoint.

Phase 1 (:func:`build`): fold norms, pick R1/R2 (identity, random Hadamard or
learned), absorb them, install the fake-quant runtime, quantize weights.
Phase 2 (:func:`quantize`): the same from a model path, then
``checkpoint.save_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch
from torch import nn

from spinquant_kernels import format as fmt
from spinquant_kernels.hadamard import decompose

from . import fake_quant, gptq, rotation
from .learn import learn_rotations


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    """How the pipeline runs (the paper's settings are the defaults)."""

    steps: int = 100
    calib_samples: int = 800
    seqlen: int = 2048
    lr: float = 1.5
    batch_size: int = 1
    seed: int = 0
    gptq_samples: int = 128
    act_order: bool = False
    # Weight scales by the MSE clip search (True) or absmax, in learning and final quantization alike.
    weight_clip_search: bool = True
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "calib_samples", "seqlen", "batch_size", "gptq_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PipelineOptions.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"PipelineOptions.lr must be > 0, got {self.lr!r}")


class ConfigMismatchError(ValueError):
    """A config that does not fit the model: a block size or tensor-parallel degree that does not
    divide the model's dimension, or that no Hadamard construction here has (sizes named)."""


def resolve_config(model: nn.Module, cfg: fmt.SpinQuantConfig) -> fmt.SpinQuantConfig:
    """``cfg`` with its online Hadamard sizes resolved for ``model`` (no ``None`` left).

    A size of ``None`` is derived from the model: with a rotation, R4 over the
    whole intermediate dimension and, when the KV cache is quantized, R3 over
    head_dim (``SpinQuantConfig`` already gives rotation ``none`` and 16-bit KV
    caches their zeros). A given size is checked: it must divide the
    model's dimension and be a Hadamard order this package builds. Refusals
    are :class:`ConfigMismatchError` naming the sizes.

    ``cfg.tensor_parallel_sizes`` (the degrees asked for) shapes R4: each degree
    must divide the intermediate size; R4 derived with degrees asked for is the
    largest Hadamard order dividing ``intermediate / lcm(degrees)`` (so every
    rank's shard holds whole blocks), a given one must divide each
    ``intermediate / t``. The result records every degree the R4 blocks fit
    (``SpinQuantConfig.r4_tensor_parallel_sizes``).
    """
    inter, hd = model.config.intermediate_size, rotation.head_dim(model)
    asked = cfg.tensor_parallel_sizes or ()
    for t in asked:
        if inter % t:
            raise ConfigMismatchError(
                f"tensor parallel size {t} must divide the model's intermediate_size {inter} "
                f"(each rank holds intermediate / t columns of down_proj)")
    span = functools.reduce(math.lcm, asked, 1)  # divides inter, as every degree does
    if cfg.r4_size is not None:
        r4 = cfg.r4_size
    else:  # the whole intermediate dimension (the paper's R4) unless degrees were asked for
        r4 = largest_hadamard_order(inter // span) if asked else inter
    r3 = hd if cfg.r3_size is None else cfg.r3_size
    for name, size, dim, dim_name in (("r4_size", r4, inter, "intermediate_size"),
                                      ("r3_size", r3, hd, "head_dim")):
        if not size:
            continue
        if dim % size:
            raise ConfigMismatchError(f"{name} {size} must divide the model's {dim_name} {dim}")
        try:
            decompose(size)
        except ValueError as e:
            origin = f"the model's {dim_name}" if getattr(cfg, name) is None else "as given"
            raise ConfigMismatchError(
                f"{name} {size} ({origin}): {e}; give a block size that is one") from None
    for t in asked:
        if r4 and (inter // t) % r4:
            raise ConfigMismatchError(
                f"r4_size {r4} does not fit tensor parallel size {t}: each rank holds "
                f"{inter // t} of the intermediate_size {inter} columns, which {r4} does not divide; "
                f"leave --r4-size unset to derive one or give a Hadamard order dividing "
                f"{inter // span}")
    out = dataclasses.replace(cfg, r4_size=r4, r3_size=r3)
    return dataclasses.replace(out, tensor_parallel_sizes=out.r4_tensor_parallel_sizes(inter))


def largest_hadamard_order(n: int) -> int:
    """The largest divisor of ``n`` that is a Hadamard order this package builds
    (``spinquant_kernels.hadamard.decompose``); 1 at worst."""
    for d in range(n, 0, -1):
        if n % d == 0:
            try:
                decompose(d)
            except ValueError:
                continue
            return d
    raise ValueError(f"largest_hadamard_order needs an int >= 1, got {n!r}")


def learning_weight_bits(cfg: fmt.SpinQuantConfig) -> int | None:
    """Weight fake quant during rotation learning (paper: W16 before GPTQ, W4 for RTN).

    When neither activations nor KV are quantized, the 16-bit objective would
    not depend on the rotation, so weights are fake-quantized then too.
    """
    if cfg.weight_method == fmt.WeightMethod.RTN or not (cfg.quantize_acts or cfg.quantize_kv):
        return cfg.weight_bits
    return None


def save_rotations(path: str, R1: torch.Tensor, R2s: list[torch.Tensor], meta: dict | None = None) -> None:
    """Write learned rotations (float64) to ``path`` atomically."""
    import os
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"R1": R1.double().cpu(), "R2": torch.stack([r.double().cpu() for r in R2s]),
                "meta": meta or {}}, tmp)
    os.replace(tmp, path)


def load_rotations(path: str, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rotations written by :func:`save_rotations`, checked against ``model``'s shapes."""
    d = torch.load(path, map_location="cpu", weights_only=True)
    H, hd, L = model.config.hidden_size, rotation.head_dim(model), len(model.model.layers)
    R1, R2 = d.get("R1"), d.get("R2")
    if R1 is None or tuple(R1.shape) != (H, H):
        raise ValueError(f"{path}: R1 must be ({H}, {H}), got {None if R1 is None else tuple(R1.shape)}")
    if R2 is None or tuple(R2.shape) != (L, hd, hd):
        raise ValueError(f"{path}: R2 must be ({L}, {hd}, {hd}), got {None if R2 is None else tuple(R2.shape)}")
    return R1, list(R2.unbind(0))


def build(model: nn.Module, tokenizer, cfg: fmt.SpinQuantConfig, opts: PipelineOptions,
          calib_ids: torch.Tensor | None = None,
          rotations: tuple[torch.Tensor, list[torch.Tensor]] | None = None
          ) -> tuple[nn.Module, fmt.SpinQuantConfig, dict]:
    """Turn a loaded float model into the fake-quant SpinQuant model (in place).

    ``calib_ids (n, seqlen)`` defaults to ``opts.calib_samples`` windows of the
    calibration text. ``rotations`` = ``(R1, R2s)`` learned earlier skips the
    learning (``cfg.rotation`` must be ``learned``). Returns
    ``(model, resolved cfg, meta)``.
    """
    if rotations is not None and cfg.rotation != fmt.Rotation.LEARNED:
        raise ValueError(f"precomputed rotations need rotation='learned', got {cfg.rotation.value!r}")
    from .data import calibration_windows

    rotation.check_supported(model)
    cfg = resolve_config(model, cfg)
    meta: dict = {"config": cfg.to_dict(), "options": dataclasses.asdict(opts), "timings_s": {}}
    g = torch.Generator().manual_seed(opts.seed)
    learn = cfg.rotation == fmt.Rotation.LEARNED and rotations is None
    need_calib = learn or cfg.weight_method == fmt.WeightMethod.GPTQ
    if calib_ids is None and need_calib:
        n = max(opts.calib_samples, opts.gptq_samples)
        calib_ids = calibration_windows(tokenizer, n, opts.seqlen, generator=g)
    t0 = time.time()
    rotation.fuse_norms(model)
    R1, R2s = rotation.init_rotations(model, cfg.rotation, g)
    fake_quant.install(model, cfg)
    if rotations is not None:
        R1, R2s = rotations
    elif learn:
        R1, R2s, hist = learn_rotations(
            model, cfg, calib_ids[:opts.calib_samples], steps=opts.steps, lr=opts.lr,
            batch_size=opts.batch_size, R1=R1, R2s=R2s,
            weight_fake_bits=learning_weight_bits(cfg), progress=opts.progress,
            weight_clip_search=opts.weight_clip_search)
        meta["learning"] = hist
    meta["rotations"] = (R1, R2s)
    meta["timings_s"]["rotation"] = time.time() - t0
    if cfg.rotation != fmt.Rotation.NONE:
        rotation.absorb_rotations(model, R1, R2s, cfg.r4_size)
    t0 = time.time()
    gptq.quantize_weights(model, cfg, None if calib_ids is None else calib_ids[:opts.gptq_samples],
                          act_order=opts.act_order, progress=opts.progress,
                          clip_search=opts.weight_clip_search)
    meta["timings_s"]["weights"] = time.time() - t0
    return model, cfg, meta


def quantize(model_path: str | None, out_dir: str, cfg: fmt.SpinQuantConfig,
             opts: PipelineOptions = PipelineOptions(), overwrite: bool = False,
             rotations_path: str | None = None) -> dict:
    """Load ``model_path`` (None: the bundled SmolLM2), build, and write a checkpoint.

    ``rotations_path`` loads learned rotations (:func:`save_rotations`) instead
    of learning them; with learning, the rotations are saved beside the
    checkpoint as ``rotations.pt``.
    """
    import os

    from .checkpoint import save_checkpoint
    from .model import load_model

    model, tokenizer = load_model(model_path, dtype=torch.float32, device=opts.device)
    rots = None if rotations_path is None else load_rotations(rotations_path, model)
    model, cfg, meta = build(model, tokenizer, cfg, opts, rotations=rots)
    R1, R2s = meta.pop("rotations")
    meta["source_model"] = model_path or "bundled SmolLM2-135M-Instruct Q4_1 GGUF"
    if rotations_path is not None:
        meta["rotations_from"] = rotations_path
    save_checkpoint(out_dir, model, cfg, tokenizer, meta, overwrite=overwrite)
    if cfg.rotation == fmt.Rotation.LEARNED:
        save_rotations(os.path.join(out_dir, "rotations.pt"), R1, R2s, meta.get("learning"))
    return meta
