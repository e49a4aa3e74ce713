"""The one check every Hugging Face export / load path makes first: transformers, in the tested range."""

from __future__ import annotations

import importlib.metadata

from spectralds.errors import UserError

# The range pyproject's `hf` extra pins and the tests run against.
TRANSFORMERS_RANGE = (5, 6)
INSTALL_HINT = "pip install 'spectralds[hf]' (or pip install 'transformers>=5,<6')"


def require_transformers() -> None:
    """Raise a one-line UserError saying how to install transformers when it is missing or out of range."""
    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise UserError(f"the Hugging Face format needs transformers, which is not installed: "
                        f"{INSTALL_HINT}") from err
    version = importlib.metadata.version("transformers")
    major = int(version.split(".")[0])
    if not TRANSFORMERS_RANGE[0] <= major < TRANSFORMERS_RANGE[1]:
        raise UserError(f"the Hugging Face format needs transformers 5.x, found {version}: {INSTALL_HINT}")
