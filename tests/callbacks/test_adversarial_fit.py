"""Adversarial files and arguments for the fit, the caches and the distillation/pruning callbacks.

Each case asserts either a one-line UserError naming the problem (and that the files it was given are
unchanged, byte for byte) or a warning naming the file and a recomputation.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import one_line_error
from test_callbacks import UserModel, regression_data, trainer

from spectralds import filters as filters_module
from spectralds import io as io_module
from spectralds.callbacks import LayerAdaptiveStatePruning, STUToLDSDistillation
from spectralds.data.shards import load_shard
from spectralds.distill import LDSFit, fit_cache_path, fit_filters, get_fit, load_fit, save_fit
from spectralds.distill import convert as convert_module
from spectralds.distill.convert import convert_stu_layers
from spectralds.distill.lds_file import _metadata, _safetensors_bytes
from spectralds.errors import UserError
from spectralds.filters import spectral_filters
from spectralds.layers import build_layer
from spectralds.layers.lds import LDS
from spectralds.layers.stu import STU, STUTensordot

L, K, H = 64, 4, 16
ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "tests" / "assets" / "configs" / "tiny_lm.yaml")
CORPUS = str(ROOT / "tests" / "assets" / "data" / "corpus")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(io_module, "_warned_caches", set())  # "warns once" starts afresh in each test


@pytest.fixture(scope="module")
def phi() -> torch.Tensor:
    return spectral_filters(L, K, use_cache=False)


@pytest.fixture(scope="module")
def fit(phi) -> LDSFit:
    return fit_filters(L, K, H, filters=phi, progress=False)


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def one_line(error: pytest.ExceptionInfo, *needles: str) -> str:
    message = str(error.value)
    assert isinstance(error.value, UserError) and "\n" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def rewrite(path: Path, fit: LDSFit, tensors: dict | None = None, keep_hash: bool = True, **meta) -> Path:
    """Write `fit`'s file with `tensors` swapped in and metadata entries changed, keeping the old hash
    (as a corrupted or tampered file would) unless keep_hash is False (a consistent, re-hashed file)."""
    meta = {**_metadata(fit), **meta}
    tensors = {"A": fit.A, "B": fit.B, "C": fit.C, **(tensors or {})}
    if not keep_hash:
        del meta["sha256"]
    path.write_bytes(_safetensors_bytes(tensors, meta))
    return path


def permuted(fit: LDSFit) -> LDSFit:
    """The same system with its filters (columns) in another order: it realizes other filters."""
    order = torch.tensor([1, 0, *range(2, K)])
    C = fit.C[:, torch.cat([order, order + K])]
    return LDSFit(A=fit.A, B=fit.B, C=C.contiguous(), seq_len=fit.seq_len, num_filters=K,
                  variant=fit.variant, method=fit.method, rel_mse_f64=fit.rel_mse_f64,
                  rel_mse_f32=fit.rel_mse_f32)


# ---- the fit cache --------------------------------------------------------------------------------
def test_cached_fit_with_one_C_entry_sign_flipped_is_recomputed(fit):
    first = get_fit(L, K, H, progress=False)
    path = fit_cache_path(L, K, H, "hankel", "varpro")
    C = first.C.clone()
    C[0, 0] = -C[0, 0]
    meta = {**_metadata(first, {"solver_revision": _revision()})}
    path.write_bytes(_safetensors_bytes({"A": first.A, "B": first.B, "C": C}, meta))
    with pytest.warns(UserWarning, match=f"recomputing the cached LDS fit {path}.*content hash"):
        healed = get_fit(L, K, H, progress=False)
    assert torch.equal(healed.C, first.C)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file is good again
        assert torch.equal(get_fit(L, K, H, progress=False).C, first.C)


def _revision() -> str:
    from spectralds.distill.cache import _revision

    return _revision()


def test_fit_of_another_state_dim_copied_over_the_cache_name_is_recomputed():
    get_fit(L, K, 8, progress=False)
    wanted = fit_cache_path(L, K, H, "hankel", "varpro")
    shutil.copyfile(fit_cache_path(L, K, 8, "hankel", "varpro"), wanted)
    with pytest.warns(UserWarning, match="state_dim='8' instead of '16'"):
        fit = get_fit(L, K, H, progress=False)
    assert fit.state_dim == H and load_fit(wanted).state_dim == H


def test_fit_of_another_variant_copied_over_the_cache_name_is_recomputed():
    get_fit(L, K, H, variant="hankel_L", progress=False)
    wanted = fit_cache_path(L, K, H, "hankel", "varpro")
    shutil.copyfile(fit_cache_path(L, K, H, "hankel_L", "varpro"), wanted)
    with pytest.warns(UserWarning, match="variant='hankel_L' instead of 'hankel'"):
        assert get_fit(L, K, H, progress=False).variant == "hankel"


def test_cached_fit_of_another_solver_revision_is_recomputed(fit):
    path = fit_cache_path(L, K, H, "hankel", "varpro")
    path.parent.mkdir(parents=True)
    path.write_bytes(_safetensors_bytes({"A": fit.A, "B": fit.B, "C": fit.C},
                                        _metadata(fit, {"solver_revision": "v1r0"})))
    with pytest.warns(UserWarning, match="solver_revision='v1r0'"):
        get_fit(L, K, H, progress=False)


def test_cached_fit_without_a_hash_is_recomputed(fit):
    path = fit_cache_path(L, K, H, "hankel", "varpro")
    path.parent.mkdir(parents=True)
    rewrite(path, fit, keep_hash=False, solver_revision=_revision())
    with pytest.warns(UserWarning, match="no content hash"):
        get_fit(L, K, H, progress=False)
    assert load_fit(path).state_dim == H  # rewritten with a hash: loads without a warning


def test_full_disk_fit_cache_warns_once_and_goes_on(monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", full)
    with pytest.warns(UserWarning, match="cannot be written") as record:
        a = get_fit(L, K, 8, progress=False)
        b = get_fit(L, K, 10, progress=False)
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1
    assert a.state_dim == 8 and b.state_dim == 10
    assert not [p for p in (fit_cache_path(L, K, 8, "hankel", "varpro").parent).iterdir()
                if p.suffix == ".safetensors"]


# ---- user LDS files -------------------------------------------------------------------------------
def test_flipped_data_byte_in_a_user_file_is_one_line(fit, tmp_path):
    path = tmp_path / "lds.safetensors"
    save_fit(fit, path)
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # a low mantissa bit of the last C entry
    path.write_bytes(bytes(blob))
    before = sha(path)
    with pytest.raises(UserError) as err:
        load_fit(path)
    one_line(err, str(path), "content hash")
    assert sha(path) == before


def test_edited_metadata_fails_the_hash(fit, tmp_path):
    path = rewrite(tmp_path / "lds.safetensors", fit, rel_mse_f64="1e-30")  # a better claim, same bytes
    with pytest.raises(UserError) as err:
        load_fit(path)
    one_line(err, str(path), "content hash")


def test_user_file_without_a_hash_loads_with_a_warning(fit, tmp_path):
    path = rewrite(tmp_path / "old.safetensors", fit, keep_hash=False)
    with pytest.warns(UserWarning, match=f"{path} has no content hash.*unverified"):
        assert torch.equal(load_fit(path).C, fit.C)


@pytest.mark.parametrize(
    ("meta", "needle"),
    [({"seq_len": "0"}, "seq_len=0"), ({"seq_len": "-5"}, "seq_len=-5"),
     ({"num_filters": "0"}, "num_filters=0"), ({"num_filters": "100"}, "num_filters=100")],
)
def test_impossible_metadata_is_one_line(fit, tmp_path, meta, needle):
    path = rewrite(tmp_path / "bad.safetensors", fit, keep_hash=False, **meta)
    before = sha(path)
    with pytest.raises(UserError) as err:
        load_fit(path)
    one_line(err, str(path), needle)
    assert sha(path) == before


def test_zero_state_file_is_one_line(fit, tmp_path):
    empty = torch.zeros(0, dtype=torch.float64)
    path = rewrite(tmp_path / "zero.safetensors", fit, {"A": empty, "B": empty, "C": torch.zeros(0, 2 * K,
                   dtype=torch.float64)}, keep_hash=False, state_dim="0")
    with pytest.raises(UserError) as err:
        load_fit(path)
    one_line(err, str(path), "state_dim=0")


def test_expect_filters_refuses_a_fit_of_other_filters(fit, phi, tmp_path):
    path = tmp_path / "permuted.safetensors"
    save_fit(permuted(fit), path)  # a valid file: its hash matches, its metadata claims a good fit
    assert load_fit(path).rel_mse_f64 < 1e-10
    with pytest.raises(UserError) as err:
        load_fit(path, expect_filters=phi)
    message = one_line(err, str(path), "relative MSE")
    assert float(message.split("relative MSE ")[1].split()[0]) > 0.1
    with pytest.raises(UserError):
        load_fit(path, expect_filters=True)  # the fit's own spectral filters
    assert load_fit(tmp_path / "permuted.safetensors", expect_filters=phi[:, [1, 0, 2, 3]]).state_dim == H
    good = tmp_path / "good.safetensors"
    save_fit(fit, good)
    load_fit(good, expect_filters=True)


def test_expect_filters_of_the_wrong_shape_is_one_line(fit, phi, tmp_path):
    path = tmp_path / "lds.safetensors"
    save_fit(fit, path)
    with pytest.raises(UserError) as err:
        load_fit(path, expect_filters=phi[:, :2])
    one_line(err, str(path), "cannot serve")
    with pytest.raises(UserError) as err:
        load_fit(path, expect_filters=phi[None])
    one_line(err, "expect_filters", "shape (1, 64, 4)")
    with pytest.raises(UserError) as err:
        load_fit(path, expect_filters=phi, max_filter_error=math.nan)
    one_line(err, "max_filter_error")


# ---- the filter cache -----------------------------------------------------------------------------
def _filter_file(seq_len: int, k: int) -> Path:
    return filters_module._cache_path(seq_len, k, "hankel", "auto")


def test_cached_filter_file_with_one_corrupt_value_is_recomputed():
    good = spectral_filters(100, 4)
    path = _filter_file(100, 4)
    blob = bytearray(path.read_bytes())
    blob[-8 * 50 + 3] ^= 0x40  # an exponent bit of one float64 entry, the hash in the metadata kept
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=f"{path}.*content hash"):
        again = spectral_filters(100, 4)
    assert torch.equal(again, good)


def test_filter_file_for_another_request_is_recomputed():
    spectral_filters(100, 3)
    shutil.copyfile(_filter_file(100, 3), _filter_file(100, 4))
    with pytest.warns(UserWarning, match="num_filters='3' instead of '4'"):
        assert spectral_filters(100, 4).shape == (100, 4)


def test_read_only_filter_cache_warns_once_and_goes_on(monkeypatch, tmp_path):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(io_module.os, "replace", read_only)
    with pytest.warns(UserWarning, match="cannot be written") as record:
        a = spectral_filters(90, 3)
        b = spectral_filters(91, 3)
    assert len([w for w in record if "cannot be written" in str(w.message)]) == 1
    assert a.shape == (90, 3) and b.shape == (91, 3)
    assert not list((tmp_path / "cache").glob("*"))  # no file, no temporary left behind


def test_layer_filters_follow_the_cache_dir(tmp_path, monkeypatch):
    build_layer("stu", dim=4, seq_len=48, num_filters=3)
    assert _filter_file(48, 3).is_file()
    monkeypatch.setenv("SPECTRALDS_CACHE_DIR", str(tmp_path / "other"))
    build_layer("stu", dim=4, seq_len=48, num_filters=3)  # not served from the other directory's memo
    assert (tmp_path / "other" / _filter_file(48, 3).name).is_file()


# ---- measured at the swap -------------------------------------------------------------------------
class TwoLayers(torch.nn.Module):
    def __init__(self, second_filters: torch.Tensor | None = None, kind: str = "stu"):
        super().__init__()
        self.first = build_layer(kind, dim=6, seq_len=L, num_filters=K)
        self.second = build_layer(kind, dim=6, seq_len=L, num_filters=K, filters=second_filters)


def test_swap_refuses_a_layer_whose_filters_the_fit_misses_and_changes_nothing(fit, phi):
    module = TwoLayers(second_filters=phi[:, [1, 0, 2, 3]])  # same L, K, variant; other column order
    with pytest.raises(UserError) as err:
        convert_stu_layers(module, lambda stu: fit, max_error=1e-6)
    message = one_line(err, "second", "no layer changed")
    numbers = [float(n) for n in re.findall(r"\d\.\d\de[+-]\d\d", message)]
    assert len(numbers) >= 2 and min(numbers[:2]) > 1e-3  # both measured numbers, both far off
    assert isinstance(module.first, STU) and isinstance(module.second, STU)  # the good layer too


@pytest.mark.parametrize("kind", ["stu", "stu_t"])
def test_swap_measures_both_layer_kinds(fit, kind):
    module = TwoLayers(kind=kind)
    reports = convert_stu_layers(module, lambda stu: fit, max_error=1e-6)
    assert all(isinstance(m, LDS) for m in (module.first, module.second))
    assert all(r.rel_mse < 1e-8 and r.filter_rel_mse < 1e-8 for r in reports)
    module = TwoLayers(kind=kind)
    bad = LDSFit(A=fit.A, B=fit.B, C=fit.C * 1.01, seq_len=L, num_filters=K, variant="hankel",
                 method="varpro", rel_mse_f64=1e-30, rel_mse_f32=1e-30)  # claims perfect, measures 1e-4
    with pytest.raises(UserError) as err:
        convert_stu_layers(module, lambda stu: bad, max_error=1e-6)
    one_line(err, "first", "1.00e-04")
    assert isinstance(module.first, (STU, STUTensordot))


def test_swap_holds_one_converted_layer_at_a_time(fit, monkeypatch):
    """Every layer is measured before any swap, yet the layer tensors alive peak at the module's plus one
    LDS, not plus an LDS for every layer: each measured LDS is dropped, each STU released once swapped."""
    module = torch.nn.ModuleList([build_layer("stu", dim=6, seq_len=L, num_filters=K) for _ in range(4)])
    tensors = lambda m: [*m.parameters(), *m.buffers()]  # noqa: E731
    alive = [weakref.ref(t) for m in module for t in tensors(m)]
    stu_bytes, peaks, build = sum(r().nbytes for r in alive), [], convert_module.lds_from_stu

    def counted(stu, fit):
        lds = build(stu, fit)
        alive.extend(weakref.ref(t) for t in tensors(lds))
        peaks.append(sum(t.nbytes for t in (r() for r in alive) if t is not None))
        return lds

    monkeypatch.setattr(convert_module, "lds_from_stu", counted)
    convert_stu_layers(module, lambda stu: fit, max_error=1e-6)
    assert all(isinstance(m, LDS) for m in module) and len(peaks) == 8  # measured, then rebuilt
    lds_bytes = sum(t.nbytes for m in module for t in tensors(m))
    one_layer = max(stu_bytes, lds_bytes) // len(module)
    assert max(peaks) <= max(stu_bytes, lds_bytes) + one_layer < stu_bytes + lds_bytes  # all built first


def test_measuring_a_swap_leaves_the_global_random_state_alone(fit):
    """The measurement's builds draw from a forked generator: with or without measuring, the random
    numbers after the swap (the training run's) are the same."""
    draws = []
    for measure in (False, True):
        module = TwoLayers()
        torch.manual_seed(5)
        convert_stu_layers(module, lambda stu: fit, measure=measure)
        draws.append(torch.rand(4))
    assert torch.equal(*draws)


def test_the_measured_error_decides_not_the_metadata(fit):
    modest = LDSFit(A=fit.A, B=fit.B, C=fit.C, seq_len=L, num_filters=K, variant="hankel", method="varpro",
                    rel_mse_f64=0.5, rel_mse_f32=0.5)  # claims a poor fit, measures a good one
    callback = STUToLDSDistillation(validate=False, save_path=None, log_plot=False)
    callback.fit_for = lambda trainer, stu: modest
    model = UserModel()
    trainer(Path(os.environ["SPECTRALDS_CACHE_DIR"]).parent, [callback]).fit(model, regression_data())
    assert all(isinstance(m, LDS) for m in model.mixers)


# ---- the callbacks check before work --------------------------------------------------------------
class CountingModel(UserModel):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def test_missing_fit_path_is_refused_before_the_first_step(tmp_path):
    CountingModel.steps = 0
    missing = tmp_path / "nope.safetensors"
    callback = STUToLDSDistillation(fit_path=str(missing), validate=False, save_path=None)
    with pytest.raises(UserError) as err:
        trainer(tmp_path, [callback]).fit(CountingModel(), regression_data())
    one_line(err, str(missing), "does not exist")
    assert CountingModel.steps == 0


def test_resume_after_the_swap_needs_no_fit_file(fit, tmp_path):
    path = tmp_path / "lds.safetensors"
    save_fit(fit, path)
    ckpt = tmp_path / "lds.ckpt"
    first = STUToLDSDistillation(fit_path=str(path), validate=False, save_path=str(ckpt), log_plot=False)
    trainer(tmp_path, [first], max_steps=2).fit(UserModel(), regression_data())
    path.unlink()  # the checkpoint holds the LDS layers: nothing needs the fit any more
    CountingModel.steps = 0
    model = CountingModel()
    again = STUToLDSDistillation(fit_path=str(path), validate=False, save_path=None, log_plot=False)
    trainer(tmp_path, [again], max_steps=4).fit(model, regression_data(), ckpt_path=str(ckpt))
    assert CountingModel.steps == 2 and again.done and all(isinstance(m, LDS) for m in model.mixers)


def test_resume_before_the_swap_still_checks_the_fit_file(tmp_path):
    ckpt = tmp_path / "stu.ckpt"
    run = trainer(tmp_path, [], max_steps=2)
    run.fit(UserModel(), regression_data())
    run.save_checkpoint(ckpt)  # not swapped yet
    CountingModel.steps = 0
    missing = tmp_path / "nope.safetensors"
    callback = STUToLDSDistillation(fit_path=str(missing), at_step=100, validate=False, save_path=None)
    with pytest.raises(UserError) as err:
        trainer(tmp_path, [callback], max_steps=4).fit(CountingModel(), regression_data(), ckpt_path=ckpt)
    one_line(err, str(missing), "does not exist")
    assert CountingModel.steps == 0


def test_permuted_fit_path_is_refused_at_setup_and_nothing_is_swapped(fit, tmp_path):
    CountingModel.steps = 0
    path = tmp_path / "permuted.safetensors"
    save_fit(permuted(fit), path)
    before = sha(path)
    model = CountingModel()
    callback = STUToLDSDistillation(fit_path=str(path), validate=False, save_path=None)
    with pytest.raises(UserError) as err:
        trainer(tmp_path, [callback]).fit(model, regression_data())
    one_line(err, str(path), "mixers.0", "relative MSE")
    assert CountingModel.steps == 0 and all(isinstance(m, STU) for m in model.mixers)
    assert sha(path) == before


def test_corrupt_fit_path_is_refused_at_setup(fit, tmp_path):
    path = tmp_path / "lds.safetensors"
    save_fit(fit, path)
    blob = bytearray(path.read_bytes())
    blob[-100] ^= 0x80
    path.write_bytes(bytes(blob))
    callback = STUToLDSDistillation(fit_path=str(path), validate=False, save_path=None)
    with pytest.raises(UserError) as err:
        trainer(tmp_path, [callback]).fit(UserModel(), regression_data())
    one_line(err, str(path), "content hash")


def test_state_dim_the_layers_cannot_take_is_refused_at_setup(tmp_path):
    CountingModel.steps = 0
    callback = STUToLDSDistillation(state_dim=L, validate=False, save_path=None)  # > seq_len / 4
    with pytest.raises(UserError) as err:
        trainer(tmp_path, [callback]).fit(CountingModel(), regression_data())
    one_line(err, "state_dim")
    assert CountingModel.steps == 0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"state_dim": 1}, "state_dim"), ({"state_dim": 0}, "state_dim"), ({"state_dim": 2.5}, "state_dim"),
        ({"state_dim": "80"}, "state_dim"), ({"state_dim": 7, "method": "spectralds"}, "even"),
        ({"method": "magic"}, "method"), ({"max_fit_error": 0}, "max_fit_error"),
        ({"max_fit_error": -1.0}, "max_fit_error"), ({"max_fit_error": math.nan}, "max_fit_error"),
        ({"max_fit_error": math.inf}, "max_fit_error"), ({"fit_path": ""}, "fit_path"),
        ({"fit_path": "x.safetensors", "state_dim": 8}, "not both"), ({"at_step": -1}, "at_step"),
        ({"at_epoch": 1.5}, "at_epoch"), ({"validate": "yes"}, "validate"),
    ],
)
def test_distillation_arguments_are_checked_when_built(kwargs, needle):
    with pytest.raises(UserError) as err:
        STUToLDSDistillation(**kwargs)
    one_line(err, "STUToLDSDistillation", needle)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"ratio": 0}, "ratio"), ({"ratio": 1}, "ratio"), ({"ratio": -0.1}, "ratio"),
     ({"ratio": math.nan}, "ratio"), ({"ratio": "0.5"}, "ratio"), ({"method": "magnitude"}, "method"),
     ({"at_step": -2}, "at_step")],
)
def test_pruning_arguments_are_checked_when_built(kwargs, needle):
    with pytest.raises(UserError) as err:
        LayerAdaptiveStatePruning(**kwargs)
    one_line(err, "LayerAdaptiveStatePruning", needle)


