"""Issue 26 section 4, input sizes and files: import-fit and distill-filters check what a file or an
option claims against a bound before allocating anything; import-fit never writes over its input; an
AR order that would run for minutes is refused when the layer is built. Each bad input: exit status 2,
one `spectralds: error:` line naming the problem, no traceback, every existing file unchanged."""

import math
import os

import pytest
import torch
from test_adversarial_cli import fails

from spectralds.errors import UserError
from spectralds.filters import MAX_SEQ_LEN, spectral_filters
from spectralds.layers import build_layer

pytestmark = pytest.mark.usefixtures("cli_env")

L, K, H = 64, 4, 8


def abc() -> dict[str, torch.Tensor]:
    """A small stable LDS in the released layout (its quality does not matter here)."""
    torch.manual_seed(0)
    return {"A": torch.rand(H) * 0.9, "B": torch.randn(1, H), "C": torch.randn(H, 2 * K)}


def import_fit(path, *extra: str, out: str | None = None) -> list[str]:
    out = out if out is not None else str(path.parent / "out.safetensors")
    return ["import-fit", str(path), "--seq-len", str(L), "--num-filters", str(K), "--out", out, *extra]


def saved(tmp_path, name: str, **changes) -> object:
    path = tmp_path / name
    torch.save({**abc(), **changes}, path)
    return path


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda t: {"A": t["A"].to_sparse()}, "A is a torch.sparse_coo tensor"),
        (lambda t: {"B": torch.empty(1, H, device="meta")}, "B is a device meta tensor"),
    ],
    ids=["sparse", "meta"],
)
def test_import_fit_refuses_tensors_without_numbers(change, expected, capsys, tmp_path):
    path = saved(tmp_path, "fit.pt", **change(abc()))
    fails(capsys, tmp_path, import_fit(path), str(path), expected)
    assert not (tmp_path / "out.safetensors").exists()


def test_import_fit_refuses_an_expanded_view_before_allocating_it(capsys, tmp_path):
    """A 2 KB file whose A claims 10^9 float32 elements (stride 0): refused by its shape, not converted."""
    tensors = abc()
    big = torch.zeros(1).expand(10**9)
    path = saved(tmp_path, "expanded.pt", A=big, B=big, C=torch.zeros(1, 1).expand(10**9, 2 * K))
    assert path.stat().st_size < 10_000
    fails(capsys, tmp_path, import_fit(path), str(path), "1,000,000,000 states", "above the bound")
    # the same with mismatched shapes: the shape check comes first, still before any allocation
    path = saved(tmp_path, "mismatch.pt", A=big, B=tensors["B"])
    fails(capsys, tmp_path, import_fit(path), str(path), "shapes A (1000000000,)")


@pytest.mark.parametrize("command", ["import-fit", "distill-filters"])
@pytest.mark.parametrize("seq_len", ["99999999999", str(MAX_SEQ_LEN + 1), "0", "-5"])
def test_huge_or_nonpositive_seq_len(command, seq_len, capsys, tmp_path):
    args = [command, "--no-progress"]
    if command == "import-fit":
        args = import_fit(saved(tmp_path, "fit.pt"))[:2]
    args += ["--seq-len", seq_len, "--num-filters", str(K), "--out", str(tmp_path / "o.safetensors")]
    expected = f"<= {MAX_SEQ_LEN}" if int(seq_len) > 0 else "seq_len must be >="
    fails(capsys, tmp_path, args, "seq_len", expected)


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--num-filters", "9999999999"], "num_filters must be <= 64"),
        (["--num-filters", "-1"], "num_filters must be >= 1"),
        (["--state-dim", "0"], "state_dim must be >= 1"),
        (["--state-dim", "-8"], "state_dim must be >= 1"),
        (["--state-dim", "99999999999999999999"], "state_dim must be <= "),
    ],
)
def test_distill_filters_sizes(extra, expected, capsys, tmp_path):
    args = ["distill-filters", "--seq-len", str(L), "--num-filters", str(K), "--no-progress", *extra]
    fails(capsys, tmp_path, [*args, "--out", str(tmp_path / "o.safetensors")], expected)


def test_distill_filters_work_bound(capsys, tmp_path):
    """Sizes each within their own bound whose fit would still need terabytes: refused up front."""
    args = ["distill-filters", "--seq-len", str(MAX_SEQ_LEN), "--num-filters", "24", "--state-dim", "200000",
            "--no-progress", "--out", str(tmp_path / "o.safetensors")]
    fails(capsys, tmp_path, args, "a fit of 200000 states", "above the bound")


def test_import_fit_of_a_directory_says_so(capsys, tmp_path):
    folder = tmp_path / "fits"
    folder.mkdir()
    fails(capsys, tmp_path, import_fit(folder), f"fit file {folder} is a directory")


def test_import_fit_of_a_device_or_fifo_says_so(capsys, tmp_path):
    from pathlib import Path

    fifo_path = Path(fifo(tmp_path))
    for path in (Path("/dev/zero"), fifo_path):
        fails(capsys, tmp_path, import_fit(path, out=str(tmp_path / "o.safetensors")),
              f"fit file {path} is not a regular file")


