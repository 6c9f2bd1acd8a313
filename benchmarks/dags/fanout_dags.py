"""Benchmark DAGs ``fanout_plain`` and ``fanout_ray``: ``start -> work.expand() over N -> total``.

N comes from ``$AIRFLOW_RAY_BENCH_FANOUT_N`` at parse time (benchmarks/fanout.py sets it). The two DAGs do
the same trivial work; one with ``@task``, one with ``@task.ray`` on every task.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from typing import Any

from airflow.sdk import dag, task

N = int(os.environ.get("AIRFLOW_RAY_BENCH_FANOUT_N", "100"))


def build_fanout(dag_id: str, decorator: Callable[..., Any]) -> Any:
    @dag(dag_id=dag_id, schedule=None, start_date=dt.datetime(2025, 1, 1), catchup=False, tags=["benchmark"],
         max_active_tasks=10_000)
    def fanout() -> None:
        @decorator
        def start() -> list[int]:
            return list(range(N))

        @decorator
        def work(x: int) -> int:
            return x + 1

        @decorator
        def total(values: list[int]) -> int:
            return sum(values)

        total(work.expand(x=start()))

    return fanout()


build_fanout("fanout_plain", task)
build_fanout("fanout_ray", task.ray)