# ---- the command line -----------------------------------------------------------------------------
def _snippet(tmp_path: Path, name: str, class_name: str, **init_args) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps({"class_path": f"spectralds.callbacks.{class_name}", "init_args": init_args}))
    return str(path)


@pytest.mark.usefixtures("cli_env")
def test_cli_missing_fit_path_is_one_line_and_trains_nothing(tmp_path, capsys):
    snippet = _snippet(tmp_path, "distill", "STUToLDSDistillation", fit_path="/no/such/lds.safetensors")
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--trainer.callbacks+={snippet}"]
    err = one_line_error(capsys, args)
    assert "/no/such/lds.safetensors" in err and "does not exist" in err
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.usefixtures("cli_env")
def test_cli_flipped_byte_fit_path_is_one_line(fit, tmp_path, capsys):
    fit32 = fit_filters(32, K, 8, filters=spectral_filters(32, K), progress=False)  # TINY: seq_len 32
    path = tmp_path / "lds.safetensors"
    save_fit(fit32, path)
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x02
    path.write_bytes(bytes(blob))
    before = sha(path)
    snippet = _snippet(tmp_path, "distill", "STUToLDSDistillation", fit_path=str(path))
    args = ["fit", "--config", TINY, f"--data.source={CORPUS}", f"--trainer.callbacks+={snippet}"]
    err = one_line_error(capsys, args)
    assert str(path) in err and "content hash" in err and sha(path) == before


