import pytest
import torch

from spinquant_offline.cayley import CayleySGD, orthogonality_error


def _orth(n, g, dtype=torch.float32):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].to(dtype)


def test_stays_orthonormal_over_200_fp32_steps():
    g = torch.Generator().manual_seed(0)
    R = torch.nn.Parameter(_orth(64, g))
    A = torch.randn(128, 64, generator=g)
    opt = CayleySGD([R], lr=1.5)
    for _ in range(200):
        loss = (A @ R).pow(4).mean()  # kurtosis-like objective, large gradients
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert orthogonality_error(R.detach()) < 1e-5


@pytest.mark.parametrize("momentum", [0.0, 0.8])
def test_reaches_procrustes_optimum(momentum):
    # min ||A R - B||^2 over orthogonal R has the closed form U V^T (SVD of A^T B).
    g = torch.Generator().manual_seed(1)
    n = 16
    A = torch.randn(64, n, generator=g, dtype=torch.float64)
    R_true = _orth(n, g, torch.float64)
    if torch.det(R_true) < 0:  # Cayley steps from I stay in SO(n)
        R_true[:, 0] = -R_true[:, 0]
    B = A @ R_true
    R = torch.nn.Parameter(torch.eye(n, dtype=torch.float64))
    opt = CayleySGD([R], lr=0.05, momentum=momentum)
    for _ in range(1500):
        loss = (A @ R - B).pow(2).sum() / A.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    U, _, Vh = torch.linalg.svd(A.T @ B)
    assert torch.allclose(R.detach(), U @ Vh, atol=1e-4)
    assert orthogonality_error(R.detach()) < 1e-10


def test_rejects_non_orthogonal_and_bad_args():
    R = torch.nn.Parameter(2 * torch.eye(4))
    opt = CayleySGD([R], lr=0.1)
    R.grad = torch.ones(4, 4)
    with pytest.raises(ValueError, match="not orthogonal"):
        opt.step()
    with pytest.raises(ValueError, match="lr must be >= 0"):
        CayleySGD([R], lr=-1)
    with pytest.raises(ValueError, match="momentum must be in"):
        CayleySGD([R], momentum=1.0)
