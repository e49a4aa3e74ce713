"""LDS conversion of an STU that carries its own filter bank: the fit's columns matched by measurement."""

import pytest
import torch

from spectralds.distill.bank_match import fit_for_bank
from spectralds.distill.convert import convert_stu_layers, lds_from_stu
from spectralds.distill.lds_file import LDSFit
from spectralds.errors import UserError
from spectralds.layers import build_layer
from spectralds.ops.lds_conv import impulse_response_ref as impulse_response

F64 = torch.float64
L, K = 48, 3


def exact_fit() -> tuple[LDSFit, torch.Tensor]:
    """An LDS whose impulse response is exactly [phi, (-1)^t phi] for the phi it returns: every state
    with pole a has a twin with pole -a, which serves the "-" filters."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([0.95, 0.8, 0.6, -0.5, 0.3, -0.9], dtype=F64)
    c = torch.randn(6, K, generator=g, dtype=F64)
    zero = torch.zeros_like(c)
    C = torch.cat([torch.cat([c, zero], 1), torch.cat([zero, c], 1)])  # (12, 2K)
    fit = LDSFit(A=torch.cat([a, -a]), B=torch.ones(12, dtype=F64), C=C, seq_len=L, num_filters=K,
                 variant="hankel", method="test", rel_mse_f64_per_filter=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    phi = impulse_response(a, torch.ones(6, dtype=F64), c, L)
    assert torch.allclose(impulse_response(fit.A, fit.B, fit.C, L)[:, K:],
                          phi * (1 - 2 * (torch.arange(L) % 2))[:, None].to(F64))
    return fit, phi


def stu(kind: str, bank: torch.Tensor, store: bool = True):
    torch.manual_seed(1)
    layer = build_layer(kind, dim=4, seq_len=L, num_filters=K, filters=bank, store_filters=store)
    return layer.double()


def output_error(layer, lds) -> float:
    x = torch.randn(2, L, 4, dtype=F64)
    with torch.no_grad():
        ref = layer(x)
        return ((lds(x) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_a_bank_in_another_order_and_signs_converts_exactly(kind):
    fit, phi = exact_fit()
    perm, signs = [2, 0, 1], torch.tensor([-1.0, 1.0, -1.0], dtype=F64)
    bank = phi[:, perm] * signs
    layer = stu(kind, bank)
    mapped = fit_for_bank(layer, fit)
    assert mapped.rel_mse_f64_per_filter == [2.0, 0.0, 1.0, 5.0, 3.0, 4.0]
    assert output_error(layer, lds_from_stu(layer, fit)) < 1e-6  # the bank is float32 in the layer
    # The same bank, not declared as carried: the fit is used as it is, and the conversion is wrong
    # (which the measured report shows).
    plain = stu(kind, bank, store=False)
    assert output_error(plain, lds_from_stu(plain, fit)) > 0.1
    report = convert_stu_layers(torch.nn.Sequential(layer), lambda _: fit)[0]
    assert report.filter_rel_mse < 1e-12 and report.rel_mse < 1e-12


def test_the_fit_is_kept_when_it_already_serves_the_bank():
    fit, phi = exact_fit()
    assert fit_for_bank(stu("stu", phi), fit) is fit
    assert fit_for_bank(stu("stu", phi[:, [1, 0, 2]], store=False), fit) is fit  # computed banks: as is


def test_a_bank_that_is_not_the_fits_is_refused_in_one_line():
    fit, phi = exact_fit()
    other = torch.randn(L, K, generator=torch.Generator().manual_seed(5), dtype=F64)
    for bank in (other, phi[:, [0, 0, 2]]):  # unrelated filters; one filter twice
        with pytest.raises(UserError, match="not the LDS fit's filters up to column order and signs") as e:
            lds_from_stu(stu("stu", bank), fit)
        assert "\n" not in str(e.value)