@pytest.mark.usefixtures("cli_env")
def test_cli_bad_prune_ratio_is_one_line(tmp_path, capsys):
    snippet = _snippet(tmp_path, "prune", "LayerAdaptiveStatePruning", ratio=0)
    err = one_line_error(capsys, ["fit", "--config", TINY, f"--trainer.callbacks+={snippet}"])
    assert "ratio" in err


# ---- token shards ---------------------------------------------------------------------------------
def _shard(tmp_path: Path, ids: list[int], meta: dict | str | None = None) -> Path:
    path = tmp_path / "tokens-test"
    np.asarray(ids, dtype="<u2").tofile(path.with_suffix(".bin"))
    meta = {"dtype": "uint16", "num_tokens": len(ids), "tokenizer": "byte"} if meta is None else meta
    path.with_suffix(".json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return path


@pytest.mark.parametrize(
    ("meta", "needle"),
    [("{not json", "unreadable metadata"), ({"dtype": "uint16"}, "num_tokens"),
     ({"dtype": "uint16", "num_tokens": 7}, "not 7 tokens"),
     ({"dtype": "float32", "num_tokens": 3}, "dtype")],
)
def test_broken_shard_metadata_rebuilds_with_a_warning(tmp_path, meta, needle):
    path = _shard(tmp_path, [1, 2, 3], meta)
    with pytest.warns(UserWarning, match=f"{path.with_suffix('.json')}.*{needle}.*rebuilding"):
        assert load_shard(path, 256) is None


def test_shard_ids_beyond_the_vocabulary_are_one_line(tmp_path):
    path = _shard(tmp_path, [1, 2, 300])
    before = sha(path.with_suffix(".bin"))
    with pytest.raises(UserError) as err:
        load_shard(path, 256)
    one_line(err, str(path.with_suffix(".bin")), "300")
    assert sha(path.with_suffix(".bin")) == before
    assert load_shard(path, 512).tolist() == [1, 2, 300]


def test_single_filter_banks_hash_and_reload():
    # (L, 1) banks: a size-1 column whose stride is not 1 once broke io.tensor_hash
    first = spectral_filters(2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(spectral_filters(2, 1), first)
    assert _filter_file(2, 1).is_file()


def test_a_full_disk_under_distill_filters_is_one_line_naming_the_file(
    cli_env, capsys, monkeypatch, tmp_path
):
    from cli_helpers import one_line_error

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_module.os, "fsync", full)
    out = tmp_path / "fit.safetensors"
    args = ["distill-filters", "--seq-len", "64", "--num-filters", "4", "--state-dim", "8"]
    err = one_line_error(capsys, [*args, "--out", str(out), "--no-progress"])
    assert f"could not write {out}: No space left on device" in err
    assert not out.exists()
