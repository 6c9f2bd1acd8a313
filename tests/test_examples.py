"""The example DAGs and the README's main job, run end to end and checked by their results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_main_job_runs_the_basics_example(ray_cluster: str, tmp_path: Path) -> None:
    """``scripts/run_example.py`` (``make example``) in a fresh Airflow home, with small params."""
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")  # the script's own SQLite DB under its home
    env.pop("AIRFLOW__CORE__DAGS_FOLDER")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "run_example.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    log_file = tmp_path / "example_ray_basics.log"
    log = log_file.read_text() if log_file.exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:] + log[-5000:]
    # 4 shards x 50,000 rows; y ~ U{0..9} seeded per shard, so the sum is fixed by the seeds.
    assert "Result: 4 Ray shards produced 200000 rows; sum(y) = 900822" in proc.stdout
    assert "DAG example_ray_basics: success" in proc.stdout
    assert "[ray] shard 3: 50000 rows" in log  # worker output in the task log


@pytest.mark.parametrize("path", sorted((ROOT / "example_dags").glob("*.py")), ids=lambda p: p.name)
def test_example_dag_files_import_cleanly(path: Path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors, bag.import_errors
    assert bag.dags
