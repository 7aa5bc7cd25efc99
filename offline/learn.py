"""Learning R1 and the per-layer R2 with Cayley SGD through the fake-quant network.

The model's weights stay frozen (norm-folded, unrotated). Each step builds
the rotated weights from the current ``(R1, R2s)`` with
``rotation.rotated_weights`` and runs the fake-quantized network on them via
``torch.func.functional_call``; the loss is next-token cross-entropy and the
straight-through quantizers pass gradients to the rotations.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from spinquant_kernels import format as fmt

from . import fake_quant, rotation
from .cayley import CayleySGD, orthogonality_error


def learn_rotations(model: nn.Module, cfg: fmt.SpinQuantConfig, calib_ids: torch.Tensor,
                    steps: int = 100, lr: float = 1.5, batch_size: int = 1,
                    R1: torch.Tensor | None = None, R2s: list[torch.Tensor] | None = None,
                    generator: torch.Generator | None = None, weight_fake_bits: int | None = None,
                    progress: bool = True, weight_clip_search: bool = True) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """Learn ``(R1, R2s)`` for ``model``; returns them in float64 plus a history.

    ``model`` must be norm-fused (``rotation.fuse_norms``) with the fake quant
    of ``cfg`` installed (``fake_quant.install``) and unrotated weights.
    ``calib_ids (n, seqlen)`` are the calibration windows; each step takes
    ``batch_size`` of them in order (wrapping around). ``weight_fake_bits``
    fake-quantizes weights during learning (the paper learns with W16 when
    GPTQ follows and with quantized weights for RTN); ``weight_clip_search``
    picks its scales as the final RTN will (MSE clip search or absmax). The learning rate
    decays linearly from ``lr`` to 0.
    """
    if calib_ids.dim() != 2:
        raise ValueError(f"calib_ids must be (n, seqlen), got shape {tuple(calib_ids.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    if R1 is None or R2s is None:
        R1, R2s = rotation.init_rotations(model, fmt.Rotation.HADAMARD, generator)
    base = {k: v.float() for k, v in rotation.base_weights(model).items()}
    R1p = nn.Parameter(R1.to(device=device, dtype=torch.float32))
    R2p = [nn.Parameter(r.to(device=device, dtype=torch.float32)) for r in R2s]
    opt = CayleySGD([R1p, *R2p], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    fake_quant.set_weight_fake_bits(model, weight_fake_bits, weight_clip_search)
    was_training = model.training
    model.eval()
    history: dict = {"loss": [], "lr": [], "seconds": 0.0}
    t0 = time.time()
    bar = _progress(steps, progress)
    try:
        for step in range(steps):
            idx = [(step * batch_size + j) % calib_ids.shape[0] for j in range(batch_size)]
            ids = calib_ids[idx].to(device)
            weights = rotation.rotated_weights(model, base, R1p, R2p, cfg.r4_size)
            out = torch.func.functional_call(model, weights, args=(ids,), kwargs={"labels": ids},
                                             strict=False)
            loss = out.loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"rotation learning diverged at step {step}: loss={loss.item()}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            history["lr"].append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            history["loss"].append(loss.item())
            bar(step, loss.item())
    finally:
        fake_quant.set_weight_fake_bits(model, None)
        model.train(was_training)
    history["seconds"] = time.time() - t0
    history["orthogonality_error_R1"] = orthogonality_error(R1p.detach().double())
    return R1p.detach().double().cpu(), [r.detach().double().cpu() for r in R2p], history


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda step, loss: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None:
        def log(step, loss):
            if step % max(1, total // 20) == 0 or step == total - 1:
                print(f"[rotation] step {step + 1}/{total} loss {loss:.4f}", flush=True)
        return log
    bar = tqdm(total=total, desc="learning rotations", mininterval=2.0)

    def update(step, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if step == total - 1:
            bar.close()
    return update
