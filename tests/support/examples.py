"""The example DAGs (``example_dags/``), as a user runs them: loaded from their file, with small Params."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "example_dags"


def import_example(name: str) -> ModuleType:
    """An example DAG file as a module, for its helpers."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def example_dag(dag_id: str) -> Any:
    """The DAG ``dag_id`` as the DAG processor would load it from its file (no import errors allowed)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLES / f"{dag_id}.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]