@pytest.mark.parametrize("spelling", ["same", "dot-dot", "symlink", "hardlink"])
def test_import_fit_never_writes_over_its_input(spelling, capsys, tmp_path):
    path = saved(tmp_path, "phi_lds.pt")
    (tmp_path / "sub").mkdir()
    out = {"same": str(path), "dot-dot": str(tmp_path / "sub" / ".." / "phi_lds.pt"),
           "symlink": str(tmp_path / "link.pt"), "hardlink": str(tmp_path / "hard.pt")}[spelling]
    if spelling == "symlink":
        os.symlink(path, out)
    if spelling == "hardlink":
        os.link(path, out)
    fails(capsys, tmp_path, import_fit(path, out=out), f"refusing to write {out}", "input fit file")


# ---- AR layers: an order that would run for minutes is refused when the layer is built ---------------


@pytest.mark.parametrize("kind", ["stu", "stu_t", "lds_ar"])
@pytest.mark.parametrize(
    "order, expected", [(1000, "ar_order must be <= 32"), (32, "ar_order must be < seq_len")]
)
def test_ar_order_is_bounded(kind, order, expected):
    extra = {"state_dim": 4} if kind == "lds_ar" else {}
    with pytest.raises(UserError, match=expected):
        build_layer(kind, dim=4, seq_len=32, num_filters=3, ar_order=order, **extra)


def test_ar_order_bound_through_fit(capsys, tmp_path):
    from test_adversarial_cli import CORPUS, TINY

    args = ["fit", "--config", TINY, f"--data.source={CORPUS}",
            '--model.init_args.layer_kwargs={"stu": {"ar_order": 1000}}']
    fails(capsys, tmp_path, args, "ar_order must be <= 32, got 1000")
    assert not (tmp_path / "runs").exists()


def test_filters_refuse_before_allocating():
    with pytest.raises(UserError, match="above the bound"):
        spectral_filters(MAX_SEQ_LEN, MAX_SEQ_LEN // 2)


# ---- fit / test / predict: config files are bounded reads; a stage without data is one line ----------


def big_yaml(tmp_path) -> str:
    path = tmp_path / "big.yaml"
    path.write_text("trainer: {}\n" + "#" * 2**20 + "\n")
    return str(path)


def fifo(tmp_path) -> str:
    path = tmp_path / "fifo.yaml"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize(
    "config, expected",
    [
        (lambda tmp: "/dev/zero", "is not a regular file"),
        (fifo, "is not a regular file"),
        (big_yaml, "more than a config's 1,048,576"),
    ],
    ids=["dev-zero", "fifo", "huge"],
)
@pytest.mark.parametrize("form", ["--config", "--config=", "callbacks+=", "--model"])
def test_config_reads_are_bounded(config, form, expected, capsys, tmp_path):
    """/dev/zero was read until memory ran out; a FIFO blocked forever."""
    from test_adversarial_cli import TINY

    value = config(tmp_path)
    args, label = {
        "--config": (["--config", value], "config file"),
        "--config=": ([f"--config={value}"], "config file"),
        "callbacks+=": (["--config", TINY, f"--trainer.callbacks+={value}"], "--trainer.callbacks+ value"),
        "--model": (["--config", TINY, "--model", value], "--model value"),
    }[form]
    fails(capsys, tmp_path, ["fit", *args], f"{label} {value} ", expected)


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_a_stage_without_its_data_is_one_line(stage, capsys, tmp_path):
    from test_adversarial_cli import CORPUS, TINY

    err = fails(capsys, tmp_path, [stage, "--config", TINY, f"--data.source={CORPUS}"],
                f"`spectralds {stage}` needs {stage} data", f"{stage}_dataloader()", "TextDataModule")
    assert "LanguageModel" in err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--model.init_args.dim=99999999999", "dim=99999999999, num_layers=2 make at least"),
        ("--model.init_args.num_layers=99999999", "num_layers=99999999 make at least"),
        ("--model.init_args.seq_len=99999999999", f"seq_len must be <= {MAX_SEQ_LEN}"),
        ("--model.init_args.dim=0", "dim must be >= 1, got 0"),
        ("--seed_everything=99999999999999999999999", "seed_everything must be between 0 and 4294967295"),
        ("--seed_everything=-1", "seed_everything must be between 0 and 4294967295, got -1"),
    ],
    ids=["dim", "num-layers", "seq-len", "zero-dim", "seed-overflow", "negative-seed"],
)
def test_sizes_in_a_fit_config_are_bounded(override, expected, capsys, tmp_path):
    """A mistyped size was a 100 TB allocation's traceback (or memory filled layer by layer); a seed
    numpy cannot take was Lightning's traceback once the run started."""
    from test_adversarial_cli import CORPUS, TINY

    fails(capsys, tmp_path, ["fit", "--config", TINY, f"--data.source={CORPUS}", override], expected)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "name, value, expected",
    [("A", math.nan, "A holds a non-finite value"), ("C", math.inf, "C holds a non-finite value"),
     ("B", -math.inf, "B holds a non-finite value"), ("A", 1.5, "max |A| = 1.5 > 1, the system is unstable")],
)
def test_import_fit_of_non_finite_or_unstable_values(name, value, expected, capsys, tmp_path):
    tensors = abc()
    tensors[name].view(-1)[0] = value
    path = saved(tmp_path, "fit.pt", **tensors)
    fails(capsys, tmp_path, import_fit(path), str(path), expected)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("num_filters, expected", [("0", "num_filters must be >= 1"),
                                                   ("-4", "num_filters must be >= 1"),
                                                   ("99999999999", "num_filters must be <= 64")])
def test_import_fit_num_filters_bounds(num_filters, expected, capsys, tmp_path):
    args = import_fit(saved(tmp_path, "fit.pt"))
    args[args.index("--num-filters") + 1] = num_filters
    fails(capsys, tmp_path, args, expected)
