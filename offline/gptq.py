"""Weight quantization: RTN and GPTQ, both through ``spinquant_kernels.format``.

GPTQ (Frantar et al. 2022) runs layer by layer: the calibration activations
reach decoder layer ``i`` through layers ``0..i-1`` that are already
quantized (weights and, as configured, activations/KV), each linear's
Hessian ``2 X^T X / n`` is built from its input exactly as the GEMM sees it
(after the online Hadamard, before activation quantization), and columns are
quantized in blocks with the error fed forward through the inverse-Hessian
Cholesky factor. Scales are per output channel, chosen on the full weight
by the format's MSE clip search before the column loop.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from spinquant_kernels import format as fmt

from .fake_quant import QuantLinear, quant_linears


@torch.no_grad()
def rtn(w: torch.Tensor, bits: int, clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest (MSE clip search or absmax scales): ``(q (N,K) int8, scale (N,) f32)``."""
    return fmt.quantize_weight(w, bits, mse=clip_search)


# Damping tries: ``damp``, then 10x and 100x it, before the Hessian is refused.
DAMP_TRIES = 3


def _damped_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Cholesky factor of ``H + d * mean(diag H) * I`` for the first ``d`` in damp, 10 damp, 100 damp that works.

    Float error can leave a Hessian of strongly outlying activations with a
    slightly negative eigenvalue that the default damping does not cover;
    larger damping (as other GPTQ implementations do) trades a little
    precision for a factorization. A warning names the damping used.
    """
    K = H.shape[0]
    base = torch.mean(torch.diag(H))
    eye = torch.eye(K, device=H.device, dtype=H.dtype)
    for attempt in range(DAMP_TRIES):
        d = damp * 10 ** attempt
        L, info = torch.linalg.cholesky_ex(H + d * base * eye)
        if int(info) == 0:
            if attempt:
                warnings.warn(f"GPTQ: Hessian ({K}x{K}) needed damping {d:g} x its mean diagonal "
                              f"(default {damp:g}) to factorize", RuntimeWarning, stacklevel=3)
            return L
    raise ValueError(f"GPTQ: Hessian ({K}x{K}) is not positive definite even with damping {d:g} x its mean "
                     f"diagonal (mean diagonal {float(base):.3g}; leading minor {int(info)} failed)")


@torch.no_grad()
def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, block: int = 128, damp: float = 0.01,
         act_order: bool = False, clip_search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of ``w (N, K)`` with Hessian ``H (K, K)``: ``(q (N,K) int8, scale (N,) f32)``."""
    N, K = w.shape
    if tuple(H.shape) != (K, K):
        raise ValueError(f"Hessian must be ({K}, {K}) for a weight of shape {(N, K)}, got {tuple(H.shape)}")
    W = w.detach().clone().float()
    H = H.detach().clone().float()
    scale = fmt.weight_scale_mse(W, bits) if clip_search else fmt.sym_scale(W, bits)  # (N, 1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    L = _damped_cholesky(H, damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    Q = torch.zeros(N, K, dtype=fmt.CODE_DTYPE, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for j in range(i2 - i1):
            col = W1[:, j:j + 1]
            q = fmt.quantize_sym(col, scale, bits)
            Q[:, i1 + j] = q[:, 0]
            err = (col - fmt.dequantize_sym(q, scale)) / Hb[j, j]
            W1[:, j:] -= err @ Hb[j:j + 1, j:]
            Err[:, j:j + 1] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale.squeeze(1).to(fmt.SCALE_DTYPE)


class _Hessian:
    """Running ``2 X^T X / n`` over the rows of every input seen."""

    def __init__(self, k: int, device):
        self.H = torch.zeros(k, k, device=device, dtype=torch.float32)
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


@torch.no_grad()
def quantize_weights(model: nn.Module, cfg: fmt.SpinQuantConfig, calib_ids: torch.Tensor | None = None,
                     act_order: bool = False, progress: bool = True, clip_search: bool = True
                     ) -> dict[str, QuantLinear]:
    """Quantize every QuantLinear's weight (RTN or GPTQ per ``cfg.weight_method``), in place.

    ``clip_search`` chooses the per-channel scales by the MSE clip search
    (default) or as plain absmax.
    """
    linears = quant_linears(model)
    if not linears:
        raise ValueError("model has no QuantLinear layers: call fake_quant.install(model, cfg) first")
    if cfg.weight_method == fmt.WeightMethod.RTN:
        for lin in linears.values():
            lin.set_quantized_weight(*rtn(lin.weight, cfg.weight_bits, clip_search))
        return linears
    if calib_ids is None:
        raise ValueError("GPTQ needs calibration ids (n, seqlen); got None")
    _gptq_sequential(model, cfg, calib_ids, act_order, progress, clip_search)
    return linears


def _gptq_sequential(model, cfg, calib_ids, act_order, progress, clip_search):
    device = next(model.parameters()).device
    layers = model.model.layers
    inputs: list[tuple[tuple, dict]] = []

    class _Stop(Exception):
        pass

    def grab(module, args, kwargs):
        inputs.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(calib_ids.shape[0]):
            try:
                model(calib_ids[i:i + 1].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    for li, layer in enumerate(layers):
        lins = {n: m for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        hs = {n: _Hessian(m.in_features, device) for n, m in lins.items()}
        for n, m in lins.items():
            m.input_hook = hs[n]
        try:
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        finally:
            for m in lins.values():
                m.input_hook = None
        for n, m in lins.items():
            m.set_quantized_weight(*gptq(m.weight, hs[n].H, cfg.weight_bits, act_order=act_order,
                                         clip_search=clip_search))
        new_inputs = []
        for args, kwargs in inputs:
            out = layer(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            new_inputs.append(((out,) + tuple(args[1:]), kwargs))
        inputs = new_inputs
        if progress:
            print(f"[gptq] layer {li + 1}/{len(layers)} done", flush=True)
