"""Hadamard matrices of order m * 2^k and the reference transform.

Integer constructions are checked exactly (H H^T == n I in float64, where all
sums are small integers); the orthonormal forms against fp64 matrices.
"""

import ast
import inspect
import math
import re

import pytest
import torch

from spinquant_kernels import hadamard as had

BASES = [1, 2] + had.supported_base_orders()
# Model dimensions (head dims, hidden and intermediate sizes of Llama / Mistral
# / Qwen / SmolLM families) that must be supported; 896 is Qwen2.5-0.5B's hidden,
# 28672 Llama-3-70B's intermediate.
MODEL_SIZES = [64, 128, 576, 896, 1536, 4864, 11008, 14336, 18944, 28672]
# Small enough to materialise and square exactly within the time budget.
SMALL_SIZES = sorted({n for n in MODEL_SIZES if n <= 1536}
                     | {m * 2 ** k for m in BASES for k in (0, 1, 2)})


def _sylvester_entry(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Entry (i, j) of the Sylvester matrix: (-1)^popcount(i & j), float64."""
    b = i[:, None] & j[None, :]
    parity = torch.zeros_like(b)
    while bool(b.any()):
        parity ^= b & 1
        b = b >> 1
    return 1.0 - 2.0 * parity.to(torch.float64)


def _rows_by_formula(n: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of H_m (x) H_{2^k}, built entrywise, float64 (len(idx), n)."""
    m, p = had.decompose(n)
    A = had.base_hadamard(m)
    j = torch.arange(n)
    return A[idx // p][:, j // p] * _sylvester_entry(idx % p, j % p)


# ----------------------------------------------------------------------------
# constructions
# ----------------------------------------------------------------------------
def test_supported_orders_cover_156_and_172():
    orders = had.supported_base_orders()
    assert 156 in orders and 172 in orders
    assert orders == sorted(orders)
    assert had.decompose(11008) == (172, 64)
    assert had.decompose(156 * 8) == (156, 8)


@pytest.mark.parametrize("m", BASES)
def test_base_order_is_hadamard_exactly(m):
    H = had.base_hadamard(m)
    assert H.shape == (m, m) and H.dtype == torch.float64
    assert bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64))


def test_base_hadamard_returns_a_fresh_tensor():
    H = had.base_hadamard(12)
    H.zero_()
    assert torch.equal(had.base_hadamard(12).abs(), torch.ones(12, 12, dtype=torch.float64))
    G = had.hadamard_matrix(24, normalized=False)
    G.zero_()
    assert torch.equal(had.hadamard_matrix(24, normalized=False).abs(),
                       torch.ones(24, 24, dtype=torch.float64))


@pytest.mark.parametrize("n", SMALL_SIZES)
def test_hadamard_matrix_exact_and_orthonormal(n):
    H = had.hadamard_matrix(n, normalized=False)
    assert bool(((H == 1) | (H == -1)).all())
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    R = had.hadamard_matrix(n)
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    # the construction is the Kronecker structure the fast transform assumes
    idx = torch.arange(n)
    assert torch.equal(H, _rows_by_formula(n, idx))


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_sampled_rows(n):
    """Large orders without materialising H: rows through the transform of e_i."""
    m, p = had.decompose(n)
    assert m * p == n and m in BASES and p & (p - 1) == 0
    g = torch.Generator().manual_seed(n)
    idx = torch.cat([torch.tensor([0, n - 1]), torch.randint(0, n, (14,), generator=g)])
    E = torch.zeros(len(idx), n, dtype=torch.float64)
    E[torch.arange(len(idx)), idx] = 1.0
    rows = had.hadamard_transform_ref(E)                       # rows idx of H_n / sqrt(n)
    exact = _rows_by_formula(n, idx)
    assert bool(((exact == 1) | (exact == -1)).all())
    torch.testing.assert_close(rows, exact / math.sqrt(n), atol=1e-14, rtol=0)
    gram = exact @ exact.T                                     # integers: exact in fp64
    expect = n * (idx[:, None] == idx[None, :]).to(torch.float64)
    assert torch.equal(gram, expect)


def test_full_size_r4_of_qwen2_is_exact_and_orthonormal():
    """Qwen2.5-0.5B's R4 over its whole intermediate 4864 = 76 x 64, materialised."""
    n = 4864
    assert had.decompose(n) == (76, 64)
    H = had.hadamard_matrix(n, normalized=False)
    assert torch.equal(H, torch.kron(had.base_hadamard(76), had.hadamard_matrix(64, normalized=False)))
    assert bool(((H == 1) | (H == -1)).all())
    # +-1 entries and |sums| <= 4864 < 2^24: the float32 Gram matrix is exact (and 8x cheaper)
    H32 = H.float()
    assert torch.equal(H32 @ H32.T, n * torch.eye(n))
    R = had.hadamard_matrix(n)
    assert torch.equal(R, H / math.sqrt(n))  # so R R^T = I up to the rounding of 1/sqrt(n)


