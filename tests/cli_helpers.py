"""Running `spectralds` in-process from tests (the fixture `cli_env` in conftest.py isolates each run)."""

from spectralds.cli import main


def run_cli(args: list[str]) -> int:
    """`spectralds <args>`; returns its exit status."""
    try:
        main(args)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def one_line_error(capsys, args: list[str]) -> str:
    """Run a command that must fail with exit status 2 and one `spectralds: error:` line; return it."""
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spectralds: error:") and "Traceback" not in err and "\n" not in err
    return err
