"""Distillation and pruning callbacks: on our LM, on a user's own LightningModule, and misuse."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from spectralds.callbacks import LayerAdaptiveStatePruning, STUToLDSDistillation
from spectralds.checkpoint_io import load_model
from spectralds.distill import fit_filters, save_fit
from spectralds.layers import build_layer, restore_layers
from spectralds.layers.lds import LDS
from spectralds.layers.stu import STU
from spectralds.models import LanguageModel

SEQ, K, STATES = 64, 4, 16


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))


class UserModel(L.LightningModule):
    """Written as a user would: our STU layers as plain submodules, none of our model classes."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(3, 8)
        self.mixers = torch.nn.ModuleList(
            [build_layer("stu", dim=8, seq_len=SEQ, num_filters=K) for _ in range(2)]
        )
        self.decoder = torch.nn.Linear(8, 1)

    def forward(self, u):
        x = self.encoder(u)
        for mixer in self.mixers:
            x = x + mixer(x)
        return self.decoder(x)

    def training_step(self, batch, batch_idx):
        u, y = batch
        return torch.nn.functional.mse_loss(self(u), y)

    def validation_step(self, batch, batch_idx):
        u, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self(u), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def on_load_checkpoint(self, checkpoint):
        restore_layers(self, checkpoint.get("spectralds_layers", {}))


def regression_data(n=16):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(n, SEQ, 3, generator=gen)
    y = u.cumsum(1)[..., :1] / SEQ**0.5
    return DataLoader(TensorDataset(u, y), batch_size=4)


def trainer(tmp_path, callbacks, **kw):
    args = dict(
        max_steps=4,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
    )
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


def test_plain_user_model_default_arguments(tmp_path):
    torch.manual_seed(0)
    model = UserModel()
    data = regression_data()
    callback = STUToLDSDistillation()  # defaults: state_dim min(80, seq_len // 4) = 16
    trainer(tmp_path, [callback]).fit(model, data, data)
    assert (tmp_path / "checkpoints" / "lds.ckpt").is_file()
    u = next(iter(data))[0]
    assert all(isinstance(m, LDS) for m in model.mixers)
    assert not any(isinstance(m, STU) for m in model.modules())
    # the swap preserved the function: compare with the STU it replaced, rebuilt with the same M
    stu = build_layer("stu", dim=8, seq_len=SEQ, num_filters=K)
    with torch.no_grad():
        stu.M_phi_plus.copy_(model.mixers[0].M_phi_plus)
        stu.M_phi_minus.copy_(model.mixers[0].M_phi_minus)
        x = model.encoder(u)
        rel = (model.mixers[0](x) - stu(x)).pow(2).sum() / stu(x).pow(2).sum()
    assert rel < 1e-9
    assert all(r.rel_mse < 1e-9 for r in callback.reports)
    assert callback.results["distill/val_loss_stu"] == pytest.approx(
        callback.results["distill/val_loss_lds"], rel=1e-4
    )


def test_swap_mid_training_continues_with_new_optimizer(tmp_path):
    torch.manual_seed(0)
    model = UserModel()
    data = regression_data()
    callback = STUToLDSDistillation(state_dim=STATES, at_step=2, validate=False, log_plot=False)
    t = trainer(tmp_path, [callback], max_steps=6)
    t.fit(model, data)
    lds_params = {id(p) for m in model.mixers for p in m.parameters()}
    opt_params = {id(p) for group in t.optimizers[0].param_groups for p in group["params"]}
    assert lds_params <= opt_params
    assert t.global_step == 6


def test_lm_checkpoint_after_swap_reloads_as_lds(tmp_path):
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=16, dim=8, num_layers=2, seq_len=SEQ, num_filters=K)
    tokens = torch.randint(0, 16, (8, SEQ + 1))
    data = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    ckpt = tmp_path / "lds.ckpt"
    callback = STUToLDSDistillation(state_dim=STATES, save_path=str(ckpt), log_plot=False)
    trainer(tmp_path, [callback], max_steps=2).fit(model, data, data)
    reloaded = load_model(ckpt)
    assert all(isinstance(b.mixer, LDS) for b in reloaded.blocks)
    x = tokens[:2, :-1]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model.eval()(x))


def test_pruning_after_distillation_keeps_fewer_states(tmp_path):
    torch.manual_seed(0)
    model = UserModel()
    data = regression_data()
    prune = LayerAdaptiveStatePruning(ratio=0.5, save_path=str(tmp_path / "pruned.ckpt"))
    callbacks = [STUToLDSDistillation(state_dim=STATES, save_path=None, log_plot=False), prune]
    trainer(tmp_path, callbacks).fit(model, data, data)
    kept = [m.state_dim for m in model.mixers]
    assert sum(kept) == STATES and all(k >= 1 for k in kept)
    assert {"prune/val_loss_before", "prune/val_loss_after"} <= set(prune.results)
    reloaded = UserModel.load_from_checkpoint(tmp_path / "pruned.ckpt")  # rebuilt as the pruned LDS model
    assert [m.state_dim for m in reloaded.mixers] == kept
    u = next(iter(data))[0]
    assert torch.allclose(reloaded.eval()(u), model.eval()(u))


def test_no_stu_layer_is_a_clear_error(tmp_path):
    model = UserModel()
    model.mixers = torch.nn.ModuleList([torch.nn.Identity()])
    with pytest.raises(ValueError, match="no STU layer"):
        trainer(tmp_path, [STUToLDSDistillation()]).fit(model, regression_data())


def test_pruning_before_distilling_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="distill the STU layers first"):
        trainer(tmp_path, [LayerAdaptiveStatePruning(validate=False)]).fit(UserModel(), regression_data())


def test_fit_shorter_than_layer_is_a_clear_error(tmp_path):
    path = tmp_path / "short.safetensors"
    save_fit(fit_filters(SEQ // 2, K, 8, progress=False), path)
    callback = STUToLDSDistillation(fit_path=str(path), validate=False, save_path=None)
    with pytest.raises(ValueError, match="longer than the fitted LDS"):
        trainer(tmp_path, [callback]).fit(UserModel(), regression_data())


def test_tensor_filters_are_refused_not_degraded(tmp_path):
    model = UserModel()
    model.mixers = torch.nn.ModuleList(
        [build_layer("stu", dim=8, seq_len=SEQ, num_filters=K, variant="tensor")]
    )
    callback = STUToLDSDistillation(validate=False, save_path=None, log_plot=False)
    with pytest.raises(ValueError, match="'tensor' filters of length 64 only to relative MSE"):
        trainer(tmp_path, [callback]).fit(model, regression_data())
    assert isinstance(model.mixers[0], STU)  # nothing was swapped
