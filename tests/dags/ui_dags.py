"""DAGs for what users see in the Airflow UI: extra links to the Ray dashboard, readable XCom rows, the Ray tab."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")
FRAME_ROWS = 1_000_000  # 16 MB: its release shows in the object store's use, which Ray reports in MiB


@dag(dag_id="ray_links", schedule=None, start_date=START)
def ray_links():
    """A mapped ``@task.ray`` task: each instance links to its own Ray task, node and worker logs."""

    @task.ray
    def work(n: int) -> int:
        import os

        print(f"links-demo stdout {n}", flush=True)
        os.write(2, f"links-demo stderr {n}\n".encode())
        return n * 10

    @task
    def total(values: list[int]) -> int:
        return sum(values)

    @task.ray(checkpoint=True)
    def frame():
        import numpy as np
        import pandas as pd

        return pd.DataFrame({"x": np.arange(FRAME_ROWS, dtype="float64"), "y": np.ones(FRAME_ROWS)})

    total(work.expand(n=[1, 2]))
    frame()


ray_links_dag = ray_links()
