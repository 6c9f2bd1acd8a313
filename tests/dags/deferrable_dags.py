"""DAGs for ``tests/test_deferrable.py``: deferrable ``@task.ray`` tasks under a real triggerer.

Each body call appends ``start <id> <t>`` and ``end <id> <t>`` to ``$AIRFLOW_RAY_TEST_MARKERS/<dag_id>``
(a path fixed at parse time), so the test can tell which Ray bodies overlapped in time and whether a
cancelled one ever finished.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, task

MARKERS = os.environ.get("AIRFLOW_RAY_TEST_MARKERS", "/nonexistent-markers")
WIDE = 8
# The deferred bodies must outlast the time 2 slots take to submit all 8 (each task process holds a slot
# for a few seconds, more on a loaded machine), or they cannot all be running at once. The not-deferred
# DAG only has to show that no more than 2 ever run at once, so it can be short.
WIDE_SLEEP_S = float(os.environ.get("AIRFLOW_RAY_TEST_SLEEP_S", "45"))
HELD_SLEEP_S = float(os.environ.get("AIRFLOW_RAY_TEST_SLEEP_S", "15"))


def _body(marker: str, sleep_s: float):
    def body(i: int) -> dict[str, int]:
        import time
        import uuid

        call = uuid.uuid4().hex[:8]
        with open(marker, "a") as f:
            f.write(f"start {call} {time.time():.2f}\n")
        print(f"item {i} sleeping {sleep_s}s")
        time.sleep(sleep_s)
        with open(marker, "a") as f:
            f.write(f"end {call} {time.time():.2f}\n")
        return {"square": i * i, "item": i}

    return body


def _wide(dag_id: str, deferrable: bool, sleep_s: float):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         tags=["ray", "test"])
    def wide():
        run = task.ray(_body(os.path.join(MARKERS, dag_id), sleep_s), task_id="body", num_cpus=0.25,
                       deferrable=deferrable)

        @task
        def total(items: list[dict[str, int]]) -> int:
            squares = [item["square"] for item in items]
            expected = sum(i * i for i in range(WIDE))
            if sum(squares) != expected:
                raise ValueError(f"expected {expected}, got {sorted(squares)}")
            return sum(squares)

        total(run.expand(i=list(range(WIDE))))

    return wide()


def _long(dag_id: str, sleep_s: float):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         tags=["ray", "test"])
    def long():
        out = task.ray(_body(os.path.join(MARKERS, dag_id), sleep_s), task_id="body", num_cpus=0.25,
                       deferrable=True, multiple_outputs=True, checkpoint=True)(3)

        @task
        def check(square: int) -> int:  # one key of the multiple_outputs dict
            if square != 9:
                raise ValueError(f"expected 9, got {square!r}")
            return square

        check(out["square"])

    return long()


_wide("ray_deferrable_wide", deferrable=True, sleep_s=WIDE_SLEEP_S)
_wide("ray_not_deferrable_wide", deferrable=False, sleep_s=HELD_SLEEP_S)
_long("ray_deferrable_triggerer_restart", 40.0)  # its triggerer is killed and replaced while it waits
_long("ray_deferrable_mark_failed", 300.0)  # marked failed while deferred: its Ray task must be cancelled



@dag(dag_id="ray_deferred_failure", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, tags=["ray", "test"])
def deferred_failure():
    """The same failing body, deferred and not: both tasks must fail with the same error."""

    def boom(n: int) -> int:
        raise ValueError(f"boom {n}")

    task.ray(boom, task_id="deferred", num_cpus=0.25, deferrable=True)(7)
    task.ray(boom, task_id="held", num_cpus=0.25, deferrable=False)(7)


deferred_failure_dag = deferred_failure()
