"""Names that moved in the 0.2 re-layout keep working from their old import paths, with a warning.

A provider is upgraded under running DAGs: a DAG file that imports a name from where an earlier release
kept it must still parse. Each old path resolves the name lazily (PEP 562 ``__getattr__``), so importing
the old module costs nothing until the name is used, and the warning names the new path. CHANGELOG.md
lists the moves; they are removed no earlier than 1.0.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from airflow.exceptions import AirflowProviderDeprecationWarning


def moved_names(old_module: str, new_homes: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module`` that serves each name of ``new_homes`` from its new module."""

    def __getattr__(name: str) -> Any:
        if name not in new_homes:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        new_module = new_homes[name]
        warnings.warn(f"{old_module}.{name} moved to {new_module}.{name}; import it from there "
                      f"(the old path will be removed in 1.0)", AirflowProviderDeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new_module), name)

    return __getattr__
