"""DAGs for ``tests/system/triggers/test_deferrable.py``: deferrable ``@task.ray`` tasks under a real triggerer.

Each body call appends ``start <id> <t>`` and ``end <id> <t>`` to ``$AIRFLOW_RAY_TEST_MARKERS/<dag_id>``
(a path fixed at parse time), so the test can tell which Ray bodies overlapped in time and whether a
cancelled one ever finished. Bodies wait on conditions, not clocks: the deferred wide DAG's bodies wait
until all of them have started (which happens only if all run in Ray at once), the long ones until the
test writes ``<dag_id>.go``.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, task

MARKERS = os.environ.get("AIRFLOW_RAY_TEST_MARKERS", "/nonexistent-markers")
WIDE = int(os.environ.get("AIRFLOW_RAY_TEST_WIDE", "8"))  # the mapped tasks of each wide DAG
# benchmarks/durable_deferrable.py times bodies of a fixed length; the tests use conditions instead.
SLEEP_S = os.environ.get("AIRFLOW_RAY_TEST_SLEEP_S")
WAIT_BOUND_S = 600.0  # a body whose condition never comes ends after this (the test has failed by then)
HELD_BODY_S = 2.0  # the not-deferred DAG only has to show that no more than 2 ever run at once


def _wait(condition) -> None:
    import time

    deadline = time.monotonic() + WAIT_BOUND_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def _all_started(marker: str) -> bool:
    with open(marker) as f:
        return sum(line.startswith("start ") for line in f) >= WIDE


def _released(dag_id: str) -> bool:
    return os.path.exists(os.path.join(MARKERS, f"{dag_id}.go"))


def _body(dag_id: str, until: str):
    marker = os.path.join(MARKERS, dag_id)

    def body(i: int) -> dict[str, int]:
        import time
        import uuid

        call = uuid.uuid4().hex[:8]
        with open(marker, "a") as f:
            f.write(f"start {call} {time.time():.6f}\n")
        print(f"item {i} waiting ({until})")
        if SLEEP_S is not None:
            time.sleep(float(SLEEP_S))
        elif until == "all started":
            _wait(lambda: _all_started(marker))
        elif until == "released":
            _wait(lambda: _released(dag_id))
        else:
            time.sleep(HELD_BODY_S)
        with open(marker, "a") as f:
            f.write(f"end {call} {time.time():.6f}\n")
        return {"square": i * i, "item": i}

    return body


def _wide(dag_id: str, deferrable: bool, until: str):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         tags=["ray", "test"])
    def wide():
        run = task.ray(_body(dag_id, until), task_id="body", num_cpus=0.25, deferrable=deferrable)

        @task
        def total(items: list[dict[str, int]]) -> int:
            squares = [item["square"] for item in items]
            expected = sum(i * i for i in range(WIDE))
            if sum(squares) != expected:
                raise ValueError(f"expected {expected}, got {sorted(squares)}")
            return sum(squares)

        total(run.expand(i=list(range(WIDE))))

    return wide()


def _long(dag_id: str):
    @dag(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"), catchup=False,
         tags=["ray", "test"])
    def long():
        out = task.ray(_body(dag_id, "released"), task_id="body", num_cpus=0.25,
                       deferrable=True, multiple_outputs=True, checkpoint=True)(3)

        @task
        def check(square: int) -> int:  # one key of the multiple_outputs dict
            if square != 9:
                raise ValueError(f"expected 9, got {square!r}")
            return square

        check(out["square"])

    return long()


_wide("ray_deferrable_wide", deferrable=True, until="all started")
_wide("ray_not_deferrable_wide", deferrable=False, until="a short while")
_long("ray_deferrable_triggerer_restart")  # its triggerer is killed and replaced while it waits
_long("ray_deferrable_mark_failed")  # marked failed while deferred: its Ray task must be cancelled (never released)


@dag(dag_id="ray_deferred_failure", schedule=None, start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
     catchup=False, tags=["ray", "test"])
def deferred_failure():
    """The same failing body, deferred and not: both tasks must fail with the same error."""

    def boom(n: int) -> int:
        raise ValueError(f"boom {n}")

    task.ray(boom, task_id="deferred", num_cpus=0.25, deferrable=True)(7)
    task.ray(boom, task_id="held", num_cpus=0.25, deferrable=False)(7)


deferred_failure_dag = deferred_failure()
