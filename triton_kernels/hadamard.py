"""Hadamard matrices of order m * 2**k, generated in code, and reference transforms.

Orders: ``H_n = H_m (x) H_{2^k}`` (Kronecker product, ``m`` outer) with a base
order ``m`` built by Sylvester (1, 2), Paley I (``m = q + 1``, ``q`` a prime
power = 3 mod 4), Paley II (``m = 2(q + 1)``, ``q`` a prime power = 1 mod 4),
doubling, or a Williamson-type array (orders with no Paley construction).
Nothing here is a pasted table.

Convention for the orthonormal transform of a row vector ``x`` of length n:
``y = x @ R`` with ``R = H_n / sqrt(n)``. Viewing ``x`` as ``X (m, 2^k)``
row-major, ``y = A^T X B / sqrt(n)`` where ``A = H_m``, ``B = H_{2^k}``
(symmetric), which is what the fast reference computes.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

# Base orders this module builds (besides 1 and 2): for each, how.
# Paley I (q prime power, q = 3 mod 4): 12 (11), 20 (19), 28 (27), 44 (43),
# 60 (59), 108 (107), 140 (139).  Paley II (q = 1 mod 4): 36 (17), 52 (25),
# 76 (37), 148 (73).  40 = 2 x 20 by doubling.  156 = 4 * 39 (Goethals-Seidel,
# sequences derived from a Williamson quadruple of order 13) and 172 = 4 * 43
# (Williamson, Llama-2 7B's 11008 = 172 * 64): see _SEQUENCES.
BASE_ORDERS = (12, 20, 28, 36, 40, 44, 52, 60, 76, 108, 140, 148, 156, 172)


# ----------------------------------------------------------------------------
# finite fields GF(p^e), enough for the quadratic character
# ----------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    for p in range(2, q + 1):
        if q % p == 0:
            e, r = 0, q
            while r % p == 0:
                r //= p
                e += 1
            return (p, e) if r == 1 else None
    return None


def _poly_mulmod(a: tuple[int, ...], b: tuple[int, ...], mod: tuple[int, ...], p: int
                 ) -> tuple[int, ...]:
    """Product of two polynomials (coefficient tuples, low degree first) mod a monic poly."""
    e = len(mod) - 1
    prod = [0] * (2 * e - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, e - 1, -1):
        c = prod[d]
        if c:
            for i in range(e + 1):
                prod[d - e + i] = (prod[d - e + i] - c * mod[i]) % p
    return tuple(prod[:e])


def _irreducible(p: int, e: int) -> tuple[int, ...]:
    """First monic irreducible polynomial of degree e over GF(p), by search."""
    for tail in itertools.product(range(p), repeat=e):
        mod = tuple(tail) + (1,)
        if mod[0] == 0:
            continue
        # irreducible iff it has no factor of degree <= e // 2; brute-force via
        # checking that x^(p^i) != x mod f ... for tiny fields simply test that
        # the multiplicative group generated makes a field: every nonzero
        # element has an inverse.
        elems = list(itertools.product(range(p), repeat=e))
        one = (1,) + (0,) * (e - 1)
        ok = True
        for a in elems[1:]:
            if not any(_poly_mulmod(a, b, mod, p) == one for b in elems[1:]):
                ok = False
                break
        if ok:
            return mod
    raise ValueError(f"no irreducible polynomial of degree {e} over GF({p})")


def _quadratic_character(q: int) -> tuple[list[tuple[int, ...]], dict, callable]:
    """Elements of GF(q), chi(a - b) as a function of two element indices."""
    pe = _prime_power(q)
    if pe is None:
        raise ValueError(f"Paley construction needs a prime power, got q={q}")
    p, e = pe
    elems = list(itertools.product(range(p), repeat=e))
    index = {a: i for i, a in enumerate(elems)}
    mod = _irreducible(p, e) if e > 1 else (0, 1)
    squares = set()
    for a in elems[1:]:
        squares.add(_poly_mulmod(a, a, mod, p) if e > 1 else ((a[0] * a[0]) % p,))

    def chi(i: int, j: int) -> int:
        d = tuple((x - y) % p for x, y in zip(elems[i], elems[j]))
        if all(c == 0 for c in d):
            return 0
        return 1 if d in squares else -1

    return elems, index, chi


def _jacobsthal(q: int) -> torch.Tensor:
    _, _, chi = _quadratic_character(q)
    return torch.tensor([[chi(i, j) for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q + 1 for q = 3 mod 4: H = I + S, S skew with the Jacobsthal core."""
    Q = _jacobsthal(q)
    n = q + 1
    S = torch.zeros(n, n, dtype=torch.float64)
    S[0, 1:] = 1.0
    S[1:, 0] = -1.0
    S[1:, 1:] = Q
    return torch.eye(n, dtype=torch.float64) + S


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q + 1) for q = 1 mod 4 from the symmetric conference matrix."""
    Q = _jacobsthal(q)
    n = q + 1
    C = torch.zeros(n, n, dtype=torch.float64)
    C[0, 1:] = 1.0
    C[1:, 0] = 1.0
    C[1:, 1:] = Q
    plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    H = torch.kron(C, plus) + torch.kron(torch.eye(n, dtype=torch.float64), zero)
    return H


def _sylvester(k: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.float64)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        H = torch.kron(H, h2)
    return H


def _circulant(row: list[int]) -> torch.Tensor:
    n = len(row)
    r = torch.tensor(row, dtype=torch.float64)
    return torch.stack([torch.roll(r, i) for i in range(n)])


def _williamson(a: list[int], b: list[int], c: list[int], d: list[int]) -> torch.Tensor:
    """Williamson array from four circulant +-1 blocks of order n: order 4n."""
    A, B, C, D = (_circulant(s) for s in (a, b, c, d))
    return torch.cat([
        torch.cat([A, B, C, D], 1),
        torch.cat([-B, A, -D, C], 1),
        torch.cat([-C, D, A, -B], 1),
        torch.cat([-D, -C, B, A], 1),
    ], 0)


def _goethals_seidel(a: list[int], b: list[int], c: list[int], d: list[int]) -> torch.Tensor:
    """Goethals-Seidel array from four circulant +-1 blocks of order n: order 4n."""
    A, B, C, D = (_circulant(s) for s in (a, b, c, d))
    n = A.shape[0]
    R = torch.flip(torch.eye(n, dtype=torch.float64), dims=[1])
    BR, CR, DR = B @ R, C @ R, D @ R
    return torch.cat([
        torch.cat([A, BR, CR, DR], 1),
        torch.cat([-BR, A, D.T @ R, -(C.T @ R)], 1),
        torch.cat([-CR, -(D.T @ R), A, B.T @ R], 1),
        torch.cat([-DR, C.T @ R, -(B.T @ R), A], 1),
    ], 0)


def _times_t3(a: str, b: str, c: str, d: str) -> tuple[str, str, str, str]:
    """Goethals-Seidel sequences of length 3n from a Williamson quadruple of order n.

    Cooper-Wallis product with the T-matrices of order 3 ``T_i = P^i``
    (i = 0, 1, 2; T_4 = 0), P the cyclic shift: ``X_j = sum_i W_ji (x) T_i``
    over the first three columns of the Williamson array W. As W has
    orthogonal columns of symmetric commuting blocks and the T_i are disjoint
    with ``sum T_i T_i^T = 3I``, ``sum_j X_j X_j^T = 4 * 3n * I``. The X_j are
    group matrices of Z_n x Z_3, cyclic when gcd(n, 3) = 1, so position t of
    the circulant row reads block ``t mod 3`` at index ``t mod n`` (CRT).
    """
    n = len(a)
    if n % 3 == 0 or not len(a) == len(b) == len(c) == len(d):
        raise ValueError(f"_times_t3 needs four sequences of one length coprime to 3, "
                         f"got lengths {[len(a), len(b), len(c), len(d)]}")
    neg = {"+": "-", "-": "+"}
    # first three columns of the Williamson array used by _williamson, per row
    # j: (sign, sequence) for column 0, 1, 2
    rows = (((1, a), (1, b), (1, c)), ((-1, b), (1, a), (-1, d)),
            ((-1, c), (1, d), (1, a)), ((-1, d), (-1, c), (1, b)))
    out = []
    for row in rows:
        seq = []
        for t in range(3 * n):
            sign, s = row[t % 3]
            ch = s[t % n]
            seq.append(ch if sign > 0 else neg[ch])
        out.append("".join(seq))
    return tuple(out)


# Symmetric Williamson quadruple of order 13, found by our exhaustive search
# over symmetric +-1 first rows (a_0 = +1, 2^6 each, the fourth fixed by
# Williamson's condition a_i b_i c_i d_i = -1) with sum of squared DFTs = 52.
_WILLIAMSON_13 = ("++++-+--+-+++", "+-++------++-", "+-+---++---+-", "+--++----++--")

# Orders with no Paley construction get four +-1 sequences (data, not a matrix)
# consumed by a Williamson or Goethals-Seidel array. base_hadamard checks
# H H^T = m I for every order built.
_SEQUENCES: dict[int, tuple[str, tuple[str, str, str, str]]] = {
    156: ("goethals_seidel", _times_t3(*_WILLIAMSON_13)),
    # Symmetric Williamson quadruple of order 43 as listed (sign strings) in
    # SageMath's williamson_type_quadruples_smallcases
    # (src/sage/combinat/matrices/hadamard_matrix.py), which credits
    # M. Hall, Combinatorial Theory, 2nd ed., Wiley. Row sums -5, 7, 7, 7.
    172: ("williamson", (
        "++---++++-+--+--++--------++--+--+-++++---+",
        "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
        "++-++++++----+-+--++-++-++--+-+----++++++-+",
        "+---++--++++-+-+++-++--++-+++-+-++++--++---",
    )),
}


def base_hadamard(m: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of base order m, float64 (m, m).

    A fresh tensor each call (the cached one must not be mutated by callers).
    """
    return _base_hadamard(m).clone()


