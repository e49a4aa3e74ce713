"""Registering model_type "spectralds" with transformers' Auto classes when spectralds is imported.

`import spectralds` stays light: transformers is not imported for it. If transformers' Auto models are
already imported, the classes are registered at once; otherwise a one-shot import hook registers them
right after `transformers.models.auto.modeling_auto` is first imported. Only for the transformers
versions the `hf` extra allows (another version is left alone; the export commands name the problem).
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import sys

_AUTO_MODULE = "transformers.models.auto.modeling_auto"


def _register() -> None:
    from spectralds.interop.hf_model import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of the Auto models module, once."""

    def find_spec(self, name, path, target=None):
        if name != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            run = spec.loader.exec_module

            def exec_module(module) -> None:
                run(module)
                _register()

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    from spectralds.interop.hf_require import TRANSFORMERS_RANGE

    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return  # no transformers (or an unreadable version): nothing to register with
    if not TRANSFORMERS_RANGE[0] <= major < TRANSFORMERS_RANGE[1]:
        return
    if _AUTO_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
