"""A DAG for tests/system/test_bundle_stock_ray.py: run on a head whose Python has Ray and data libraries only."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(dag_id="stock_ray", schedule=None, start_date=START, params={"n": 3_000_000})
def stock_ray():
    """Where the code ran, a large result through the Ray XCom backend, a checkpoint on S3 written
    and read by the node itself (pyarrow's S3, no s3fs), and its progress save read back."""

    @task.ray(ray_conn_id="ray_stock")
    def where() -> dict:
        import importlib.util
        import sys

        import airflow_ray_provider

        return {"provider": airflow_ray_provider.__file__, "python": sys.executable,
                **{name: importlib.util.find_spec(name) is not None for name in ("airflow", "s3fs")}}

    @task.ray(ray_conn_id="ray_stock", checkpoint=True)
    def make(params: dict):
        import numpy as np

        from airflow_ray_provider.cluster.checkpoint import current

        ckpt = current()
        ckpt.save("progress", {"step": 1})
        assert ckpt.load("progress") == {"step": 1}
        return np.arange(params["n"], dtype="float64")

    @task.ray(ray_conn_id="ray_stock")
    def total(values) -> float:
        return float(values.sum())

    where()
    total(make())


stock_ray_dag = stock_ray()
