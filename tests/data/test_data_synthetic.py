"""The synthetic LDS regression task: the system, the FFT outputs against a plain recurrence, the batches."""

from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralds.data import DiagonalLDS, SyntheticLDSDataModule
from spectralds.models.regression import SequenceRegression


def recurrence(system: DiagonalLDS, u: np.ndarray) -> np.ndarray:
    """x_t = a * x_{t-1} + B^T u_t, y_t = C^T x_t, step by step in float64."""
    x = np.zeros(system.a.shape)
    ys = []
    for u_t in u:
        x = system.a * x + u_t @ system.b
        ys.append(x @ system.c)
    return np.stack(ys)


@settings(max_examples=15, deadline=None)
@given(
    state_dim=st.integers(1, 12),
    d_in=st.integers(1, 4),
    d_out=st.integers(1, 4),
    length=st.integers(1, 70),
    delta=st.sampled_from([1e-3, 0.1, 0.5]),
    seed=st.integers(0, 100),
)
def test_fft_outputs_match_recurrence(state_dim, d_in, d_out, length, delta, seed):
    rng = np.random.default_rng(seed)
    system = DiagonalLDS.random(state_dim, d_in, d_out, delta, rng)
    u = rng.standard_normal((2, length, d_in))
    expected = np.stack([recurrence(system, seq) for seq in u])
    np.testing.assert_allclose(system.outputs(u), expected, rtol=1e-9, atol=1e-12)


def test_impulse_response_is_the_direct_convolution_kernel():
    rng = np.random.default_rng(0)
    system = DiagonalLDS.random(6, 3, 2, 0.01, rng)
    u = rng.standard_normal((40, 3))
    kernel = system.impulse_response(40)  # (T, d_out, d_in)
    direct = np.stack([sum(kernel[s] @ u[t - s] for s in range(t + 1)) for t in range(40)])
    np.testing.assert_allclose(direct, recurrence(system, u), rtol=1e-10, atol=1e-13)


def test_system_scale_and_determinism():
    dm = SyntheticLDSDataModule(state_dim=50, d_in=5, d_out=3, delta=0.01, seed=4)
    a, b, c = dm.system.a, dm.system.b, dm.system.c
    assert np.abs(a).max() == pytest.approx(0.99, abs=1e-15)
    assert b.shape == (5, 50) and c.shape == (50, 3) and (dm.d_in, dm.d_out) == (5, 3)
    same = SyntheticLDSDataModule(state_dim=50, d_in=5, d_out=3, delta=0.01, seed=4)
    other = SyntheticLDSDataModule(state_dim=50, d_in=5, d_out=3, delta=0.01, seed=5)
    assert np.array_equal(same.system.a, a) and np.array_equal(same.system.c, c)
    assert not np.array_equal(other.system.a, a)


def test_batches_shapes_values_and_determinism():
    kw = dict(state_dim=20, d_in=4, d_out=3, seq_len=64, batch_size=8)
    kw.update(num_train=32, num_val=10, val_seq_len=128)
    dm = SyntheticLDSDataModule(**kw)
    dm.setup("fit")
    u, y = next(iter(dm.train_dataloader()))
    assert u.shape == (8, 64, 4) and y.shape == (8, 64, 3) and u.dtype == y.dtype == torch.float32
    expected = dm.system.outputs(u.double().numpy())  # float32 inputs are exact in float64
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sum(len(b[0]) for b in dm.train_dataloader()) == 32

    val_u, val_y = next(iter(dm.val_dataloader()))
    assert val_u.shape == (8, 128, 4) and val_y.shape == (8, 128, 3)  # length generalization
    assert len(dm.val_dataset) == 10

    again = SyntheticLDSDataModule(**kw)
    again.setup("fit")
    for i in (0, 31):
        (u1, y1), (u2, y2) = dm.train_dataset[i], again.train_dataset[i]
        assert torch.equal(u1, u2) and torch.equal(y1, y2)
    assert not torch.equal(dm.train_dataset[0][0], dm.train_dataset[1][0])
    assert torch.equal(dm.val_dataset.tensors[1], again.val_dataset.tensors[1])
    assert not torch.equal(dm.val_dataset.tensors[0][0, :64], dm.train_dataset[0][0])  # separate draws


def test_long_memory_default_sizes_match_recurrence():
    dm = SyntheticLDSDataModule(seq_len=300, num_train=1, num_val=1)  # delta = 1e-3: slow decay
    dm.setup()
    u, y = dm.train_dataset[0]
    np.testing.assert_allclose(y.numpy(), recurrence(dm.system, u.double().numpy()), rtol=1e-5, atol=1e-6)


