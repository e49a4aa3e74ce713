"""An LDS fit served to a layer that carries its own filter bank (`store_filters`): the columns matched.

A fitted LDS reproduces a bank in one column order with one sign per column: ours, or a source's
(LAPACK and GPU eigensolvers pick eigenvector signs freely, and a source may order filters otherwise). An
STU that stores its bank may hold either. The match is measured, not assumed: each of the layer's filters
is paired with the fit's column of largest |cosine| over the layer's length, and C's columns are
reordered and signed so the LDS produces the layer's bank ("+" and "-" halves alike). A bank that is not
the fit's up to order and signs (a column without a clear partner) is refused in one line.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from spectralds.distill.lds_file import LDSFit, impulse_response
from spectralds.errors import UserError

MIN_COSINE = 0.9  # distinct filters are orthogonal (cosine ~0): a partner above this is unambiguous


def fit_for_bank(stu: nn.Module, fit: LDSFit) -> LDSFit:
    """`fit`, its C columns reordered and signed to serve `stu.phi`; the fit itself when the layer
    computes its bank (no `store_filters`) or when the match is the identity."""
    if not getattr(stu, "store_filters", False):
        return fit
    K = stu.num_filters
    response = impulse_response(fit.A, fit.B, fit.C[:, :K], stu.seq_len)  # the fit's "+" filters
    phi = stu.phi.detach().cpu().to(torch.float64)
    cosine = F.normalize(phi, dim=0).T @ F.normalize(response, dim=0)  # (layer filter, fit filter)
    best = cosine.abs().argmax(1)
    score = cosine.gather(1, best[:, None])[:, 0]
    worst = int(score.abs().argmin())
    if len(set(best.tolist())) < K or score.abs().min() < MIN_COSINE:
        raise UserError(
            f"the layer's stored filter bank is not the LDS fit's filters up to column order and signs "
            f"(its filter {worst} matches at best |cosine| {score.abs()[worst]:.3f}); fit an LDS to this bank"
        )
    if torch.equal(best, torch.arange(K)) and bool((score > 0).all()):
        return fit
    signs = torch.sign(score).repeat(2)
    columns = torch.cat([best, best + K])  # column j of the "-" half follows filter j of the "+" half
    per_filter = {  # per-column errors, where the fit has them, follow their columns
        name: [getattr(fit, name)[i] for i in columns.tolist()]
        for name in ("rel_mse_f64_per_filter", "rel_mse_f32_per_filter") if len(getattr(fit, name)) == 2 * K
    }
    return dataclasses.replace(fit, C=fit.C[:, columns] * signs, **per_filter)
