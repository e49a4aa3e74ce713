"""Smoke test of tools/length_generalization.py and checks of the pieces its numbers rest on."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from spectralds.data import SyntheticLDSDataModule
from spectralds.filters import spectral_filters
from spectralds.models import SequenceRegression

REPO = Path(__file__).resolve().parents[2]
VARIANTS = sorted((REPO / "configs" / "lengthgen").glob("*.yaml"))


@pytest.fixture(scope="module")
def tool():
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("length_generalization")


@pytest.fixture(scope="module")
def quick_run(tool, tmp_path_factory):
    """One --quick run of every model (the expensive part, shared by the tests below)."""
    out = tmp_path_factory.mktemp("lengthgen")
    threads, cache = torch.get_num_threads(), os.environ.get("SPECTRALDS_CACHE_DIR")
    os.environ["SPECTRALDS_CACHE_DIR"] = str(out / "cache")
    try:
        payload = tool.main(["--quick", "--json", str(out / "lg.json"), "--plot", str(out / "lg.png")])
    finally:
        torch.set_num_threads(threads)
        if cache is None:
            os.environ.pop("SPECTRALDS_CACHE_DIR")
        else:
            os.environ["SPECTRALDS_CACHE_DIR"] = cache
    return payload, out


def test_quick_run_reports_every_model_and_length(tool, quick_run, capsys):
    payload, out = quick_run
    args = tool.parse_args(["--quick"])
    lengths = [args.train_len * m for m in args.eval_mults]  # [16, 64]
    assert json.loads((out / "lg.json").read_text())["args"]["train_len"] == args.train_len
    assert (out / "lg.png").stat().st_size > 10_000
    rows = payload["table"]
    assert [(r["model"], r["eval_len"]) for r in rows] == [
        (name, n) for n in lengths for name in ["zero predictor", tool.ORACLE, *tool.MODELS]
    ]
    for row in rows:
        assert (row["beyond"] is None) == (row["eval_len"] == args.train_len)
        assert all(math.isfinite(row[k]) for k in ("within", "overall"))
    for runs in payload["runs"].values():
        assert len(runs[0]["curve"]) == lengths[-1]
        # Causal models: a position's error cannot depend on how much later input is evaluated.
        assert runs[0]["causality_gap"] < 1e-5


def test_zero_predictor_matches_the_data(tool, quick_run):
    """The zero-predictor rows are mean y^2 of the validation set the quick run used (seed 0)."""
    payload, _ = quick_run
    init = yaml.safe_load((REPO / "configs" / "lengthgen.yaml").read_text())["data"]["init_args"]
    init.update(seq_len=16, val_seq_len=64, num_val=4, batch_size=4, num_train=16, seed=0)
    data = SyntheticLDSDataModule(**init)
    data.setup()
    y = data.val_dataset.tensors[1].double()
    zero = {r["eval_len"]: r for r in payload["table"] if r["model"] == "zero predictor"}
    assert zero[64]["overall"] == pytest.approx(y.pow(2).mean().item(), rel=1e-9)
    assert zero[64]["within"] == pytest.approx(y[:, :16].pow(2).mean().item(), rel=1e-9)
    assert zero[64]["beyond"] == pytest.approx(y[:, 16:].pow(2).mean().item(), rel=1e-9)
    oracle = {r["eval_len"]: r for r in payload["table"] if r["model"] == tool.ORACLE}
    assert oracle[64]["within"] < 1e-12 * zero[64]["within"]  # all lags < 16 are inside the context
    assert oracle[64]["beyond"] > 1e-3 * zero[64]["beyond"]  # delta = 1e-3: older inputs still matter
    assert oracle[64]["vs_oracle"] == pytest.approx(1.0)
    assert zero[64]["vs_oracle"] == pytest.approx(zero[64]["beyond"] / oracle[64]["beyond"])


def test_context_oracle_against_the_recurrence(tool):
    """The oracle's truncated-kernel FFT convolution against the step-by-step recurrence of the target."""
    data = SyntheticLDSDataModule(state_dim=5, d_in=3, d_out=2, seq_len=40, num_val=2, delta=0.01, seed=4)
    data.setup()
    u, y = data.val_dataset.tensors
    a, b, c = (torch.from_numpy(m) for m in (data.system.a, data.system.b, data.system.c))
    # Reference: full recurrence, minus the same recurrence restarted so it only sees the last 7 inputs.
    full = torch.zeros(2, 5, dtype=torch.float64)
    expected = []
    for t in range(40):
        full = a * full + u[:, t].double() @ b
        recent = torch.zeros_like(full)
        for s in range(max(0, t - 6), t + 1):
            recent = a * recent + u[:, s].double() @ b
        expected.append((recent @ c - y[:, t].double()).pow(2).mean())
    torch.testing.assert_close(tool.context_oracle_mse(data.system, u, y, 7), torch.stack(expected))
    # With the whole context the oracle is the target itself: zero error up to float32 storage of y.
    assert tool.context_oracle_mse(data.system, u, y, 40).max() < 1e-12 * y.double().pow(2).mean()


def test_per_position_mse_against_direct_formula(tool):
    torch.manual_seed(0)
    attn = {"attn": {"num_heads": 2}}
    model = SequenceRegression(d_in=3, d_out=2, dim=8, layer_pattern=["attn"], seq_len=32, layer_kwargs=attn)
    u, y = torch.randn(6, 20, 3), torch.randn(6, 20, 2)  # 6 > EVAL_BATCH: the batching is exercised
    with torch.no_grad():
        expected = (model(u) - y).double().pow(2).mean(dim=(0, 2))
    torch.testing.assert_close(tool.per_position_mse(model, u, y), expected, rtol=1e-6, atol=0)