def test_observation_noise():
    kw = dict(state_dim=10, d_in=3, d_out=2, seq_len=512, num_train=4, num_val=2)
    clean, noisy = SyntheticLDSDataModule(**kw), SyntheticLDSDataModule(**kw, noise=0.1)
    clean.setup()
    noisy.setup()
    u, y = noisy.train_dataset[0]
    assert torch.equal(u, clean.train_dataset[0][0])
    residual = y.double().numpy() - noisy.system.outputs(u.double().numpy())
    assert residual.std() == pytest.approx(0.1, rel=0.1)
    assert torch.equal(noisy.train_dataset[0][1], y)  # the noise is part of the seeded draw


def test_synthetic_errors():
    with pytest.raises(ValueError, match="delta"):
        SyntheticLDSDataModule(delta=1.0)
    with pytest.raises(ValueError, match="noise"):
        SyntheticLDSDataModule(noise=-0.1)
    with pytest.raises(ValueError, match="state_dim"):
        SyntheticLDSDataModule(state_dim=0)
    with pytest.raises(RuntimeError, match="setup"):
        SyntheticLDSDataModule().train_dataloader()
    with pytest.raises(IndexError):
        dm = SyntheticLDSDataModule(num_train=2, num_val=1)
        dm.setup()
        dm.train_dataset[2]


# ---- the synthetic configs: a linear model, validation every 100 steps across epochs ------------------


@pytest.mark.parametrize("prenorm", [True, False])
def test_regression_model_without_prenorm_is_linear(prenorm):
    torch.manual_seed(0)
    model = SequenceRegression(d_in=3, d_out=2, dim=8, seq_len=16, num_filters=4, prenorm=prenorm).double()
    u1, u2 = torch.randn(2, 2, 16, 3, dtype=torch.float64)
    gap = (model(2 * u1 - 3 * u2) - (2 * model(u1) - 3 * model(u2))).abs().max().item()
    # RMSNorm divides each token by its own norm: the pre-norm model is far from linear
    assert gap < 1e-12 if not prenorm else gap > 1e-3
    assert ("blocks.0.norm1.weight" in model.state_dict()) == prenorm  # prenorm=True keys unchanged


def test_zero_init_out_starts_as_the_zero_predictor():
    model = SequenceRegression(d_in=3, d_out=2, dim=8, seq_len=16, num_filters=4, zero_init_out=True)
    assert torch.equal(model(torch.randn(2, 16, 3)), torch.zeros(2, 16, 2))


def test_synthetic_config_validates_and_checkpoints_every_interval_across_epochs(cli_env, tmp_path):
    # 3 batches per epoch and val_check_interval 2: validation must come at steps 2, 4 and 6, and
    # last.ckpt must be step 6 (a per-epoch interval validated at steps 2 and 5 only).
    config = Path(__file__).resolve().parents[2] / "configs" / "synthetic.yaml"
    sizes = ["--data.init_args.num_train=6", "--data.init_args.batch_size=2", "--data.init_args.seq_len=16",
             "--data.init_args.num_val=2", "--data.init_args.state_dim=4", "--model.init_args.seq_len=16",
             "--model.init_args.num_filters=4", "--model.init_args.dim=8"]
    args = ["fit", "--config", str(config), *sizes, "--trainer.max_steps=6", "--trainer.val_check_interval=2",
            "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false"]
    assert run_cli(args) == 0
    ckpts = {p.name: torch.load(p, weights_only=False)["global_step"] for p in tmp_path.rglob("*.ckpt")}
    assert ckpts["last.ckpt"] == 6, ckpts


def test_synthetic_lds_tool_quick_run(tmp_path, capsys):
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import synthetic_lds

    out = tmp_path / "fig1.json"
    # "stu->lds" (quoted): the older spelling of stu_to_lds, still accepted
    synthetic_lds.main(["--quick", "--json", str(out), "--models", "stu", "stu->lds", "stu_ar", "stu_bare"])
    models = json.loads(out.read_text())["models"]
    assert set(models) == {"stu", "stu_to_lds", "stu_ar", "stu_bare"}
    assert [s for s, _ in models["stu_to_lds"]["curve"]] == [2, 4]
    # the distilled copy computes the STU's function (64 fitted states at L = 256)
    assert abs(models["stu_to_lds"]["final"] / models["stu"]["final"] - 1) < 1e-3
    assert "stu_bare" in capsys.readouterr().out
