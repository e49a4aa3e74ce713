"""`spectralds eval --shared-context N` reaches the backend's `shared_context` (default: the backend's own),
and a bad N fails closed: exit status 2, one error line naming it, no traceback, no file changed."""

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
from cli_helpers import one_line_error  # noqa: E402

from spectralds.errors import UserError  # noqa: E402
from spectralds.evaluation import run  # noqa: E402
from spectralds.evaluation.lm_eval_backend import SHARED_CONTEXT  # noqa: E402

TASKS_DIR = str(Path(__file__).parents[2] / "spectralds" / "evaluation" / "tasks")

pytestmark = pytest.mark.usefixtures("cli_env")


def sha256s(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def backend_args(monkeypatch, tmp_path):
    """The keyword arguments each backend is built with; the run stops there (a UserError)."""
    seen = []

    def spy(model, **kwargs):
        seen.append(kwargs)
        raise UserError("stopped after building the backend's arguments")

    monkeypatch.setattr(run, "_backend", spy)
    (tmp_path / "m.ckpt").write_bytes(b"not read: the spy stops first")
    return seen


def eval_args(*extra: str) -> list[str]:
    return ["eval", "--ckpt", "m.ckpt", "--tasks", "spectralds_mc", "--include-path", TASKS_DIR, *extra]


@pytest.mark.parametrize("given, expected", [((), SHARED_CONTEXT), (("--shared-context", "0"), 0),
                                             (("--shared-context", "64"), 64)])
def test_the_flag_reaches_the_backend(capsys, backend_args, given, expected):
    err = one_line_error(capsys, eval_args(*given))
    assert "stopped after building" in err
    assert [kwargs["shared_context"] for kwargs in backend_args] == [expected]


@pytest.mark.parametrize("value, expected", [("-1", "shared_context must be >= 0, got -1"),
                                             ("two", "shared-context")])
def test_a_bad_value_fails_closed(capsys, tmp_path, backend_args, value, expected):
    before = sha256s(tmp_path)
    err = one_line_error(capsys, eval_args("--shared-context", value))
    assert expected in err, err
    assert backend_args == []  # refused before any backend
    assert sha256s(tmp_path) == before


def test_the_library_default_is_the_backends():
    from spectralds.cli_eval import EVAL_DEFAULTS

    assert EVAL_DEFAULTS["shared_context"] == SHARED_CONTEXT
