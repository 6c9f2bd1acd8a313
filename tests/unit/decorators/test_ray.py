"""``@task.ray`` options are checked when the DAG is parsed, not when it runs."""

from __future__ import annotations

import pytest
from airflow.sdk import dag, task


def test_bad_options_are_rejected_when_the_dag_is_parsed() -> None:
    with pytest.raises(ValueError, match="num_cpus must be a non-negative number"):

        @dag(dag_id="bad_options", schedule=None)
        def bad():
            @task.ray(num_cpus=-1)
            def f() -> int:
                return 1

            f()

        bad()
