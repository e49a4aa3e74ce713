"""Distill the 2K spectral filters into one diagonal real LDS (A, B, C).

The target (L, 2K): columns 0..K-1 are the filters phi_k(t), columns K..2K-1 are (-1)^t phi_k(t),
t < L; the LDS impulse response is h_k(t) = sum_j C[j, k] B[j] A[j]^t. If phi_k(t) ~ sum_j G_jk a_j^t,
then (-1)^t phi_k(t) ~ sum_j G_jk (-a_j)^t: a fit of the K "+" filters with h/2 poles, mirrored
(A = [a, -a], C block diagonal, as in the released fits), fits all 2K with the same error.

Methods:

* ``"varpro"`` (ours) fits both layouts, the mirrored one (h/2 poles for the K "+" filters) and the
  joint one (h poles for all 2K filters), each from two starts (below), and keeps the system whose worse
  error, float64 or float32 (`measure.float32_check`; up to FLOAT32_TOLERANCE it counts as none), is
  the lowest: the fit is chosen for the precision it runs in. Measured at L=8192, K=24: the joint fit
  is more accurate in float64 at most h (3e-17 vs 3e-15 at h=64) but can round worse (float32 1.3e-9
  vs 1.5e-10 at h=64); at L=256, h=64 the float64-best candidate rounds to 7.0e-4 in float32, another
  to 1.1e-7. For "hankel_L" (whose "-" filters are +-"+" filters, so mirroring duplicates poles) the
  joint one wins by orders of magnitude.
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

import torch
from tqdm.auto import tqdm

from spectralds.distill.lds_file import LDSFit, measured_fit
from spectralds.distill.measure import (
    cancellation_factor,
    float32_check,
    float32_recurrence,
    relative_mse,
    target_filters,
)
from spectralds.distill.varpro import (
    F64,
    _cost,
    _powers,
    _single_thread,
    fit_varpro,
    hankel_singular_values,
)
from spectralds.errors import UserError, check_choice, check_int
from spectralds.filters import MAX_SEQ_LEN, check_size, spectral_filters
from spectralds.ops.lds_conv import impulse_response_ref

# Part of the fit cache's key (spectralds.distill.cache): bump when the solver's results change,
# so fits cached by an older one are not reused.
SOLVER_REVISION = 4

__all__ = [
    "FIT_METHODS", "LDSFit", "fit_filters", "relative_mse", "target_filters",
    "float32_recurrence", "float32_check", "cancellation_factor", "hankel_singular_values",
]

FIT_METHODS = ("varpro", "spectralds")


def _fit_spectralds(phi: torch.Tensor, n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    alpha = (1.0 - u**4).sort().values
    mu = (1.0 - alpha) * _powers(alpha, phi.shape[0])  # (L, n): the scalar systems' impulse responses
    Q, R = torch.linalg.qr(phi)
    M = torch.linalg.solve_triangular(R, Q.T @ mu, upper=True).T  # (n, K): Phi m_i ~ mu_i, Algorithm 1
    M_inv = torch.linalg.pinv(M)  # (K, n): Phi ~ M_inv mu, Algorithm 2
    return alpha, torch.ones(n, dtype=F64), (M_inv * (1.0 - alpha)).T


# ---- public entry points --------------------------------------------------------------------------
def check_fit_args(seq_len: int, num_filters: int, state_dim: int, method: str) -> None:
    """Validate a fit request before any work (a UserError naming the bad argument)."""
    check_int("seq_len", seq_len, minimum=16, maximum=MAX_SEQ_LEN)
    check_int("num_filters", num_filters, maximum=seq_len)
    check_choice("fit method", method, FIT_METHODS)
    check_int("state_dim", state_dim, maximum=seq_len // 4)  # a fit needs several samples per state
    # The largest arrays: the (L, h) powers and (L, 2K) targets, and varpro's (2K h, h) step system
    check_size(f"a fit of {state_dim} states to {2 * num_filters} filters of length {seq_len}",
               max(seq_len * (state_dim + 2 * num_filters), 2 * num_filters * state_dim**2))
    if method == "spectralds" and state_dim % 2:
        raise UserError(f"state_dim must be even for the mirrored 'spectralds' fit, got {state_dim}")


def _mirrored(a: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The system of the K "+" filters (n states) -> the system of all 2K filters (2n states)."""
    n, K = C.shape
    C2 = C.new_zeros(2 * n, 2 * K)
    C2[:n, :K], C2[n:, K:] = C, C
    return torch.cat([a, -a]), torch.cat([B, B]), C2


# Float32 errors of a fit up to this count as none when the candidates are compared: a hundredth of the
# default max_fit_error (`spectralds.distill.swap`), since a layer's float32 decoding measures up to ~10x
# `float32_check` (L=256, K=24, 48 states: check 5.5e-8, the quickstart's trained layers 1.2e-7 to 2.9e-7).
FLOAT32_TOLERANCE = 1e-8


def _worse(float64_error: float, float32_error: float) -> float:
    """The error a candidate fit is chosen by (`fit_filters`)."""
    return max(float64_error, float32_error if float32_error > FLOAT32_TOLERANCE else 0.0)


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
    check_fit_args(seq_len, num_filters, state_dim, method)
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
                fits = fit_varpro(phi, n, n - 1 if even else 0, on_step=stage("mirrored fit"))
                candidates += [_mirrored(*system) for _, system in fits] if even else []
                mirrored_poles = min(fits, key=lambda f: _cost(phi, f[0]))[0]
            bar.update()
            if method == "varpro":
                # The mirrored fit's poles (a, -a) are a joint start of its cost: the joint fit's
                # continuation, at a fraction of the cost of a second joint fit with fewer states.
                seeds = () if mirrored_poles is None else (torch.cat([mirrored_poles, -mirrored_poles]),)
                fits = fit_varpro(targets, state_dim, seeds=seeds, on_step=stage("joint fit"))
                candidates += [system for _, system in fits]
            bar.update()
            # The fit is chosen for the precision it runs in: by its worse error, float64 (its impulse
            # response) or float32 (the plain float32 recurrence, `float32_check`), a float32 error up to
            # FLOAT32_TOLERANCE counting as none. By float64 error alone the solver took fits whose terms
            # cancel and so decode badly in float32 (L=256, K=24, h=64: 7.7e-14 in float64, 7.0e-4 in
            # float32, where another candidate reaches 2.5e-13 and 1.1e-7).
            errors = [relative_mse(impulse_response_ref(*system, seq_len), targets) for system in candidates]
            stage("float32 check")
            checks = [float32_check(*system, targets) for system in candidates]
            chosen = min(range(len(candidates)), key=lambda i: _worse(errors[i], checks[i][0]))
            A, B, C = (t.contiguous() for t in candidates[chosen])
            f32, f32_per_filter = checks[chosen]
            bar.update()
    finally:
        bar.close()
    return measured_fit(A, B, C, targets, variant, method, float32=(f32, f32_per_filter))
