"""Shared builder for the chain benchmark DAGs (a helper module, not a DAG file)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from airflow.sdk import dag

LENGTHS = (1, 10, 20)


def build_chain(dag_id: str, length: int, decorator: Callable[..., Any]) -> Any:
    """A linear chain ``t1 >> ... >> t{length}``: t1 returns 1, each next task returns x + 1."""

    @dag(dag_id=dag_id, schedule=None, start_date=dt.datetime(2025, 1, 1), catchup=False, tags=["benchmark"])
    def chain() -> None:
        @decorator(task_id="t1")
        def first() -> int:
            return 1

        @decorator
        def step(x: int) -> int:
            return x + 1

        value = first()
        for i in range(2, length + 1):
            value = step.override(task_id=f"t{i}")(value)

    return chain()
