"""Released LDS fits (Flash STU 2 ``phi_lds.pt``, SpectraLDS ``80_phi_lds.pt``) as an input.

Those files are torch pickles holding A (h,), B (1, h) or (h,) and C (h, 2K), as a dict of tensors or a
tuple of three. Their filter columns come in torch.linalg.eigh order (ascending eigenvalue) and with
whatever signs the eigensolver gave; ours are by descending eigenvalue, largest-magnitude entry
positive. `import_released` reads such a file, aligns its columns to our filters (order, then signs,
each checked by measuring), measures it against our filters the way our own fits are measured, and
returns an `LDSFit` that `save_fit` writes in our format. `measure` scores any (A, B, C).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from spectralds.distill.fit import relative_mse, target_filters
from spectralds.distill.lds_file import LDSFit, measured_fit
from spectralds.errors import UserError, check_int, first_line
from spectralds.filters import MAX_SEQ_LEN, check_size, spectral_filters
from spectralds.io import input_file
from spectralds.ops.lds_conv import impulse_response_ref

F64 = torch.float64
__all__ = ["align_columns", "import_released", "measure", "read_released"]


def _describe(obj: object) -> str:
    if isinstance(obj, Mapping):
        keys = ", ".join(repr(k) for k in list(obj)[:8]) + (", ..." if len(obj) > 8 else "")
        return f"a dict with keys {keys or '(none)'}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _abc_of(obj: object) -> tuple[object, object, object] | None:
    """(A, B, C) from a dict keyed A/B/C (any case, possibly prefixed 'lds.'), a nested state dict,
    or a tuple/list of three; None when the object has none of these layouts."""
    if isinstance(obj, (tuple, list)) and len(obj) == 3:
        return obj[0], obj[1], obj[2]
    if not isinstance(obj, Mapping):
        return None
    found: dict[str, object] = {}
    for key, value in obj.items():
        name = str(key).rsplit(".", 1)[-1].upper()
        if name in ("A", "B", "C"):
            if name in found:
                return None  # two candidates for one matrix: ambiguous, refuse rather than guess
            found[name] = value
    if len(found) == 3:
        return found["A"], found["B"], found["C"]
    for key in ("state_dict", "model", "lds"):  # one level of nesting, as checkpoints often have
        if key in obj:
            return _abc_of(obj[key])
    return None


def _flat(v: torch.Tensor) -> torch.Tensor:
    """(1, h) and (h, 1) hold the same numbers as (h,)."""
    return v.reshape(-1) if v.dim() == 2 and 1 in v.shape else v


def read_released(path: str | os.PathLike, num_filters: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    """A (h,), B (h,), C (h, 2K) in float64 from a released-layout torch file, validated.

    Raises UserError (one line, naming the file) for anything else: not a torch file, another layout,
    a sparse or meta tensor, wrong shapes, a filter count other than `num_filters`, more states than
    can be measured at `seq_len` (`check_size`), non-finite values, |A| > 1.
    """
    path = input_file(path, "fit file")
    try:  # weights_only: a released file is data, never code to run
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # garbage makes the unpickler fail with many types (IndexError, KeyError, ...)
        raise UserError(f"{path} is not a readable torch file ({first_line(err)})") from None
    abc = _abc_of(obj)
    if abc is None:
        raise UserError(f"{path}: expected A, B, C (a dict with keys A, B, C or a tuple of three), "
                        f"found {_describe(obj)}")
    for name, value in zip("ABC", abc, strict=True):
        if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
            raise UserError(f"{path}: {name} must be a real floating-point tensor, found {_describe(value)}"
                            + (f" of {value.dtype}" if isinstance(value, torch.Tensor) else ""))
        if value.is_complex():
            raise UserError(f"{path}: {name} is complex ({value.dtype}); a diagonal real LDS was expected")
        # Only plain dense CPU tensors hold their numbers: a sparse or meta tensor (no data) fails
        # later in a kernel with a traceback.
        if value.layout != torch.strided or value.device.type != "cpu":
            where = value.layout if value.layout != torch.strided else f"device {value.device.type}"
            raise UserError(f"{path}: {name} is a {where} tensor; a dense tensor of numbers was expected")
    # Shapes first, from the header alone: a small file can hold an expanded view (stride 0) that
    # claims 10^9 elements, which a dtype conversion would allocate.
    shapes = f"A {tuple(abc[0].shape)}, B {tuple(abc[1].shape)}, C {tuple(abc[2].shape)}"
    A, B, C = _flat(abc[0]), _flat(abc[1]), abc[2]
    if A.dim() != 1 or B.shape != A.shape or C.dim() != 2 or C.shape[0] != A.shape[0] or A.numel() == 0:
        raise UserError(f"{path}: shapes {shapes} are not A (h,), B (h,) or (1, h), C (h, 2K)")
    if C.shape[1] != 2 * num_filters:
        raise UserError(f"{path}: C has {C.shape[1]} columns, so K = {C.shape[1] / 2:g} filters, "
                        f"but --num-filters is {num_filters} (C needs {2 * num_filters})")
    check_size(f"{path}: measuring {A.numel():,} states", seq_len * (A.numel() + 2 * num_filters))
    A, B, C = (v.detach().to(F64) for v in (A, B, C))
    for name, value in (("A", A), ("B", B), ("C", C)):
        if not bool(value.isfinite().all()):
            raise UserError(f"{path}: {name} holds a non-finite value")
    if bool((A.abs() > 1).any()):
        raise UserError(f"{path}: max |A| = {float(A.abs().max())!r} > 1, the system is unstable")
    return A, B, C


def align_columns(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, str, int]:
    """C with its columns in our order and signs: (C, the order taken, the number of flipped columns).

    Two orders are tried, each K-block reversed (eigh's ascending order, the released files') and as
    given (our own order); each column is flipped where its impulse response correlates negatively with
    our filter, and the order with the smaller relative MSE wins: the choice is measured, not assumed.
    """
    K = C.shape[1] // 2
    response = impulse_response_ref(A, B, C, targets.shape[0])
    reverse = torch.cat([torch.arange(K - 1, -1, -1), torch.arange(2 * K - 1, K - 1, -1)])
    best = None
    for name, order in (("reversed", reverse), ("as given", torch.arange(2 * K))):
        dots = (response[:, order] * targets).sum(dim=0)
        signs = torch.where(dots < 0, -1.0, 1.0).to(F64)
        error = relative_mse(response[:, order] * signs, targets)
        if best is None or error < best[0]:
            best = (error, C[:, order] * signs, name, int((signs < 0).sum()))
    return best[1], best[2], best[3]


def measure(
    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, seq_len: int, num_filters: int,
    variant: str = "hankel", method: str = "released", filters: torch.Tensor | None = None,
) -> LDSFit:
    """An LDSFit of (A, B, C) with its errors measured against our filters, as `fit_filters` does."""
    phi = spectral_filters(seq_len, num_filters, variant) if filters is None else filters
    return measured_fit(A, B, C, target_filters(phi.detach().to("cpu", F64)), variant, method)


def import_released(
    path: str | os.PathLike, seq_len: int, num_filters: int, variant: str = "hankel",
    filters: torch.Tensor | None = None,
) -> tuple[LDSFit, str, int]:
    """Read a released fit, align it to our filters and measure it: (fit, order taken, columns flipped)."""
    check_int("seq_len", seq_len, minimum=2, maximum=MAX_SEQ_LEN)
    check_int("num_filters", num_filters, minimum=1, maximum=seq_len)
    A, B, C = read_released(path, num_filters, seq_len)
    phi = spectral_filters(seq_len, num_filters, variant) if filters is None else filters
    C, order, flipped = align_columns(A, B, C, target_filters(phi.detach().to("cpu", F64)))
    return measure(A, B, C, seq_len, num_filters, variant, "released", phi), order, flipped
