"""Variable projection: the poles of a diagonal LDS fitted to a filter bank (used by `fit.fit_filters`).

The coefficients (B, C) of given poles are a linear least-squares problem (ridge-regularized QR); the
poles themselves are refined by Gauss-Newton on the projected residual, started from a Hankel
realization (Kung/ERA) of the filters. See `spectralds.distill.fit` for the method as a whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

F64 = torch.float64
RIDGE = 1e-12  # relative to ||filters||_F: bounds the coefficients at a cost far below the fit error
A_MAX = 1.0 - 2.0**-24  # the largest float32 below 1: every pole is strictly stable, also in float32
X_MAX = math.atanh(A_MAX)


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread for the fit's duration, restored after: a fit must give the same bytes
    whatever the caller's thread count (fits are cached and shared across runs and ranks), and torch
    has no per-call setting. Documented in `fit_filters`; other threads of the process see it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---- least squares for the coefficients -----------------------------------------------------------
def _powers(a: torch.Tensor, length: int) -> torch.Tensor:
    return a[None, :] ** torch.arange(length, dtype=F64)[:, None]


def _ridge_qr(V: torch.Tensor, Y: torch.Tensor, ridge: float):
    """QR least squares of min ||V G - Y||^2 + ridge^2 ||G||^2: returns Q, R, Q^T Y, residual, G.

    The residual has the rows of the ridge too (its square sum is the penalized cost)."""
    n = V.shape[1]
    Va = torch.cat([V, ridge * torch.eye(n, dtype=F64)])
    Ya = torch.cat([Y, Y.new_zeros(n, Y.shape[1])])
    Q, R = torch.linalg.qr(Va)
    proj = Q.T @ Ya
    G = torch.linalg.solve_triangular(R, proj, upper=True)
    return Q, R, proj, Ya - Q @ proj, G


def _coefficients(a: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """G (n, K) for the poles a, in float64 for exactly the powers `impulse_response` computes."""
    return _ridge_qr(_powers(a, phi.shape[0]), phi, RIDGE * float(phi.norm()))[-1]


# ---- varpro ---------------------------------------------------------------------------------------
def _basis(x: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V[t, j] = a_j^t for a = tanh(x), and dV/dx = t a^(t-1) (1 - a^2), without cancellation at |a|~1."""
    one_minus = 2.0 / (1.0 + torch.exp(2.0 * x.abs()))  # 1 - |a| without the rounding of a near +-1
    t = torch.arange(length, dtype=F64)[:, None]
    log_abs = torch.log1p(-one_minus)
    parity = torch.where((torch.arange(length) % 2 == 1)[:, None] & (x < 0)[None, :], -1.0, 1.0).to(F64)
    V = torch.exp(t * log_abs) * parity
    V[0] = 1.0  # also for a = 0
    dV = torch.zeros_like(V)
    dV[1:] = t[1:] * V[:-1] * (one_minus * (2.0 - one_minus))  # a^(t-1) is the previous row
    return V, dV


def _sampled_hankel(Y: torch.Tensor, samples: int = 400) -> tuple[torch.Tensor, ...]:
    """The block Hankel matrix H[(k, t), s] = Y[t + s, k] on a geometric grid of lags t, s < L/2.

    Rows and columns are weighted by the square root of the grid spacing, a quadrature of the full
    Hankel's Frobenius norm: its singular values match the full Hankel's (to 2 digits at L=8192).
    Returns (H, the row lags, the column lags = row lags and row lags + 1, the column weights).
    """
    half = Y.shape[0] // 2
    grid = torch.logspace(0, math.log10(half - 1), samples, dtype=F64).round().long().unique() - 1
    lags = grid[grid + 1 < half]
    cols = torch.cat([lags, lags + 1]).unique()

    def weight(idx: torch.Tensor) -> torch.Tensor:
        padded = torch.cat([idx[:1] - 1, idx, idx[-1:] + 1]).to(F64)
        return (0.5 * (padded[2:] - padded[:-2])).sqrt()

    w_rows, w_cols = weight(lags), weight(cols)
    block = Y[lags[:, None] + cols[None, :]] * (w_rows[:, None] * w_cols[None, :])[..., None]
    return block.permute(2, 0, 1).reshape(-1, cols.numel()), lags, cols, w_cols


def hankel_singular_values(filters: torch.Tensor, count: int = 100) -> torch.Tensor:
    """Estimated Hankel singular values of the bank of filters (columns), relative to the largest.

    The error of the best LDS with n states is of the order of the (n+1)-th value (AAK theory)."""
    with _single_thread():
        values = torch.linalg.svdvals(_sampled_hankel(filters.detach().to("cpu", F64))[0])[:count]
    return values / values[0]


