"""lm-eval's own command line with the "spectralds" model registered.

lm-eval 0.4.13 finds models only in its registry (it reads no entry points and --include_path loads
task YAMLs, not Python), so its `lm_eval` script cannot see our backend; this wrapper imports it, then
hands over to lm-eval's CLI unchanged:

    python -m spectralds.evaluation.lm_eval_cli run --model spectralds --model_args ckpt=lds.ckpt \
        --tasks hellaswag --num_fewshot 0 --batch_size 8
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    import spectralds.evaluation.lm_eval_backend  # noqa: F401 (registers "spectralds")

    if argv is not None:
        sys.argv = ["lm-eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