@functools.lru_cache(maxsize=None)
def _base_hadamard(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 2:
        return _sylvester(1)
    if m in _SEQUENCES:
        kind, seqs = _SEQUENCES[m]
        rows = [[1 if ch == "+" else -1 for ch in s] for s in seqs]
        H = (_williamson if kind == "williamson" else _goethals_seidel)(*rows)
    elif m % 4 == 0 and _prime_power(m - 1) and (m - 1) % 4 == 3:
        H = _paley1(m - 1)
    elif m % 4 == 0 and _prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        H = _paley2(m // 2 - 1)
    elif m % 8 == 0 and m // 2 in BASE_ORDERS:
        H = torch.kron(_sylvester(1), _base_hadamard(m // 2))
    else:
        supported = ", ".join(map(str, supported_base_orders()))
        raise ValueError(f"no Hadamard construction for base order {m}; "
                         f"supported base orders: 1, 2, {supported}")
    if not torch.equal(H @ H.T, m * torch.eye(m, dtype=torch.float64)):
        raise AssertionError(f"constructed matrix of order {m} is not Hadamard")
    return H


def supported_base_orders() -> list[int]:
    out = []
    for m in BASE_ORDERS:
        if m in _SEQUENCES or (_prime_power(m - 1) and (m - 1) % 4 == 3) or \
                (_prime_power(m // 2 - 1) and (m // 2 - 1) % 4 == 1) or \
                (m % 8 == 0 and m // 2 in BASE_ORDERS):
            out.append(m)
    return out


def decompose(n: int) -> tuple[int, int]:
    """``n = m * 2**k`` with the smallest supported base order m: returns (m, 2**k)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard order must be a positive int, got {n!r}")
    for m in (1,) + tuple(supported_base_orders()):
        if n % m == 0:
            p = n // m
            if p & (p - 1) == 0:
                return m, p
    raise ValueError(f"no Hadamard matrix of order {n}: it must be m * 2^k with m in "
                     f"{[1] + supported_base_orders()}")


# Small cache: an order-18944 matrix alone is 2.9 GB in float64.
@functools.lru_cache(maxsize=4)
def _hadamard_cpu(n: int) -> torch.Tensor:
    m, p = decompose(n)
    return torch.kron(_base_hadamard(m), _sylvester(int(math.log2(p))))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64,
                    device: torch.device | str | None = None, normalized: bool = True
                    ) -> torch.Tensor:
    """``H_n = H_m (x) H_{2^k}`` as (n, n); divided by sqrt(n) if ``normalized``."""
    H = _hadamard_cpu(n)
    # never hand out the cached tensor itself (.to is a no-op for float64 CPU)
    H = H / math.sqrt(n) if normalized else H.clone()
    return H.to(dtype=dtype, device=device)


def random_hadamard_matrix(n: int, generator: torch.Generator | None = None,
                           dtype: torch.dtype = torch.float64,
                           device: torch.device | str | None = None) -> torch.Tensor:
    """Orthonormal randomized Hadamard ``diag(s) H_n / sqrt(n)``, s random +-1."""
    s = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
    R = s.to(torch.float64)[:, None] * hadamard_matrix(n)
    return R.to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------
# reference transforms
# ----------------------------------------------------------------------------
def _fwht_last(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) over the last dim."""
    n = x.shape[-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*x.shape[:-1], n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return y.reshape(x.shape)


def hadamard_transform_ref(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Orthonormal ``x @ (H_n / sqrt(n))`` over blocks of the last dim.

    ``x (..., K)`` with ``K % n == 0`` (``n`` defaults to K): each contiguous
    block of n elements is transformed (a block-diagonal Hadamard). Computed
    in float32 (float64 inputs stay float64) and returned in x's dtype.
    """
    K = x.shape[-1]
    n = K if n is None else n
    if n < 1 or K % n:
        raise ValueError(f"Hadamard size {n} must divide the last dimension {K}")
    m, p = decompose(n)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    X = x.to(work).reshape(*x.shape[:-1], K // n, m, p)
    X = _fwht_last(X)
    if m > 1:
        A = _base_hadamard(m).to(dtype=work, device=x.device)
        X = torch.einsum("...ab,ac->...cb", X, A)
    return (X.reshape(x.shape) / math.sqrt(n)).to(x.dtype)
