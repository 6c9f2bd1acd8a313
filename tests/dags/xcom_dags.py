"""DAGs exercised by tests/integration/xcom/test_backend.py; run with the Ray XCom backend enabled."""

from __future__ import annotations

import datetime
import os

import pendulum
from airflow.sdk import dag, task

START = pendulum.datetime(2026, 1, 1, tz="UTC")


@dag(dag_id="xcom_handoff", schedule=None, start_date=START, params={"mb": 1})
def xcom_handoff():
    """A large array from Ray to Ray (by reference), then to a plain task (by value)."""

    @task.ray
    def produce(params: dict) -> object:
        import numpy as np

        return np.arange(params["mb"] * 1024 * 1024 // 8, dtype=np.float64)

    @task.ray
    def consume(arr: object) -> dict:
        import os

        import numpy as np

        assert isinstance(arr, np.ndarray), type(arr)
        # A zero-copy read from the shared-memory store is read-only.
        return {"sum": float(arr.sum()), "n": int(arr.size), "writeable": bool(arr.flags.writeable),
                "pid": os.getpid()}

    @task
    def plain(arr: object, stats: dict) -> dict:
        import numpy as np

        assert isinstance(arr, np.ndarray), type(arr)
        assert float(arr.sum()) == stats["sum"]
        return {"n": int(arr.size), "sum": stats["sum"]}

    arr = produce()
    plain(arr, consume(arr))


@dag(dag_id="xcom_ray_only", schedule=None, start_date=START, params={"mb": 1})
def xcom_ray_only():
    """Ray to Ray only: the Airflow process should never hold the array."""

    @task.ray
    def produce(params: dict) -> object:
        import numpy as np

        return np.ones(params["mb"] * 1024 * 1024 // 8, dtype=np.float64)

    @task.ray
    def consume(arr: object) -> float:
        return float(arr.sum())

    consume(produce())


@dag(dag_id="xcom_shapes", schedule=None, start_date=START)
def xcom_shapes():
    """multiple_outputs, a Ray list mapped over by Ray and plain tasks, a mapped Ray task read whole."""

    @task.ray(multiple_outputs=True)
    def split() -> dict:
        import pandas as pd

        return {"frame": pd.DataFrame({"a": range(5), "b": list("vwxyz")}), "count": 5}

    @task.ray
    def items() -> list[int]:
        return [10, 20, 30]

    @task.ray
    def double(x: int) -> int:
        return 2 * x

    @task
    def plus_one(x: int) -> int:
        return x + 1

    @task.ray
    def total(doubled: list[int], plussed: list[int], frame: object, count: int) -> dict:
        return {"doubled": list(doubled), "plussed": list(plussed), "rows": len(frame), "count": count}

    @task
    def check(frame: object, everything: dict) -> str:
        return f"{type(frame).__name__}:{len(frame)}:{sorted(everything)}"

    parts = split()
    values = items()
    result = total(double.expand(x=values), plus_one.expand(x=values), parts["frame"], parts["count"])
    check(parts["frame"], parts)
    return result


@dag(dag_id="xcom_plain_large", schedule=None, start_date=START, params={"n": 10})
def xcom_plain_large():
    """A plain task's value above the threshold goes to Ray; small ones stay in the DB."""

    @task
    def big(params: dict) -> list[int]:
        return list(range(params["n"]))

    @task
    def small() -> int:
        return 42

    @task.ray
    def ray_len(values: list[int], x: int) -> int:
        return len(values) + x

    @task
    def plain_len(values: list[int]) -> int:
        return len(values)

    values = big()
    ray_len(values, small())
    plain_len(values)


@dag(dag_id="xcom_lifecycle", schedule=None, start_date=START, params={"mb": 8})
def xcom_lifecycle():
    @task.ray
    def blob(params: dict) -> bytes:
        return os.urandom(params["mb"] * 1024 * 1024)

    @task.ray
    def size(data: bytes) -> int:
        return len(data)

    size(blob())


@dag(dag_id="xcom_retry_purge", schedule=None, start_date=START)
def xcom_retry_purge():
    """Try 1 pushes a large XCom (into Ray) and fails; Airflow clears it before try 2, which purges it."""

    @task(retries=1, retry_delay=datetime.timedelta(0))
    def flaky(ti=None) -> int:
        ti.xcom_push("partial", list(range(5000)))
        if ti.try_number == 1:
            raise RuntimeError("first try fails after pushing")
        return ti.try_number

    flaky()


@dag(dag_id="xcom_lost", schedule=None, start_date=START)
def xcom_lost():
    @task.ray
    def produce() -> list[int]:
        return [1, 2, 3]

    @task.ray
    def ray_consumer(values: list[int]) -> int:
        return sum(values)

    @task
    def plain_consumer(values: list[int]) -> int:
        return sum(values)

    @task
    def forget(run_id: str) -> int:
        """Drop produce's object from its owner, as a cluster restart would."""
        import ray

        from airflow_ray_provider.cluster.owner import get_owner
        from airflow_ray_provider.hooks.ray import RayHook

        hook = RayHook()
        hook.get_conn()
        owner = get_owner(hook.settings.namespace, 0)
        keys = [k for k in ray.get(owner.keys.remote()) if k.startswith(f"xcom_lost/{run_id}/produce/")]
        return ray.get(owner.release.remote(keys))

    values = produce()
    gone = forget()
    values >> gone
    gone >> [ray_consumer(values), plain_consumer(values)]


for factory in (xcom_handoff, xcom_ray_only, xcom_shapes, xcom_plain_large, xcom_lifecycle, xcom_retry_purge,
                xcom_lost):
    globals()[f"{factory.__name__}_dag"] = factory()
