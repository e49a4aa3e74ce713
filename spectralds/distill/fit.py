"""Distill the 2K spectral filters into one diagonal real LDS (A, B, C).

The target (L, 2K): columns 0..K-1 are the filters phi_k(t), columns K..2K-1 are (-1)^t phi_k(t),
t < L; the LDS impulse response is h_k(t) = sum_j C[j, k] B[j] A[j]^t. If phi_k(t) ~ sum_j G_jk a_j^t,
then (-1)^t phi_k(t) ~ sum_j G_jk (-a_j)^t: a fit of the K "+" filters with h/2 poles, mirrored
(A = [a, -a], C block diagonal, as in the released fits), fits all 2K with the same error.

Methods:

* ``"varpro"`` (ours) fits both layouts, the mirrored one (h/2 poles for the K "+" filters) and the
  joint one (h poles for all 2K filters), each from two starts (below), and keeps the system with the
  lowest float64 error, the error the fit reports: one criterion, so more states never give a larger
  error than the continued smaller fit. Measured at L=8192, K=24: the joint fit is more accurate in
  float64 at most h (3e-17 vs 3e-15 at h=64) but rounds worse (float32 1.3e-9 vs 1.5e-10 at h=64);
  the float32 error is measured and reported, not optimized. For "hankel_L" (whose "-" filters are
  +-"+" filters, so mirroring duplicates poles) the joint one wins by orders of magnitude.
  Starts: the Hankel poles, and a continuation: for the mirrored fit, the refined fit of one pole fewer
  plus one Hankel pole; for the joint fit, the mirrored fit's poles (a, -a), which start at its cost.
  Each fit: initial poles from a Hankel realization (Kung/ERA), the shift-invariant right singular
  vectors of the filters' block Hankel matrix, sampled on a geometric grid of lags with quadrature
  weights so that its singular values match the full Hankel's (complex pairs r +- ic become the real
  pair r +- c); then variable projection (Golub-Pereyra) with Levenberg-Marquardt over x = atanh(a)
  (1 - a ~ 2 e^{-2x}: the log(1 - a) scale near 1, and the same near -1), the coefficients G = B * C by
  QR least squares with a tiny ridge (1e-12 of the target norm) that keeps them bounded where the
  filters carry float64 noise. Last, the poles are rounded to float32 (a float32 recurrence then runs
  exactly the fitted poles), capped at the largest float32 below 1, G is refitted in float64 for them,
  and B_j = sqrt(||G_j||) balances B against C. Measured: varpro from a geometric grid of poles instead
  of the Hankel poles stalls at 5e-13 with coalescing poles.
* ``"spectralds"``: the paper's Algorithms 1-2 (arXiv 2505.17868), mirrored: sample h/2 scalar systems
  mu(alpha) = (1 - alpha) alpha^t with alpha = 1 - U^4 (the paper's near-unit distribution, U uniform,
  fixed seed), take each one's spectral representation m (Algorithm 1; its least-squares optimum,
  computed exactly rather than by gradient descent), and invert: Phi ~ pinv(M) mu. B = 1,
  C = pinv(M)^T scaled by (1 - alpha), float64 poles, as published.

Everything runs in float64 on the CPU with one thread: the factorizations are small, and a fixed
thread count makes the result identical, byte for byte, on every run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from spectralds.distill.lds_file import LDSFit, impulse_response, measured_fit
from spectralds.distill.measure import (
    cancellation_factor,
    float32_check,
    float32_recurrence,
    relative_mse,
    target_filters,
)
from spectralds.errors import UserError, check_choice, check_int
from spectralds.filters import spectral_filters

# Part of the fit cache's key (spectralds.distill.cache): bump when the solver's results change,
# so fits cached by an older one are not reused.
SOLVER_REVISION = 3

__all__ = [
    "METHODS", "LDSFit", "fit_filters", "impulse_response", "relative_mse", "target_filters",
    "float32_recurrence", "float32_check", "cancellation_factor", "hankel_singular_values",
]

METHODS = ("varpro", "spectralds")
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


TIE = 1.02  # float64 errors this close are one minimum reached from two starts (fit_filters)


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


def _fit_varpro(
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


def _fit_spectralds(phi: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    alpha = (1.0 - u**4).sort().values
    mu = (1.0 - alpha) * _powers(alpha, phi.shape[0])  # (L, n): the scalar systems' impulse responses
    Q, R = torch.linalg.qr(phi)
    M = torch.linalg.solve_triangular(R, Q.T @ mu, upper=True).T  # (n, K): Phi m_i ~ mu_i, Algorithm 1
    M_inv = torch.linalg.pinv(M)  # (K, n): Phi ~ M_inv mu, Algorithm 2
    return alpha, torch.ones(n, dtype=F64), (M_inv * (1.0 - alpha)).T


# ---- public entry points --------------------------------------------------------------------------
def _check_args(seq_len: int, num_filters: int, state_dim: int, method: str) -> None:
    check_int("seq_len", seq_len, minimum=16)
    check_int("num_filters", num_filters, maximum=seq_len)
    check_choice("fit method", method, METHODS)
    check_int("state_dim", state_dim, maximum=seq_len // 4)  # a fit needs several samples per state
    if method == "spectralds" and state_dim % 2:
        raise UserError(f"state_dim must be even for the mirrored 'spectralds' fit, got {state_dim}")


def _mirrored(a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The system of the K "+" filters (n states) -> the system of all 2K filters (2n states)."""
    n, K = C.shape
    C2 = C.new_zeros(2 * n, 2 * K)
    C2[:n, :K], C2[n:, K:] = C, C
    return torch.cat([a, -a]), torch.cat([B, B]), C2


