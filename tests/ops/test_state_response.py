"""`ops.lds_scan.state_response`: what a state adds to the next steps, against the recurrence run in a loop
(float64), and the scan from a state as the scan from zero plus it."""

import pytest
import torch

from spectralds.ops.lds_scan import scan, scan_ref, state_response

F64 = torch.float64


def system(h: int = 5, F: int = 4, ch: int = 3, per_channel: bool = False):
    g = torch.Generator().manual_seed(0)
    A = torch.rand(h, generator=g, dtype=F64) * 1.8 - 0.9
    B = torch.randn(h, generator=g, dtype=F64)
    C = torch.randn(*((ch,) if per_channel else ()), h, F, generator=g, dtype=F64)
    return A, B, C


@pytest.mark.parametrize("per_channel", [False, True])
def test_state_response_is_the_recurrence_from_the_state(per_channel):
    A, _, C = system(per_channel=per_channel)
    x0 = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1), dtype=F64)
    out, final = state_response(x0, A, C, 7, F64)
    x, expected = x0, []
    for _ in range(7):  # x = A x, no input
        x = A * x
        expected.append(x @ C if C.dim() == 2 else (x[..., None, :] @ C)[..., 0, :])
    torch.testing.assert_close(out, torch.stack(expected, 1), rtol=0, atol=1e-13)
    torch.testing.assert_close(final, x, rtol=0, atol=1e-13)


def test_the_scan_from_a_state_is_the_scan_of_prefix_and_chunk():
    A, B, C = system()
    u = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    whole, end = scan_ref(u, A, B, C)
    _, x0 = scan(u[:, :4], A, B, C, 3, F64)
    zero, zero_end = scan(u[:, 4:], A, B, C, 3, F64)
    added, carried = state_response(x0, A, C, 7, F64)
    torch.testing.assert_close(zero + added, whole[:, 4:], rtol=0, atol=1e-12)
    torch.testing.assert_close(zero_end + carried, end, rtol=0, atol=1e-12)
