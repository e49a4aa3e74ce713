"""`spectralds export --format flash-stu-2`: the command hands the model to the importer's
`export_flash_stu2` (skipped where spectralds.interop.flash_stu is not part of the package)."""

import sys

import pytest
import torch
from cli_helpers import one_line_error, run_cli

from spectralds.layers import layer_specs
from spectralds.models import LanguageModel


def _checkpoint(path, **kwargs):
    torch.manual_seed(0)
    model = LanguageModel(vocab_size=64, dim=16, num_layers=1, layer_pattern=["stu"], seq_len=32,
                          num_filters=4, mlp_ratio=2.0, **kwargs)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "spectralds_layers": layer_specs(model), "spectralds_model": "LanguageModel"}, path)
    return str(path)


def test_flash_stu2_format_goes_to_the_importers_export(tmp_path, capsys):
    pytest.importorskip("spectralds.interop.flash_stu")
    ckpt = _checkpoint(tmp_path / "fs2.ckpt", mlp_activation="gelu_tanh", norm_eps=None)
    assert run_cli(["export", "--ckpt", ckpt, "--format", "flash-stu-2", "--out", str(tmp_path / "out")]) == 0
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "out").iterdir()}
    silu = _checkpoint(tmp_path / "silu.ckpt")  # our default gate: not in flash-stu-2's vocabulary
    err = one_line_error(capsys, ["export", "--ckpt", silu, "--format", "flash-stu-2", "--out",
                                  str(tmp_path / "out2")])
    assert "flash-stu-2 cannot express" in err


def test_export_arguments_are_checked(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "m.ckpt")
    assert "--format" in one_line_error(capsys, ["export", "--ckpt", ckpt, "--format", "onnx", "--out", "d"])
    assert "does not exist" in one_line_error(
        capsys, ["export", "--ckpt", str(tmp_path / "none.ckpt"), "--format", "flash-stu-2", "--out", "d"])


def test_without_transformers_export_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path / "m.ckpt")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    err = one_line_error(capsys, ["export", "--ckpt", ckpt, "--format", "hf", "--out", str(tmp_path / "d")])
    assert "transformers" in err and "pip install 'spectralds[hf]'" in err
    assert not (tmp_path / "d").exists()