def fit_filters(
    seq_len: int,
    num_filters: int,
    state_dim: int,
    variant: str = "hankel",
    method: str = "varpro",
    progress: bool = True,
    filters: torch.Tensor | None = None,
) -> LDSFit:
    """Fit a diagonal real LDS with `state_dim` states to the 2 * num_filters spectral filters.

    `filters` (seq_len, num_filters) replaces `spectral_filters(seq_len, num_filters, variant)` as the
    target (the "+" filters; the "-" ones follow). The result carries its float64 and float32 errors.
    The fit runs on one torch thread (set for its duration and restored) so that its result does not
    depend on the caller's thread count.
    """
    _check_args(seq_len, num_filters, state_dim, method)
    bar = tqdm(total=4, desc=f"LDS fit ({method}, h={state_dim})", disable=not progress, leave=False)

    def stage(name: str):
        bar.set_postfix_str(name)
        return lambda it, cost: bar.set_postfix_str(f"{name}: step {it}, {cost:.1e}")

    try:
        if filters is None:
            stage("spectral filters")
            filters = spectral_filters(seq_len, num_filters, variant)
        elif tuple(filters.shape) != (seq_len, num_filters):
            raise UserError(f"filters must be ({seq_len}, {num_filters}), got {tuple(filters.shape)}")
        phi = filters.detach().to("cpu", F64).contiguous()  # one memory layout: one result
        targets = target_filters(phi)
        bar.update()
        with _single_thread():
            candidates: list[tuple[torch.Tensor, ...]] = []  # systems (A, B, C) of state_dim states
            if method == "spectralds":
                candidates.append(_mirrored(*_fit_spectralds(phi, state_dim // 2)))
            mirrored_poles = None
            if method == "varpro" and state_dim >= 2:
                # Continuation: also start from the fit with one pole (two states) fewer. For an odd
                # state_dim the mirrored fit of state_dim - 1 states only seeds the joint one.
                n, even = state_dim // 2, state_dim % 2 == 0
                fits = _fit_varpro(phi, n, n - 1 if even else 0, on_step=stage("mirrored fit"))
                candidates += [_mirrored(*system) for _, system in fits] if even else []
                mirrored_poles = min(fits, key=lambda f: _cost(phi, f[0]))[0]
            bar.update()
            if method == "varpro":
                # The mirrored fit's poles (a, -a) are a joint start of its cost: the joint fit's
                # continuation, at a fraction of the cost of a second joint fit with fewer states.
                seeds = () if mirrored_poles is None else (torch.cat([mirrored_poles, -mirrored_poles]),)
                fits = _fit_varpro(targets, state_dim, seeds=seeds, on_step=stage("joint fit"))
                candidates += [system for _, system in fits]
            bar.update()
            # One error decides, the float64 one the fit reports: within a layout (the Hankel start or the
            # continuation) and between the layouts. A float32 rule between the layouts (mirrored unless
            # the joint one halved the float32 error) made the float64 error rise with h where the two
            # alternate (L=1024, K=16: 1.1e-9 at h=34, 5.8e-9 at h=36). Starts that reach the same
            # minimum (float64 errors within TIE) can round very differently: the float32 error breaks
            # such ties.
            errors = [relative_mse(impulse_response(*system, seq_len), targets) for system in candidates]
            stage("float32 check")
            tied = [i for i, error in enumerate(errors) if error <= TIE * min(errors)]
            checks = {i: float32_check(*candidates[i], targets) for i in tied}
            chosen = min(tied, key=lambda i: checks[i][0])
            A, B, C = (t.contiguous() for t in candidates[chosen])
            f32, f32_per_filter = checks[chosen]
            bar.update()
    finally:
        bar.close()
    return measured_fit(A, B, C, targets, variant, method, float32=(f32, f32_per_filter))