@pytest.mark.parametrize("n, shards", [
    (4864, {1: (76, 64), 2: (76, 32), 4: (76, 16), 8: (76, 8)}),          # Qwen2.5-0.5B
    (28672, {1: (28, 1024), 2: (28, 512), 4: (28, 256), 8: (28, 128)}),   # Llama-3-70B
])
def test_r4_blocks_of_tensor_parallel_shards(n, shards):
    """Each rank of a TP-t down_proj holds n / t columns; a block of that order is a Hadamard."""
    for t, mp in shards.items():
        assert had.decompose(n // t) == mp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    y = had.hadamard_transform_ref(x, n // 8)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    # block-diagonal: each shard's block transforms on its own
    blk = n // 8
    torch.testing.assert_close(y[:, blk:2 * blk], had.hadamard_transform_ref(x[:, blk:2 * blk]),
                               atol=1e-14, rtol=0)


@pytest.mark.parametrize("n", [9, 14, 15, 188, 1000, 7 * 3 * 16])
def test_decompose_rejects_impossible_orders(n):
    with pytest.raises(ValueError, match=rf"\b{n}\b"):
        had.decompose(n)
    with pytest.raises(ValueError, match=rf"\b{n}\b"):
        had.hadamard_matrix(n)


@pytest.mark.parametrize("n", [0, -4, 2.0, True])
def test_decompose_rejects_non_positive_ints(n):
    with pytest.raises(ValueError, match=re.escape(repr(n))):
        had.decompose(n)


def test_base_hadamard_rejects_unknown_order():
    with pytest.raises(ValueError, match=r"\b92\b"):
        had.base_hadamard(92)


def test_no_literal_matrix_in_source():
    """Matrices are generated in code; the only data are short +- sign strings."""
    tree = ast.parse(inspect.getsource(had))
    sign_chars = 0
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            # every number inside this literal, nested rows included
            numbers = [c for c in ast.walk(node)
                       if isinstance(c, ast.Constant) and isinstance(c.value, (int, float))
                       and not isinstance(c.value, bool)]
            assert len(numbers) <= 16, \
                f"literal with {len(numbers)} numbers at line {node.lineno}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and node.value and set(node.value) <= {"+", "-"}:
            assert len(node.value) <= 64, f"sign string of {len(node.value)} at line {node.lineno}"
            sign_chars += len(node.value)
    assert 0 < sign_chars <= 1000, f"{sign_chars} sign characters of data in the module"


def test_sequences_have_the_array_shape():
    for order, (kind, seqs) in had._SEQUENCES.items():
        assert kind in ("williamson", "goethals_seidel")
        assert len(seqs) == 4 and {len(s) for s in seqs} == {order // 4}
        if kind == "williamson":   # Williamson blocks must be symmetric circulants
            for s in seqs:
                assert s[1:] == s[1:][::-1]


# ----------------------------------------------------------------------------
# reference transform
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 12, 64, 128, 156, 172, 40 * 2, 148 * 2, 576, 172 * 4])
def test_transform_identity_matches_fp64_matrix(n):
    I = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(had.hadamard_transform_ref(I), had.hadamard_matrix(n),
                               atol=1e-14, rtol=0)


@pytest.mark.parametrize("n", [1, 20, 64, 156, 172, 344])
@pytest.mark.parametrize("lead", [(), (1,), (3, 5)])
def test_transform_block_diagonal(n, lead):
    g = torch.Generator().manual_seed(n + len(lead))
    K = 3 * n
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64)
    R = had.hadamard_matrix(n)
    expect = x @ torch.block_diag(R, R, R)
    y = had.hadamard_transform_ref(x, n)
    assert y.shape == x.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, expect, atol=1e-12, rtol=1e-12)
    # one block over the whole row when n is omitted
    torch.testing.assert_close(had.hadamard_transform_ref(x[..., :n]), x[..., :n] @ R,
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_transform_low_precision(dtype, atol):
    """Error below 2x that of a same-dtype matmul with the matrix, plus atol."""
    g = torch.Generator().manual_seed(0)
    n = 172 * 2
    x = torch.randn(4, 2 * n, generator=g).to(dtype)
    R = torch.block_diag(*[had.hadamard_matrix(n)] * 2)
    expect = x.double() @ R
    y = had.hadamard_transform_ref(x, n)
    assert y.dtype == dtype and y.shape == x.shape
    base_err = ((x @ R.to(dtype)).double() - expect).abs().max()
    err = (y.double() - expect).abs().max()
    assert err <= 2 * base_err + atol, (float(err), float(base_err))


def test_transform_is_involution_up_to_transpose_and_preserves_norm():
    g = torch.Generator().manual_seed(1)
    n = 156
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    y = had.hadamard_transform_ref(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y @ had.hadamard_matrix(n).T, x, atol=1e-12, rtol=1e-12)


def test_transform_does_not_mutate_input():
    x = torch.arange(24, dtype=torch.float64).reshape(2, 12)
    before = x.clone()
    had.hadamard_transform_ref(x, 12)
    assert torch.equal(x, before)


@pytest.mark.parametrize("n", [5, 0, 24])
def test_transform_rejects_bad_block(n):
    x = torch.zeros(2, 36)
    with pytest.raises(ValueError, match=rf"\b{n}\b"):
        had.hadamard_transform_ref(x, n)


# ----------------------------------------------------------------------------
# randomized Hadamard
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 172, 576])
def test_random_hadamard_orthogonal_and_deterministic(n):
    R1 = had.random_hadamard_matrix(n, generator=torch.Generator().manual_seed(7))
    R2 = had.random_hadamard_matrix(n, generator=torch.Generator().manual_seed(7))
    R3 = had.random_hadamard_matrix(n, generator=torch.Generator().manual_seed(8))
    assert torch.equal(R1, R2)
    assert not torch.equal(R1, R3)
    I = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(R1 @ R1.T, I, atol=1e-12, rtol=0)
    torch.testing.assert_close(R1.T @ R1, I, atol=1e-12, rtol=0)
    # diag(s) H / sqrt(n): each row is +- the matching row of H / sqrt(n)
    s = (R1 * had.hadamard_matrix(n)).sum(dim=1)
    assert torch.equal(s.abs().round(decimals=9), torch.ones(n, dtype=torch.float64))


def test_random_hadamard_dtype():
    R = had.random_hadamard_matrix(64, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float32)
    assert R.dtype == torch.float32 and R.shape == (64, 64)
