"""LAST: layer-adaptive state pruning (Gwak et al., NeurIPS 2024) for distilled LDS layers.

Each LDS state j is a one-pole subsystem (b_j / (z - a_j)) W_j, where W_j (dim_out x dim) maps the
state's copies in every input channel to the output: the fitted C row combined with the layer's own
learned M. Its H-infinity norm is |b_j| ||W_j||_2 / (1 - |a_j|); LAST scores the square. The same
shared LDS therefore scores differently in every layer. Scores are normalized inside each layer
(score / sum of the scores at least as large), then one global threshold keeps the top fraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from spectralds.layers.lds import LDS

METHODS = ("last", "uniform", "global")
# |a| = 1 would make the score infinite; such a state is clamped to this margin and so always kept.
STABILITY_MARGIN = 1e-12


def state_scores(lds: LDS) -> torch.Tensor:
    """(h,) squared H-infinity norm of each state's subsystem, in float64."""
    A, B, C = (p.detach().double() for p in lds.system())
    K = lds.num_filters
    if lds.mode == "exact":
        M = torch.cat([lds.M_phi_plus, lds.M_phi_minus]).detach().double()  # (2K, d, d_out)
        W = torch.einsum("jk,kdo->jod", C, M)  # (h, d_out, d)
    else:
        v = C[:, :K] @ lds.M_filters_plus.detach().double() + C[:, K:] @ lds.M_filters_minus.detach().double()
        W = v[:, :, None] * lds.M_inputs.detach().double().T[None]  # diag(v_j) M_inputs^T: (h, d_out, d)
    gain = torch.linalg.matrix_norm(W, ord=2)
    return (B.abs() * gain / (1 - A.abs()).clamp_min(STABILITY_MARGIN)) ** 2


def last_normalize(scores: torch.Tensor) -> torch.Tensor:
    """score_i / sum_{j: score_j >= score_i} score_j; the top state of a layer scores 1."""
    order = torch.argsort(scores, descending=True)
    cumulative = torch.cumsum(scores[order], dim=0)
    normalized = torch.empty_like(scores)
    normalized[order] = scores[order] / cumulative.clamp_min(torch.finfo(scores.dtype).tiny)
    return normalized


def select_states(layers: list[LDS], ratio: float, method: str = "last") -> list[torch.Tensor]:
    """Indices of the states each layer keeps when pruning `ratio` of all states."""
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; expected one of {METHODS}")
    scores = [state_scores(layer) for layer in layers]
    if method == "uniform":  # the same fraction in every layer, ranked by raw score
        keep_counts = [max(1, round(len(s) * (1 - ratio))) for s in scores]
        ranked_idx = [torch.argsort(s, descending=True) for s in scores]
        return [idx[:n].sort().values for idx, n in zip(ranked_idx, keep_counts, strict=True)]
    ranked = [last_normalize(s) if method == "last" else s for s in scores]
    flat = torch.cat(ranked)
    n_keep = max(len(layers), round(flat.numel() * (1 - ratio)))
    threshold = torch.sort(flat, descending=True).values[n_keep - 1]
    keep = []
    for r in ranked:
        kept = torch.nonzero(r >= threshold).flatten()
        keep.append(kept if kept.numel() else r.argmax()[None])  # every layer keeps at least one state
    return keep


@dataclass
class PruneReport:
    path: str
    states_before: int
    states_after: int


def find_lds_layers(module: nn.Module) -> list[tuple[str, LDS]]:
    return [(path, sub) for path, sub in module.named_modules() if isinstance(sub, LDS)]


def refit_readout(layer: LDS, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, length: int) -> None:
    """Least-squares C for the kept states so they reproduce the full system's 2K responses.

    A distilled system's states cancel one another (sum_j |B_j C_jk| far exceeds the filters), so
    deleting states without re-solving C breaks the filters; re-solving keeps the best fit the
    remaining poles allow. Only the layer's own copy of the system changes.
    """
    kept_A, kept_B, _ = (p.detach().double() for p in layer.system())
    t = torch.arange(length, dtype=torch.float64, device=kept_A.device)[:, None]
    target = (A.double() ** t * B.double()) @ C.double()  # (length, 2K), the unpruned responses
    basis = kept_A**t * kept_B
    new_C = torch.linalg.lstsq(basis, target, driver="gelsd").solution
    layer.set_system(kept_A, kept_B, new_C, learnable=False)


def prune_lds_layers(
    module: nn.Module, ratio: float, method: str = "last", refit: bool = True
) -> list[PruneReport]:
    """Prune the LDS layers of `module` in place (their A, B, C shrink); returns states kept per layer.

    With `refit`, each pruned fixed (fitted) layer re-solves its C for the states it keeps.
    """
    layers = find_lds_layers(module)
    if not layers:
        raise ValueError(
            f"no LDS layer found in {type(module).__name__}: distill the STU layers before pruning"
        )
    keep = select_states([layer for _, layer in layers], ratio, method)
    reports = []
    for (path, layer), idx in zip(layers, keep, strict=True):
        before = layer.state_dim
        full = tuple(p.detach().clone() for p in layer.system())
        layer.keep_states(idx)
        if refit and not layer.learnable and layer.state_dim < before:
            refit_readout(layer, *full, length=layer.seq_len or 8192)
        reports.append(PruneReport(path, before, layer.state_dim))
    return reports
