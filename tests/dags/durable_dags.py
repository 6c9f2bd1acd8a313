"""DAGs for ``tests/system/operators/test_durable.py``: a long ``@task.ray`` whose try is killed, durable and not.

The third DAG's body ends before Airflow notices the kill, so its retry finds the result held. The
fourth maps the long task over two inputs with ``multiple_outputs``: each instance re-attaches to its own
Ray task. Each call of the body appends ``start <id>`` and, if it ran to the end, ``end <id>`` to a marker
file (``$AIRFLOW_RAY_TEST_MARKERS/<dag_id>``, a path fixed when the DAG file is parsed), so the test can
count how often the body ran and whether a cancelled call ever finished. A body ends when the test says so
(``hold``), not after a fixed time; the plain task after it fails unless the value arrived right.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

MARKERS = os.environ.get("AIRFLOW_RAY_TEST_MARKERS", "/nonexistent-markers")
# benchmarks/durable_deferrable.py times bodies of a fixed length; the tests release them instead.
SLEEP_S = os.environ.get("AIRFLOW_RAY_TEST_SLEEP_S")
HOLD_BOUND_S = 900.0  # a body the test never releases ends after this (the test has failed by then)
EXPECTED = 6 * 7


def hold(dag_id: str) -> None:
    """Wait in the Ray task until the test writes ``<dag_id>.go`` (or, for the benchmark, ``SLEEP_S``)."""
    import time

    if SLEEP_S is not None:
        time.sleep(float(SLEEP_S))
        return
    go = os.path.join(MARKERS, f"{dag_id}.go")
    deadline = time.monotonic() + HOLD_BOUND_S
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.2)


def _make(dag_id: str, durable: bool):
    marker = os.path.join(MARKERS, dag_id)

    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         tags=["ray", "test"])
    def durable_dag():
        # checkpoint=True: the Ray worker writes the result durably; a re-attached try must still record it.
        @task.ray(num_cpus=0.5, durable=durable, retries=1, retry_delay=timedelta(seconds=2), checkpoint=True)
        def long_body(a: int, b: int) -> int:
            import time
            import uuid

            call = uuid.uuid4().hex[:8]
            with open(marker, "a") as f:
                f.write(f"start {call} {time.time():.6f}\n")
            hold(dag_id)
            with open(marker, "a") as f:
                f.write(f"end {call} {time.time():.6f}\n")
            print(f"body {call} done")
            return a * b

        @task
        def check(value: int) -> int:
            if value != EXPECTED:
                raise ValueError(f"expected {EXPECTED}, got {value!r}")
            return value

        check(long_body(6, 7))

    return durable_dag()


_make("ray_durable_reattach", durable=True)
_make("ray_durable_off", durable=False)
# Released right after the kill, so it ends while Airflow is still noticing the dead try (heartbeat
# timeout, a detection round, the retry delay): the retry re-attaches to the finished, held result.
_make("ray_durable_finished", durable=True)


@dag(dag_id="ray_durable_mapped", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
     tags=["ray", "test"])
def durable_mapped():
    marker = os.path.join(MARKERS, "ray_durable_mapped")

    @task.ray(num_cpus=0.5, retries=1, retry_delay=timedelta(seconds=2), multiple_outputs=True)
    def long_pair(a: int, b: int) -> dict:
        import time
        import uuid

        call = uuid.uuid4().hex[:8]
        with open(marker, "a") as f:
            f.write(f"start {call} {time.time():.6f}\n")
        hold("ray_durable_mapped")
        with open(marker, "a") as f:
            f.write(f"end {call} {time.time():.6f}\n")
        return {"product": a * b, "a": a}

    @task
    def check_all(products: list) -> list:
        if sorted(products) != [12, EXPECTED]:
            raise ValueError(f"expected [12, {EXPECTED}], got {list(products)!r}")
        return sorted(products)

    check_all(long_pair.partial(b=6).expand(a=[2, 7])["product"])


durable_mapped()
