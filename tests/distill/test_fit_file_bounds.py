"""An LDS fit file whose metadata claims a size beyond the bound, or a negative error, is refused by
name before anything is computed from it; a directory given as a fit file says so."""

import math

import pytest
import torch

from spectralds.distill import load_fit, save_fit
from spectralds.distill.lds_file import LDSFit
from spectralds.errors import UserError
from spectralds.filters import MAX_SEQ_LEN

K, H = 2, 4


def fit(**changes) -> LDSFit:
    torch.manual_seed(0)
    base = dict(A=torch.rand(H, dtype=torch.float64) * 0.9, B=torch.randn(H, dtype=torch.float64),
                C=torch.randn(H, 2 * K, dtype=torch.float64), seq_len=64, num_filters=K, variant="hankel",
                method="varpro", rel_mse_f64=1e-9, rel_mse_f32=1e-8)
    return LDSFit(**{**base, **changes})


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"seq_len": MAX_SEQ_LEN + 1}, f"metadata seq_len={MAX_SEQ_LEN + 1} (must be between 1 and"),
        ({"seq_len": 10**15}, "metadata seq_len=1000000000000000"),
        ({"rel_mse_f64": -1e-3}, "metadata rel_mse_f64 holds -0.001 (must be >= 0)"),
        ({"cancellation": -math.inf}, "metadata cancellation holds -inf"),
        ({"rel_mse_f64_per_filter": [1e-9] * 3}, "rel_mse_f64_per_filter has 3 entries, expected"),
    ],
    ids=["seq-len-over-bound", "seq-len-huge", "negative-error", "minus-inf", "per-filter-length"],
)
def test_claims_beyond_bounds_are_refused(changes, expected, tmp_path):
    path = tmp_path / "fit.safetensors"
    save_fit(fit(**changes), path)  # a correct content hash: only the claim itself is wrong
    with pytest.raises(UserError, match=f"{path}.*" + expected.replace("(", r"\(").replace(")", r"\)")):
        load_fit(path, expect_filters=True)


def test_not_measured_errors_load(tmp_path):
    """NaN is how a fit that was never measured records its errors: it loads."""
    save_fit(fit(rel_mse_f64=math.nan, rel_mse_f32=math.nan), tmp_path / "fit.safetensors")
    assert math.isnan(load_fit(tmp_path / "fit.safetensors").rel_mse_f64)


def test_a_directory_is_not_a_missing_file(tmp_path):
    with pytest.raises(UserError, match=f"LDS fit file {tmp_path} is a directory"):
        load_fit(tmp_path)


def test_a_device_is_not_a_missing_file():
    with pytest.raises(UserError, match="LDS fit file /dev/zero is not a regular file"):
        load_fit("/dev/zero")


def test_more_states_than_can_be_measured_at_its_length(tmp_path):
    """A real (not claimed) size: 4096 states at seq_len 2^20 would need a 32 GiB impulse response."""
    many = 4096
    path = tmp_path / "fit.safetensors"
    save_fit(fit(A=torch.full((many,), 0.5, dtype=torch.float64), B=torch.ones(many, dtype=torch.float64),
                 C=torch.zeros(many, 2 * K, dtype=torch.float64), seq_len=MAX_SEQ_LEN), path)
    with pytest.raises(UserError, match=f"{path}: measuring 4,096 states at seq_len {MAX_SEQ_LEN} needs"):
        load_fit(path, expect_filters=True)
