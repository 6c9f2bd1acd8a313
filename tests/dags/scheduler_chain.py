"""A ``@task.ray`` -> ``@task.ray`` (mapped) -> ``@task`` -> ``@task.ray`` chain for the scheduler test.

``tests/system/test_scheduler_postgres.py`` copies this file into a private DAGs folder and
runs it through a real scheduler (LocalExecutor, PostgreSQL). The final task returns
``(sum(i * i for i in 1..N) + OFFSET) * FACTOR``; with the defaults below that is 72.
Importing this file has no side effects beyond defining the DAG.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

DAG_ID = "ray_scheduler_chain"
N = 3
OFFSET = 10
FACTOR = 3
EXPECTED = (sum(i * i for i in range(1, N + 1)) + OFFSET) * FACTOR


def _ray_task_id() -> str:
    """The id of the Ray task running this code; fails if it is not running inside Ray."""
    import ray

    task_id = ray.get_runtime_context().get_task_id() if ray.is_initialized() else None
    if not task_id:
        raise RuntimeError("expected to run inside a Ray worker, but this is not a Ray task")
    return task_id


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["ray", "test"],
)
def ray_scheduler_chain():
    @task.ray(num_cpus=1)
    def make_numbers(n: int) -> list[int]:
        _ray_task_id()
        return list(range(1, n + 1))

    @task.ray(num_cpus=1)
    def square(x: int) -> int:
        print(f"squaring {x} in Ray task {_ray_task_id()}")
        return x * x

    @task
    def add_offset(squares: list[int], offset: int) -> int:
        values = list(squares)
        if len(values) != N:
            raise ValueError(f"expected {N} mapped results, got {values!r}")
        return sum(values) + offset

    @task.ray(num_cpus=1)
    def scale(total: int, factor: int) -> int:
        _ray_task_id()
        return total * factor

    squares = square.expand(x=make_numbers(N))
    scale(add_offset(squares, OFFSET), FACTOR)


ray_scheduler_chain()