def test_short_filters_give_a_context_of_train_len(tool):
    torch.manual_seed(0)
    model = SequenceRegression(d_in=2, d_out=2, dim=4, layer_pattern=["stu"], seq_len=48, num_filters=4)
    tool.shorten_filters(model, 12)
    phi = model.blocks[0].mixer.phi
    torch.testing.assert_close(phi[:12], spectral_filters(12, 4).float())
    assert phi[12:].abs().max() == 0
    # Inputs more than 11 steps old no longer reach the output (lags 0..11 only).
    u = torch.randn(1, 48, 2)
    v = u.clone()
    v[:, 0] += 5.0
    with torch.no_grad():
        a, b = model(u), model(v)
    assert (a[:, :12] - b[:, :12]).abs().max() > 1e-3
    torch.testing.assert_close(a[:, 12:], b[:, 12:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_filters"):
        tool.shorten_filters(model, 3)


def test_configs_agree_and_build_the_named_models(tool, tmp_path):
    base = yaml.safe_load((REPO / "configs" / "lengthgen.yaml").read_text())
    assert base["model"]["init_args"]["seq_len"] == base["data"]["init_args"]["val_seq_len"]
    assert {v.name for v in VARIANTS} == {f for f, _ in tool.MODELS.values() if f}
    for variant in VARIANTS:  # every model learns the same task: a variant changes the model only
        assert set(yaml.safe_load(variant.read_text())) <= {"trainer", "model"}, variant.name
    args = tool.parse_args(["--quick"])
    model, datamodule, trainer = tool.build_run("stu_tensor", args, seed=1, root=str(tmp_path))
    mixer = model.blocks[0].mixer
    assert (type(mixer).__name__, mixer.variant, mixer.seq_len) == ("STU", "tensor", 64)
    assert (datamodule.seq_len, datamodule.val_seq_len, trainer.max_steps) == (16, 64, args.steps)
    assert datamodule.num_train == args.steps * args.batch_size


def test_config_runs_as_spectralds_fit(tmp_path):
    """`spectralds fit --config configs/lengthgen.yaml --config configs/lengthgen/stu_tensor.yaml`, shrunk:
    trains and validates long."""
    from spectralds.cli_lightning import SpectraLDSCLI

    shrink = [
        "--trainer.max_steps=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.seq_len=64",
        "--model.init_args.num_filters=8",
        "--data.init_args.seq_len=16",
        "--data.init_args.val_seq_len=64",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_train=8",  # one epoch = 2 steps, so validation runs at its end
        "--data.init_args.num_val=4",
    ]
    config = ["--config", str(REPO / "configs" / "lengthgen.yaml")]
    config += ["--config", str(REPO / "configs" / "lengthgen" / "stu_tensor.yaml")]
    with warnings.catch_warnings():  # "args given while sys.argv is set too": pytest's own argv
        warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
        cli = SpectraLDSCLI(args=["fit", *config, *shrink])
    assert cli.trainer.global_step == 2
    assert math.isfinite(cli.trainer.callback_metrics["val/mse"].item())


# ---- tools/online_length_generalization.py: the online protocol of arXiv 2411.01035 ---------------------


@pytest.fixture(scope="module")
def online():
    if str(REPO / "tools") not in sys.path:
        sys.path.insert(0, str(REPO / "tools"))
    return importlib.import_module("online_length_generalization")


def test_online_features_against_a_direct_sum(online):
    import numpy as np

    rng = np.random.default_rng(0)
    u, y, filters = rng.standard_normal(40), rng.standard_normal(40), rng.standard_normal((7, 3))
    f = online.features(u, y, filters)
    t = 25
    direct = [sum(filters[s, k] * u[t - s] for s in range(7)) for k in range(3)]
    alt = [sum((-1) ** s * filters[s, k] * u[t - s] for s in range(7)) for k in range(3)]
    assert np.allclose(f[t], [y[t - 1], y[t - 2], u[t], u[t - 1], *direct, *alt], atol=1e-12)
    assert f[0, 0] == f[0, 1] == f[1, 1] == 0  # nothing before the stream starts


def test_online_learner_converges_on_a_realizable_stream_and_the_comparator_is_exact(online):
    import numpy as np

    rng = np.random.default_rng(1)
    f = rng.standard_normal((4000, 5))
    w = rng.standard_normal(5)
    y = f @ w  # realizable, noiseless: the hindsight comparator's loss is 0
    losses = online.online_loss(f, y)
    assert online.hindsight_loss(f, y) < 1e-20
    assert losses[-500:].mean() < 1e-3 * losses[:500].mean()


def test_online_quick_run_reports_regret_and_slopes(online, tmp_path, capsys):
    out = tmp_path / "online.json"
    online.main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["T"] for r in result["rows"]} == {64, 128}
    for row in result["rows"]:
        for kind in online.LEARNERS:  # regret = learner's loss - the full-context comparator's
            assert math.isclose(row[kind + "_regret"], row[kind] - row["comparator"])
            assert row[kind + "_own_hindsight"] <= row[kind]
    assert "fitted slope" in capsys.readouterr().out
