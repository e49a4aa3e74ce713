"""spectralds.compat: every private Lightning attribute it uses still exists, and nothing else uses one."""

import importlib
import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None
from importlib.metadata import version
from pathlib import Path

import lightning as L
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from spectralds import compat

PACKAGE = Path(__file__).resolve().parents[1] / "spectralds"
# Private Lightning (and DataLoader) attributes: allowed in spectralds/compat.py only.
PRIVATE = re.compile(
    r"\btrainer\._|\bstrategy\._|_logger_connector|_index_sampler|_checkpoint_io\b|_setup_model"
    r"|_register_ddp_hooks|_parse_ckpt_path|\._trainer\b"
    r"|\bjsonargparse\._|\b(lightning|jsonargparse)[\w.]* import _"
)


@pytest.fixture(scope="module")
def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)


@pytest.mark.parametrize("path", compat.TRAINER_ATTRIBUTES)
def test_every_private_attribute_compat_uses_still_exists(trainer, path):
    obj = trainer
    for i, name in enumerate(path.split(".")):
        if not hasattr(obj, name):
            pytest.fail(
                f"Lightning {L.__version__} has no Trainer.{'.'.join(path.split('.')[: i + 1])}, which "
                f"spectralds/compat.py uses; adapt compat.py to this Lightning or pin lightning below it",
                pytrace=False,
            )
        obj = getattr(obj, name)


# Public but structural Lightning names spectralds relies on (mid-run validation, DDP re-wrap, telemetry).
PUBLIC = [
    ("the fit's validation loop", "trainer.fit_loop.epoch_loop.val_loop.run"),
    ("the Trainer's stage flags", "trainer.validating"),
    ("DDP re-wrapping", "lightning.pytorch.strategies.DDPStrategy.configure_ddp"),
    ("the throughput meter", "lightning.fabric.utilities.throughput.Throughput"),
    ("device peak FLOPs", "lightning.fabric.utilities.throughput.get_available_flops"),
]


def _resolve(trainer: L.Trainer, path: str) -> tuple[object, list[str]]:
    """The object `path` starts from (the trainer, or its longest importable module) and the rest."""
    names = path.split(".")
    if names[0] == "trainer":
        return trainer, names[1:]
    for cut in range(len(names), 0, -1):
        try:
            return importlib.import_module(".".join(names[:cut])), names[cut:]
        except ImportError:
            continue
    pytest.fail(f"cannot import any prefix of {path}", pytrace=False)


@pytest.mark.parametrize("what, path", PUBLIC, ids=[p for _, p in PUBLIC])
def test_the_public_lightning_names_spectralds_uses_exist(trainer, what, path):
    obj, rest = _resolve(trainer, path)
    for name in rest:
        if not hasattr(obj, name):
            message = f"Lightning {L.__version__} has no {path} ({what}), which spectralds uses"
            pytest.fail(message, pytrace=False)
        obj = getattr(obj, name)


def test_the_compat_functions_round_trip(trainer):
    before = compat.first_loop_iter(trainer)
    compat.set_first_loop_iter(trainer, True)
    assert compat.first_loop_iter(trainer) is True
    compat.set_first_loop_iter(trainer, before)
    assert compat.first_loop_iter(trainer) is before


@pytest.mark.parametrize("name", compat.CLI_ATTRIBUTES)
def test_every_private_lightning_cli_method_compat_uses_still_exists(name):
    from lightning.pytorch.cli import LightningCLI

    if not callable(getattr(LightningCLI, name, None)):
        pytest.fail(f"Lightning {L.__version__} has no LightningCLI.{name}, which spectralds/compat.py "
                    "uses; adapt compat.subcommand_parser or pin lightning below this version", pytrace=False)


def test_the_private_jsonargparse_context_compat_uses_exists():
    from jsonargparse import _common

    if not hasattr(_common, "parser_context"):
        pytest.fail("jsonargparse has no _common.parser_context, which spectralds/compat.py uses; adapt "
                    "compat.parse_written or pin jsonargparse below this version", pytrace=False)


def test_no_private_lightning_access_outside_compat():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "compat.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not hits, "private Lightning attributes outside spectralds/compat.py:\n" + "\n".join(hits)


@pytest.mark.skipif(tomllib is None, reason="needs tomllib (Python 3.11+)")
def test_the_installed_lightning_is_inside_the_tested_range():
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    spec = next(r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "lightning")
    assert Version(version("lightning")) in spec.specifier, (
        f"lightning {version('lightning')} is outside spectralds' tested range {spec.specifier}"
    )
    assert any(s.operator == "<" for s in spec.specifier), "lightning needs an upper bound in pyproject.toml"
