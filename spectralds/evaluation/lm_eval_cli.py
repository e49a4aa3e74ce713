"""lm-eval's own command line with the "spectralds" model registered.

lm-eval 0.4.13 finds models only in its registry (it reads no entry points and --include_path loads
task YAMLs, not Python), so its `lm_eval` script cannot see our backend; this wrapper imports it, then
hands over to lm-eval's CLI unchanged:

    python -m spectralds.evaluation.lm_eval_cli run --model spectralds --model_args ckpt=lds.ckpt \
        --tasks hellaswag --num_fewshot 0 --batch_size 8

A problem with what was given (a missing checkpoint, say) is one line, as in `spectralds`.
"""

from __future__ import annotations

import os
import sys

from spectralds.errors import first_line, user_error_in


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import spectralds.evaluation.lm_eval_backend  # noqa: F401 (registers "spectralds")

    args = sys.argv[1:] if argv is None else list(argv)
    sys.argv = ["lm-eval", *args, *_default_device(args)]
    try:
        _check_numbers(args)
        cli_evaluate()
    except Exception as e:
        user_error = user_error_in(e)
        if user_error is None or os.environ.get("SPECTRALDS_DEBUG"):
            raise
        print(f"lm-eval: error: {first_line(user_error)}", file=sys.stderr)
        sys.exit(2)


def _check_numbers(args: list[str]) -> None:
    """--limit and --num_fewshot as `spectralds eval` takes them: lm-eval's CLI passes inf, 2.5 or -1 on
    to a traceback (or, for a negative few-shot count, to a table that says -1-shot)."""
    import argparse

    from spectralds.errors import UserError, check_int
    from spectralds.evaluation.run import check_limit

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--limit", "-L")
    parser.add_argument("--num_fewshot", "-f")
    known, _ = parser.parse_known_args(args)
    if known.limit is not None:
        try:
            limit = float(known.limit)
        except ValueError:
            raise UserError(f"--limit must be a number, got {known.limit!r}") from None
        check_limit(limit)
    if known.num_fewshot is not None:
        if not known.num_fewshot.lstrip("-").isdigit():
            raise UserError(f"--num_fewshot must be an integer, got {known.num_fewshot!r}")
        check_int("--num_fewshot", int(known.num_fewshot), minimum=0)


def _default_device(args: list[str]) -> list[str]:
    """lm-eval's CLI asks for cuda:0 when no --device is given (and our backend refuses a device the
    machine lacks): give it ours instead, cuda when available, else cpu, as `spectralds eval` does."""
    command = args[0] if args and not args[0].startswith("-") else "run"  # lm-eval inserts "run"
    named = any(a in ("--device", "--config", "-C") or a.startswith(("--device=", "--config=")) for a in args)
    if command != "run" or len(args) < 2 or named:
        return []  # another subcommand, a device given, or a config file that may name one
    from spectralds.evaluation.backend_args import resolve_device

    return ["--device", str(resolve_device(None))]


if __name__ == "__main__":
    main()
