"""The example DAG files parse, and the HIGGS example refuses data of another layout before training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.examples import EXAMPLES, import_example


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_dag_files_import_cleanly(path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors, bag.import_errors
    assert bag.dags


def test_higgs_loader_refuses_files_of_another_layout(tmp_path: Path) -> None:
    """A header row, the wrong number of columns or a missing file fail fast, naming the file."""
    higgs = import_example("example_ray_xgboost_higgs")
    bad = tmp_path / "with_header.csv"
    bad.write_text("label," + ",".join(higgs.COLUMNS[1:]) + "\n" + "1," + ",".join(["0.5"] * 28) + "\n")
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("1,0.5,0.25\n")
    missing = tmp_path / "missing.csv"
    for path, message in ((bad, f"HIGGS data at {str(bad)!r} has non-numeric values"),
                          (narrow, f"HIGGS data at {str(narrow)!r} has 3 columns; expected 29"),
                          (missing, f"Cannot read HIGGS data at {str(missing)!r}")):
        with pytest.raises(ValueError, match=re.escape(message)):
            higgs.check_higgs_layout(str(path))