def _hankel_poles(Y: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """For each n in `sizes`, n poles (as x = atanh(a)) from a Kung/ERA realization of the filters'
    sampled block Hankel (one SVD serves every size).

    Its top-n right singular vectors W span the rows of [B, AB, A^2 B, ...] sampled at the column
    lags, so W(s + 1) = W(s) A_n: the eigenvalues of A_n are the poles.
    """
    hankel, lags, cols, w_cols = _sampled_hankel(Y)
    Vh = torch.linalg.svd(hankel, full_matrices=False).Vh
    now, nxt = torch.searchsorted(cols, lags), torch.searchsorted(cols, lags + 1)
    result = []
    for n in sizes:
        W = Vh[:n].T / w_cols[:, None]
        Q, R = torch.linalg.qr(W[now])
        shift = torch.linalg.solve_triangular(R, Q.T @ W[nxt], upper=True)
        eig = torch.linalg.eigvals(shift)
        poles = eig.real + eig.imag  # real poles stay; a conjugate pair r +- ic becomes r + c, r - c
        result.append(torch.atanh(poles.clamp(-1.0, 1.0)).clamp(-X_MAX, X_MAX).sort().values)
    return result


def _refine_poles(targets: torch.Tensor, x: torch.Tensor, max_iters: int = 100, on_step=None) -> torch.Tensor:
    """Levenberg-Marquardt on the variable-projection cost min_x min_G ||V(x) G - Y||^2 (+ ridge).

    With V = QR, residual r_k, coefficients g_k and D = dV/dx, the Golub-Pereyra Jacobian is
    J_k = -(I - QQ^T) D diag(g_k) - Q R^-T diag(D^T r_k). Its two parts are orthogonal, and with
    (I - QQ^T) D = Q1 R1, ||r_k + J_k d||^2 = ||Q1^T r_k - R1 (g_k * d)||^2 + ||R^-T (D^T r_k * d)||^2
    up to a constant: the step solves a small (2 n K) x n least squares instead of an (L K) x n one.
    """
    Y = targets / targets.norm()
    length, n, K = Y.shape[0], x.numel(), Y.shape[1]

    def evaluate(x: torch.Tensor):
        V, dV = _basis(x, length)
        Q, R, _, res, G = _ridge_qr(V, Y, RIDGE)
        return float(res.square().sum()), (torch.cat([dV, dV.new_zeros(n, n)]), Q, R, res, G)

    cost, state = evaluate(x)
    history, damping = [cost], 1e-2
    for it in range(max_iters):
        dV, Q, R, res, G = state
        Q1, R1 = torch.linalg.qr(dV - Q @ (Q.T @ dV))
        DtR = dV.T @ res  # (n, K)
        R_inv_T = torch.linalg.solve_triangular(R.T, torch.eye(n, dtype=F64), upper=False)
        system = torch.cat([(R1[None] * G.T[:, None, :]).reshape(K * n, n),
                            (R_inv_T[None] * DtR.T[:, None, :]).reshape(K * n, n)])
        rhs = torch.cat([(Q1.T @ res).T.reshape(-1), res.new_zeros(K * n)])
        Qs, Rs = torch.linalg.qr(system)
        rhs, scale = Qs.T @ rhs, Rs.norm(dim=0).clamp_min(1e-300)
        while damping < 1e20:
            Qd, Rd = torch.linalg.qr(torch.cat([Rs, torch.diag(math.sqrt(damping) * scale)]))
            step = torch.linalg.solve_triangular(Rd, (Qd[:n].T @ rhs)[:, None], upper=True)[:, 0]
            step = step * min(1.0, 1.0 / float(step.abs().max().clamp_min(1e-300)))  # trust region 1
            x_new = (x + step).clamp(-X_MAX, X_MAX)
            new_cost, new_state = evaluate(x_new)
            if new_cost < cost:
                x, cost, state, damping = x_new, new_cost, new_state, max(damping / 4, 1e-15)
                break
            damping *= 4
        else:
            break  # no step lowers the cost: converged to rounding
        history.append(cost)
        if on_step is not None:
            on_step(it, cost)
        if len(history) > 10 and cost > 0.9 * history[-11]:
            break  # less than 10% in 10 steps: the rest is below any target
    return x


def _cost(Y: torch.Tensor, x: torch.Tensor) -> float:
    """The varpro cost of the poles x for the columns of Y (normalized), as `_refine_poles` measures it."""
    V, _ = _basis(x, Y.shape[0])
    return float(_ridge_qr(V, Y / Y.norm(), RIDGE)[3].square().sum())


def _rounded_system(Y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Poles x -> float32-representable poles a, G refit for them in float64, balanced B (n,), C (n, K)."""
    a = torch.tanh(x).to(torch.float32).clamp(-A_MAX, A_MAX).to(F64).sort().values
    G = _coefficients(a, Y)
    norms = G.norm(dim=1)
    B = torch.where(norms > 0, norms.sqrt(), 1.0)  # balanced: |B_j| = ||C_j||
    return a, B, G / B[:, None]


def _farthest(x: torch.Tensor, pool: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` entries of `pool` farthest (in x = atanh(a)) from every entry of x: the modes the
    smaller fit lacks."""
    if x.numel() == 0:
        return pool[:count]
    gaps = (pool[:, None] - x[None, :]).abs().min(dim=1).values
    return pool[gaps.argsort(descending=True)[:count]]


def fit_varpro(
    Y: torch.Tensor, n: int, smaller: int = 0, seeds: tuple[torch.Tensor, ...] = (), on_step=None
) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
    """Refined poles x (n,) and their float32-rounded system (a, B, C) for the columns of Y, one per start.

    Starts: the Hankel poles of size n; if `smaller`, the refined fit of `smaller` poles from its own
    Hankel start (continuation); then each seed. A start of fewer than n poles is completed with the
    Hankel poles (size n) farthest from its own. Varpro from the Hankel start can stop in a worse minimum
    than a smaller fit's; a start holding that fit's poles costs no more than that fit (the new poles'
    coefficients may be 0), and refinement only lowers the cost, so it ends no worse than that fit.
    """
    hankel = _hankel_poles(Y, (n, smaller) if 0 < smaller < n else (n,))
    seeds = tuple(_refine_poles(Y, x, on_step=on_step) for x in hankel[1:]) + seeds
    starts = [hankel[0]]
    starts += [torch.cat([s, _farthest(s, hankel[0], n - s.numel())]).sort().values for s in seeds]
    results = []
    for start in starts:
        x = _refine_poles(Y, start, on_step=on_step)
        results.append((x, _rounded_system(Y, x)))
    return results


