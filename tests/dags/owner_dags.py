"""A DAG for tests/integration/cluster/test_owner.py: two Ray tasks whose owner actor never answers."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task


@dag(dag_id="wedged_owner", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"))
def wedged_owner():
    @task.ray(num_cpus=0)
    def stuck_in_submit() -> int:
        return 1

    @task.ray(num_cpus=0)
    def stuck_in_poll() -> int:
        return 2

    stuck_in_submit()
    stuck_in_poll()


wedged_owner_dag = wedged_owner()
