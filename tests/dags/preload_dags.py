"""A plain DAG (no ``@task.ray``, nothing here imports Ray) for ``tests/system/operators/test_durable.py``:
its task reports which modules its task process started with. Under the scheduler with ``[ray] preload_modules`` on (the
default), a LocalExecutor task process is a fork of a scheduler that imported Ray, so Ray is loaded
before this file is parsed."""

from __future__ import annotations

import sys

import pendulum
from airflow.sdk import dag, task

LOADED_AT_PARSE = sorted(name for name in ("ray", "pyarrow", "airflow_ray_provider.operators.ray")
                         if name in sys.modules)


@dag(dag_id="preload_probe", schedule=None, start_date=pendulum.datetime(2025, 1, 1), catchup=False)
def preload_probe() -> None:
    @task
    def loaded() -> list[str]:
        return LOADED_AT_PARSE

    loaded()


preload_probe()
