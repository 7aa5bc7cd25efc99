"""Cayley SGD on the Stiefel manifold (Li, Fuxin, Todorovic 2020, arXiv 2002.01113).

SpinQuant (arXiv 2405.16406, Eqs. 2-3) updates each rotation ``R`` along the
Cayley transform of a skew-symmetric matrix built from the Euclidean
gradient ``G``::

    G_hat = G R^T - 1/2 R R^T G R^T        (Eq. 2, with R R^T = I)
    Y     = G_hat - G_hat^T                (skew-symmetric)
    R'    = (I - a/2 Y)^-1 (I + a/2 Y) R   (Eq. 3, a = -lr: descend)

The inverse is replaced by the fixed-point iteration of Li et al.:
``R' <- R + a/2 Y (R + R')`` started at ``R + a Y R``. The step is capped at
``a <= 1 / (||Y||_F + eps)`` (their step-size rule), which makes the
iteration a contraction with ratio <= 1/2; it runs until successive iterates
agree to ``tol`` (at most ``iterations`` times), so ``R'`` is the Cayley
transform to working precision and stays orthogonal over many steps (their
fixed two iterations drift by ~1e-3 in float32 over 200 large steps).
Momentum is optional and is projected to the tangent space as in their
Algorithm 1.
"""

from __future__ import annotations

import torch


class CayleySGD(torch.optim.Optimizer):
    """SGD on the Stiefel manifold for square orthogonal parameters.

    Every parameter must be a square matrix with ``R^T R = I`` (checked on the
    first step). ``lr`` may be changed by a scheduler as for any optimizer.
    """

    def __init__(self, params, lr: float = 1.5, momentum: float = 0.0, iterations: int = 40,
                 eps: float = 1e-8, tol: float | None = None):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        super().__init__(params, dict(lr=lr, momentum=momentum, iterations=iterations, eps=eps, tol=tol))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, beta, iters, eps = group["lr"], group["momentum"], group["iterations"], group["eps"]
            tol = group["tol"]
            for R in group["params"]:
                if R.grad is None:
                    continue
                if R.dim() != 2 or R.shape[0] != R.shape[1]:
                    raise ValueError(f"CayleySGD needs square matrices, got shape {tuple(R.shape)}")
                state = self.state[R]
                G = R.grad
                if not state:
                    err = (R.T @ R - torch.eye(R.shape[0], dtype=R.dtype, device=R.device)).abs().max()
                    if err > 1e-3:
                        raise ValueError(f"CayleySGD parameter is not orthogonal: max|R^T R - I| = {err:.2e}")
                    state["momentum"] = torch.zeros_like(R)
                M = beta * state["momentum"] - G  # descent direction
                # Eq. 2: project onto the tangent space as a skew matrix acting on the left.
                MRt = M @ R.T
                W_hat = MRt - 0.5 * R @ (R.T @ MRt)
                Y = W_hat - W_hat.T
                state["momentum"] = Y @ R
                alpha = min(lr, 1.0 / (torch.linalg.matrix_norm(Y).item() + eps))
                # Eq. 3 by fixed-point iteration.
                YR = Y @ R
                new = R + alpha * YR
                limit = tol if tol is not None else 4 * torch.finfo(R.dtype).eps
                for _ in range(iters):
                    prev, new = new, R + 0.5 * alpha * (Y @ (R + new))
                    if (new - prev).abs().max() <= limit:
                        break
                R.copy_(new)
        return loss


def orthogonality_error(R: torch.Tensor) -> float:
    """``max |R^T R - I|``."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    return (R.T @ R - eye).abs().max().item()
