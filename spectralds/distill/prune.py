"""State pruning of distilled LDS layers: LAST (Gwak et al., NeurIPS 2024) and a refit-aware variant.

Methods (`PRUNE_METHODS`):

* ``"last"``: the paper's score. Each LDS state j is a one-pole subsystem (b_j / (z - a_j)) W_j, where W_j
  (dim_out x dim) maps the state's copies in every input channel to the output: the fitted C row combined
  with the layer's own learned M. Its H-infinity norm is |b_j| ||W_j||_2 / (1 - |a_j|); LAST scores the
  square, normalizes it inside each layer (score / sum of the scores at least as large), then one global
  threshold keeps the top fraction. The same shared LDS therefore scores differently in every layer.
* ``"uniform"``: the same fraction in every layer, ranked by the raw H-infinity score.
* ``"global"``: one threshold on the raw H-infinity scores of all layers.
* ``"random"``: the paper's random baseline: the kept states drawn uniformly over all layers (`seed`).
* ``"last-refit"`` (ours): the score knows that C is re-solved after pruning. A fitted system's states
  cancel one another (the terms of a filter exceed it by ~1e6), so a state's own H-infinity norm says
  little about what the *re-solved* system loses without it. Per layer, the target is the layer's
  effective kernel: the full system's 2K responses weighted by what the layer's M does with them (and by
  how many positions see each lag). Backward elimination removes, one at a time, the state whose removal
  least raises the least-squares refit error; this gives each layer an error-vs-kept-states curve.
  LAST-style, each curve is normalized by the layer's energy (the error relative to the layer's
  kernel), and the budget is split across layers to minimize the sum of the normalized curves (the
  greedy marginal cost across layers, solved exactly by dynamic programming): a layer whose effective
  kernel is easy to fit gives up states first. Measured on the quickstart models, the normalized curves
  allocate better than the raw output errors (whose allocation took states from the first layer, the
  most sensitive one); a layer's true sensitivity depends on the residual stream it writes into, which
  only data shows: `layer_weights` takes it when measured.
* ``"uniform-refit"``: the ablation: "last-refit"'s ranking with the same count in every layer.

All methods keep at least one state per layer. Pruning with ``refit`` re-solves C of every pruned fitted
layer (`refit_readout`) whatever the method, so the baselines get the same re-solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from spectralds.errors import UserError, check_float, check_int
from spectralds.layers.lds import LDS

PRUNE_METHODS = ("last", "last-refit", "uniform", "global", "uniform-refit", "random")
DEFAULT_METHOD = "last-refit"  # of LayerAdaptiveStatePruning and `spectralds distill --prune`
# |a| = 1 would make the H-infinity score infinite; such a state is clamped to this margin and so always kept.
STABILITY_MARGIN = 1e-12
# Ridge of the readout re-solve, relative to the target's norm. Without it the re-solved C of nearly
# redundant poles cancels by ~1e6 and float32 scans lose 0.2% loss to rounding (measured at 25% pruned);
# 1e-7 costs nothing measurable in float64 and keeps the float32 rounding at the unpruned model's level.
RIDGE = 1e-7
F64 = torch.float64


# ---- the paper's H-infinity score ---------------------------------------------------------------------
def state_scores(lds: LDS, horizon: int | None = None) -> torch.Tensor:
    """(h,) squared H-infinity norm of each state's subsystem, in float64.

    `horizon` L (None: the paper's infinite one): the peak gain of the response truncated to L steps,
    sum_{t<L} |a|^t = (1 - |a|^L) / (1 - |a|) in place of 1 / (1 - |a|). A state much slower than the
    sequences a model sees gains at most L on them, however close |a| is to 1.
    """
    A, B, C = (p.detach().double() for p in lds.system())
    if lds.learnable:  # tanh in float64: a float32 a = tanh(A_raw) near 1 moves 1 - |a| by up to ~1e-3
        A = torch.tanh(lds.A_raw.detach().double())
    W = lds.state_maps(C)  # (h, d_out, d)
    decay = (1 - A.abs()).clamp_min(STABILITY_MARGIN)
    if horizon is None:
        peak = 1 / decay
    else:
        check_int("horizon", horizon)
        peak = torch.where(decay > STABILITY_MARGIN, (1 - A.abs() ** horizon) / decay, float(horizon))
    return (B.abs() * torch.linalg.matrix_norm(W, ord=2) * peak) ** 2


def last_normalize(scores: torch.Tensor) -> torch.Tensor:
    """score_i / sum_{j: score_j >= score_i} score_j; the top state of a layer scores 1."""
    order = torch.argsort(scores, descending=True)
    cumulative = torch.cumsum(scores[order], dim=0)
    normalized = torch.empty_like(scores)
    normalized[order] = scores[order] / cumulative.clamp_min(torch.finfo(scores.dtype).tiny)
    return normalized


# ---- the refit-aware score ----------------------------------------------------------------------------
def _length(layer: LDS) -> int:
    return layer.seq_len or 8192


def _basis(A: torch.Tensor, length: int) -> torch.Tensor:
    """(length, h) a_j^t, rows weighted by sqrt((length - t) / length).

    A kernel error at lag t reaches length - t of the positions of a window, so with a white input the
    mean squared output error is the kernel error weighted by (length - t) / length.
    """
    t = torch.arange(length, dtype=F64, device=A.device)[:, None]
    return A.double()[None] ** t * ((length - t) / length).sqrt()


def readout_weight(lds: LDS) -> torch.Tensor:
    """(2K, r) W such that ||E W||_F^2 is the layer's output error for an error E (length, 2K) of its
    2K filters, for a white input of unit variance in every channel."""
    return lds.filter_weight()


def _sqrt_gram(W: torch.Tensor) -> torch.Tensor:
    """S (n, n) with S S^T = W W^T: the (n, r) weight compressed to n columns."""
    values, vectors = torch.linalg.eigh(W @ W.T)
    return vectors * values.clamp_min(0).sqrt()


def elimination_curve(V: torch.Tensor, Y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward elimination of the columns of V for min_G ||V G - Y||^2 + ridge^2 ||G||^2 (least squares).

    Returns `order` (h,), the columns from the first removed to the last survivor, and `error` (h + 1,):
    error[n] is the least-squares cost when the last n columns of `order` are kept (error[0] = ||Y||^2).
    Removing column j of a kept set raises the cost by ||G_j||^2 / [(V^T V + ridge^2 I)^-1]_jj; both come
    from a QR of the (2h, n) ridge-augmented system, so duplicate poles (cancelling states) are harmless.
    """
    h = V.shape[1]
    Q, R = torch.linalg.qr(V)
    QtY = Q.T @ Y
    total = float(Y.square().sum())
    augmented = torch.cat([R, ridge * torch.eye(h, dtype=F64, device=V.device)])
    rhs = torch.cat([QtY, QtY.new_zeros(h, Y.shape[1])])
    alive = list(range(h))
    error = torch.empty(h + 1, dtype=F64)
    error[0] = total
    removed = []
    for n in range(h, 0, -1):
        Qs, Rs = torch.linalg.qr(augmented[:, alive])
        proj = Qs.T @ rhs
        error[n] = total - float(proj.square().sum())
        if n == 1:
            break
        R_inv = torch.linalg.solve_triangular(Rs, torch.eye(n, dtype=F64, device=V.device), upper=True)
        G = R_inv @ proj
        raise_by = G.square().sum(dim=1) / R_inv.square().sum(dim=1)
        removed.append(alive.pop(int(raise_by.argmin())))
    order = torch.tensor(removed + alive)
    # A removal can only raise the cost; rounding may say otherwise by ~eps: keep the curve monotone.
    return order, torch.cummin(error, dim=0).values


def _effective_kernel(layer: LDS, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's basis (length, h) and effective kernel (length, 2K): its 2K filters times the square
    root of the Gram of `weight` (default: the layer's own `readout_weight`)."""
    A, B, C = (p.detach().double() for p in layer.system())
    V = _basis(A, _length(layer))
    weight = readout_weight(layer) if weight is None else weight
    return V, (V * B) @ C @ _sqrt_gram(weight.to(V.device))


def refit_curve(layer: LDS) -> tuple[torch.Tensor, torch.Tensor]:
    """`elimination_curve` of the layer's states for its own effective kernel.

    The error is in the layer's output units: the mean squared output error for a white, unit-variance
    input in every channel."""
    V, Y = _effective_kernel(layer)
    return elimination_curve(V, Y, RIDGE * float(Y.norm()))


def kernel_error(before: LDS, after: LDS) -> float:
    """Relative error of the effective kernel of `after` (a pruned copy of `before`, same M) against
    `before`'s: sum of squares of the difference over that of `before`'s kernel."""
    weight = readout_weight(before)
    ref, new = _effective_kernel(before, weight)[1], _effective_kernel(after, weight)[1]
    return float((new - ref).square().sum() / ref.square().sum().clamp_min(torch.finfo(F64).tiny))


def allocate(costs: list[torch.Tensor], budget: int) -> list[int]:
    """Kept states per layer, n_l >= 1 with sum n_l = budget, minimizing sum_l costs[l][n_l] exactly.

    costs[l] is (h_l + 1,), indexed by the number of kept states. Dynamic programming over the layers.
    """
    sizes = [c.numel() - 1 for c in costs]
    if not len(costs) <= budget <= sum(sizes):
        raise UserError(f"cannot keep {budget} states in {len(costs)} layers of sizes {sizes}")
    best = torch.zeros(1, dtype=F64)  # best[b]: the least cost of the layers so far keeping b states
    choices = []
    for cost, h in zip(costs, sizes, strict=True):
        options = torch.full((best.numel() + h, h), float("inf"), dtype=F64)
        for n in range(1, h + 1):
            options[n : n + best.numel(), n - 1] = best + cost[n].double()
        best, pick = options.min(dim=1)
        choices.append(pick + 1)
    counts = []
    for pick in reversed(choices):
        counts.append(int(pick[budget]))
        budget -= counts[-1]
    return counts[::-1]


# ---- selection ----------------------------------------------------------------------------------------
def _keep_count(total: int, ratio: float, minimum: int) -> int:
    return max(minimum, round(total * (1 - ratio)))


def select_states(
    layers: list[LDS], ratio: float, method: str = "last", layer_weights: list[float] | None = None,
    seed: int = 0, horizon: int | None = None,
) -> list[torch.Tensor]:
    """Indices (sorted) of the states each layer keeps when pruning `ratio` of all states.

    `layer_weights` (one per layer, "last-refit" only) multiply the layers' normalized error curves: a
    sensitivity measured on data, e.g. the ratio of the layer's output energy to the energy of the
    residual stream it is added to. Without them every layer's relative error counts the same.
    `seed` draws the "random" method's states; `horizon` truncates the H-infinity score of "last",
    "uniform" and "global" to that many steps (`state_scores`); the other methods ignore them.
    """
    check_int("seed", seed, minimum=0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise UserError(f"pruning ratio must be in [0, 1), got {ratio!r}")
    if method not in PRUNE_METHODS:
        raise UserError(f"unknown pruning method {method!r}; expected one of {PRUNE_METHODS}")
    if not layers:
        raise UserError("no LDS layer to prune")
    if layer_weights is not None:
        if method != "last-refit":
            raise UserError(f"layer_weights apply to the 'last-refit' method only, not {method!r}")
        numbers = isinstance(layer_weights, (list, tuple)) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in layer_weights)
        if not numbers or len(layer_weights) != len(layers) or not all(
                w >= 0 and math.isfinite(w) for w in layer_weights):
            raise UserError(f"need {len(layers)} finite, non-negative layer weights, got {layer_weights}")
    if method in ("last-refit", "uniform-refit"):
        curves = [refit_curve(layer) for layer in layers]
        if method == "uniform-refit":
            counts = [_keep_count(layer.state_dim, ratio, 1) for layer in layers]
        else:  # LAST's layer-adaptive normalization: each layer's error relative to its kernel's energy
            weights = layer_weights or [1.0] * len(layers)
            tiny = torch.finfo(F64).tiny
            costs = [w * err / err[0].clamp_min(tiny) for (_, err), w in zip(curves, weights, strict=True)]
            budget = _keep_count(sum(layer.state_dim for layer in layers), ratio, len(layers))
            counts = allocate(costs, budget)
        return [order[len(order) - n :].sort().values for (order, _), n in zip(curves, counts, strict=True)]
    if method == "random":  # a uniform random rank for every state, then the global threshold below
        generator = torch.Generator().manual_seed(seed)
        scores = [torch.rand(layer.state_dim, dtype=F64, generator=generator) for layer in layers]
    else:
        scores = [state_scores(layer, horizon) for layer in layers]
    if method == "uniform":  # the same fraction in every layer, ranked by raw score
        keep_counts = [_keep_count(len(s), ratio, 1) for s in scores]
        ranked_idx = [torch.argsort(s, descending=True) for s in scores]
        return [idx[:n].sort().values for idx, n in zip(ranked_idx, keep_counts, strict=True)]
    ranked = [last_normalize(s) if method == "last" else s for s in scores]
    flat = torch.cat(ranked)
    n_keep = _keep_count(flat.numel(), ratio, len(layers))
    threshold = torch.sort(flat, descending=True).values[n_keep - 1]
    keep = []
    for r in ranked:
        kept = torch.nonzero(r >= threshold).flatten()
        keep.append(kept if kept.numel() else r.argmax()[None])  # every layer keeps at least one state
    return keep


# ---- pruning ------------------------------------------------------------------------------------------
@dataclass
class PruneReport:
    path: str
    states_before: int
    states_after: int


def find_lds_layers(module: nn.Module) -> list[tuple[str, LDS]]:
    return [(path, sub) for path, sub in module.named_modules() if isinstance(sub, LDS)]


def refit_readout(layer: LDS, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int) -> None:
    """Ridge least-squares C for the kept states so they reproduce the full system's 2K responses.

    A distilled system's states cancel one another (sum_j |B_j C_jk| far exceeds the filters), so
    deleting states without re-solving C breaks the filters; re-solving keeps the best fit the
    remaining poles allow. The rows are weighted like the refit-aware score's (`_basis`), and the small
    ridge (`RIDGE`) keeps the new C from cancelling beyond what float32 scans can add up. Only the
    layer's own copy of the system changes.
    """
    kept_A, kept_B, _ = (p.detach().double() for p in layer.system())
    target = (_basis(A, length) * B.double()) @ C.double()  # (length, 2K), the unpruned responses
    V = _basis(kept_A, length)
    h = V.shape[1]
    augmented = torch.cat([V, RIDGE * float(target.norm()) * torch.eye(h, dtype=F64, device=V.device)])
    rhs = torch.cat([target, target.new_zeros(h, target.shape[1])])
    G = torch.linalg.lstsq(augmented, rhs, driver="gelsd" if V.device.type == "cpu" else None).solution
    B_safe = torch.where(kept_B == 0, 1.0, kept_B)  # G = B C: a state with B = 0 gets B = 1
    layer.set_system(kept_A, B_safe, G / B_safe[:, None], learnable=False)


def prune_lds_layers(
    module: nn.Module,
    ratio: float,
    method: str = "last",
    refit: bool = True,
    layer_weights: list[float] | None = None,
    seed: int = 0,
    horizon: int | None = None,
) -> list[PruneReport]:
    """Prune the LDS layers of `module` in place (their A, B, C shrink); returns states kept per layer.

    With `refit`, each pruned fixed (fitted) layer re-solves its C for the states it keeps (the
    "-refit" methods rank states assuming it does). `layer_weights`, `seed`, `horizon`: see
    `select_states`.
    """
    layers = find_lds_layers(module)
    if not layers:
        raise UserError(
            f"no LDS layer found in {type(module).__name__}: distill the STU layers before pruning"
        )
    keep = select_states([layer for _, layer in layers], ratio, method, layer_weights, seed, horizon)
    reports = []
    for (path, layer), idx in zip(layers, keep, strict=True):
        before = layer.state_dim
        full = tuple(p.detach().clone() for p in layer.system())
        layer.keep_states(idx)
        if refit and not layer.learnable and layer.state_dim < before:
            refit_readout(layer, *full, length=_length(layer))
        reports.append(PruneReport(path, before, layer.state_dim))
    return reports


def check_ratio(name: str, ratio: object) -> float:
    """The fraction of states to prune, in (0, 1): 0 prunes nothing and 1 everything, neither a pruning."""
    ratio = check_float(name, ratio, minimum=0.0, strict=True)
    if not ratio < 1:
        raise UserError(f"{name} must be in (0, 1), got {ratio!r}")
    return ratio


def pruning_table(
    reports: list[PruneReport], method: str, ratio: float,
    before: dict[str, float] | None = None, after: dict[str, float] | None = None,
) -> str:
    """States kept per layer, then each metric before and after."""
    before, after = before or {}, after or {}
    kept, total = sum(r.states_after for r in reports), sum(r.states_before for r in reports)
    lines = [f"LAST pruning ({method}, ratio {ratio}): kept {kept}/{total} states"]
    lines += [f"  {r.path:<28}{r.states_before:>5} -> {r.states_after}" for r in reports]
    for key in sorted(set(before) & set(after)):
        lines.append(f"  {key:<26} before {before[key]:.4f}   after {after[key]:.4f}")
    return "\n".join(lines)
