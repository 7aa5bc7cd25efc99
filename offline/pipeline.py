"""The offline pipeline: rotations and quantized weights first, then the checkpoint.

Phase 1 (:func:`build`): fold norms, pick R1/R2 (identity, random Hadamard or
learned), absorb them, install the fake-quant runtime, quantize weights.
Phase 2 (:func:`quantize`): the same from a model path, then
``checkpoint.save_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from spinquant_kernels import format as fmt

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
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "calib_samples", "seqlen", "batch_size", "gptq_samples"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PipelineOptions.{name} must be an int >= 1, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"PipelineOptions.lr must be > 0, got {self.lr!r}")


def resolve_config(model: nn.Module, cfg: fmt.SpinQuantConfig) -> fmt.SpinQuantConfig:
    """Fill in the online Hadamard sizes the rotation choice implies.

    Rotated models get R4 over the whole intermediate dimension and, when the
    KV cache is quantized, R3 over head_dim. ``none`` gets neither.
    """
    if cfg.rotation == fmt.Rotation.NONE:
        return dataclasses.replace(cfg, r4_size=0, r3_size=0)
    r4 = cfg.r4_size or model.config.intermediate_size
    if model.config.intermediate_size % r4:
        raise ValueError(f"r4_size {r4} must divide intermediate_size {model.config.intermediate_size}")
    r3 = rotation.head_dim(model) if cfg.quantize_kv else 0
    return dataclasses.replace(cfg, r4_size=r4, r3_size=r3)


def learning_weight_bits(cfg: fmt.SpinQuantConfig) -> int | None:
    """Weight fake quant during rotation learning (paper: W16 before GPTQ, W4 for RTN).

    When neither activations nor KV are quantized, the 16-bit objective would
    not depend on the rotation, so weights are fake-quantized then too.
    """
    if cfg.weight_method == fmt.WeightMethod.RTN or not (cfg.quantize_acts or cfg.quantize_kv):
        return cfg.weight_bits
    return None


def build(model: nn.Module, tokenizer, cfg: fmt.SpinQuantConfig, opts: PipelineOptions,
          calib_ids: torch.Tensor | None = None) -> tuple[nn.Module, fmt.SpinQuantConfig, dict]:
    """Turn a loaded float model into the fake-quant SpinQuant model (in place).

    ``calib_ids (n, seqlen)`` defaults to ``opts.calib_samples`` windows of the
    calibration text. Returns ``(model, resolved cfg, meta)``.
    """
    from .data import calibration_windows

    rotation.check_supported(model)
    cfg = resolve_config(model, cfg)
    meta: dict = {"config": cfg.to_dict(), "options": dataclasses.asdict(opts), "timings_s": {}}
    g = torch.Generator().manual_seed(opts.seed)
    need_calib = cfg.rotation == fmt.Rotation.LEARNED or cfg.weight_method == fmt.WeightMethod.GPTQ
    if calib_ids is None and need_calib:
        n = max(opts.calib_samples, opts.gptq_samples)
        calib_ids = calibration_windows(tokenizer, n, opts.seqlen, generator=g)
    t0 = time.time()
    rotation.fuse_norms(model)
    R1, R2s = rotation.init_rotations(model, cfg.rotation, g)
    fake_quant.install(model, cfg)
    if cfg.rotation == fmt.Rotation.LEARNED:
        R1, R2s, hist = learn_rotations(
            model, cfg, calib_ids[:opts.calib_samples], steps=opts.steps, lr=opts.lr,
            batch_size=opts.batch_size, R1=R1, R2s=R2s,
            weight_fake_bits=learning_weight_bits(cfg), progress=opts.progress)
        meta["learning"] = hist
    meta["timings_s"]["rotation"] = time.time() - t0
    if cfg.rotation != fmt.Rotation.NONE:
        rotation.absorb_rotations(model, R1, R2s, cfg.r4_size)
    t0 = time.time()
    gptq.quantize_weights(model, cfg, None if calib_ids is None else calib_ids[:opts.gptq_samples],
                          act_order=opts.act_order, progress=opts.progress)
    meta["timings_s"]["weights"] = time.time() - t0
    return model, cfg, meta


def quantize(model_path: str | None, out_dir: str, cfg: fmt.SpinQuantConfig,
             opts: PipelineOptions = PipelineOptions(), overwrite: bool = False) -> dict:
    """Load ``model_path`` (None: the bundled SmolLM2), build, and write a checkpoint."""
    from .checkpoint import save_checkpoint
    from .model import load_model

    model, tokenizer = load_model(model_path, dtype=torch.float32, device=opts.device)
    model, cfg, meta = build(model, tokenizer, cfg, opts)
    meta["source_model"] = model_path or "bundled SmolLM2-135M-Instruct Q4_1 GGUF"
    save_checkpoint(out_dir, model, cfg, tokenizer, meta, overwrite=overwrite)
    return meta
