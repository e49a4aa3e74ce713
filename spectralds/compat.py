"""Private Lightning / jsonargparse accesses, kept in one module: each entry is a private access.

Re-check every entry when upgrading lightning (tested with 2.6; pin lightning<2.7) or jsonargparse
(tested with 4.53).
"""

from __future__ import annotations

from typing import Any


def parse_written(parser: Any, args: list[str] | None) -> Any:
    """What the config files and the command line wrote, without the parser's defaults.

    Private: `jsonargparse._common.parser_context(lenient_check=True)`. The public
    `parse_args(defaults=False)` alone fails on required arguments that only defaults supply (the
    logger's save_dir when the command line sets its name).
    """
    from jsonargparse._common import parser_context

    with parser_context(lenient_check=True):
        return parser.parse_args(args, defaults=False)
