"""Names users imported before the 0.2 re-layout still import from their old paths, with a warning."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from airflow.exceptions import AirflowProviderDeprecationWarning

from tests.support import ROOT

MOVED = [
    ("airflow_ray_provider.decorators", "ray_task", "airflow_ray_provider.decorators.ray"),
    ("airflow_ray_provider.decorators", "RayDecoratedOperator", "airflow_ray_provider.decorators.ray"),
    ("airflow_ray_provider.hooks", "RayHook", "airflow_ray_provider.hooks.ray"),
    ("airflow_ray_provider.results", "load_result", "airflow_ray_provider.xcom.results"),
    ("airflow_ray_provider.results", "latest_successful_run", "airflow_ray_provider.xcom.results"),
    ("airflow_ray_provider.results", "ResultNotFound", "airflow_ray_provider.exceptions"),
    ("airflow_ray_provider.checkpoint", "current", "airflow_ray_provider.cluster.checkpoint"),
    ("airflow_ray_provider.checkpoint", "TaskCheckpoint", "airflow_ray_provider.cluster.checkpoint"),
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED, ids=lambda v: v.rsplit(".", 1)[-1])
def test_a_moved_name_imports_from_its_old_path_and_says_where_it_went(old: str, name: str, new: str) -> None:
    with pytest.warns(AirflowProviderDeprecationWarning, match=rf"^{old}\.{name} moved to {new}\.{name}; "):
        found = getattr(importlib.import_module(old), name)
    assert found is getattr(importlib.import_module(new), name)


def test_an_unknown_name_is_still_an_import_error() -> None:
    with pytest.raises(ImportError, match="cannot import name 'no_such_thing'"):
        exec("from airflow_ray_provider.decorators import no_such_thing", {})


def test_a_dag_file_of_the_earlier_layout_parses() -> None:
    """The report's DAG: ``from airflow_ray_provider.decorators import ray_task`` and ``@ray_task``."""
    dag_file = '''
from airflow.sdk import dag
from airflow_ray_provider.decorators import ray_task

@dag(schedule=None)
def old_layout():
    @ray_task(num_cpus=1)
    def f() -> int:
        return 1
    f()

old_layout()
'''
    probe = (f"import warnings\nwarnings.simplefilter('always')\n{dag_file}\n"
             "print('tasks', [t.task_id for t in old_layout().tasks])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tasks ['f']" in done.stdout
    assert "airflow_ray_provider.decorators.ray_task moved to airflow_ray_provider.decorators.ray.ray_task" \
        in done.stdout + done.stderr  # Airflow's logging routes warnings to stdout
