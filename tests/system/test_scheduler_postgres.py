"""End to end: a ``@task.ray`` DAG run by the real scheduler (LocalExecutor) on PostgreSQL and real Ray.

Starts ``airflow api-server``, ``airflow scheduler`` and ``airflow dag-processor`` as
subprocesses against a fresh PostgreSQL database and a private ``AIRFLOW_HOME``, triggers
``tests/dags/scheduler_chain.py`` through the REST API and checks the run's state and the
numbers that flowed ``@task.ray`` -> mapped ``@task.ray`` -> ``@task`` -> ``@task.ray``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from scripts.local_topology import Airflow, TopologyError
from tests.support import ROOT, postgres

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(900)]

DAG_FILE = ROOT / "tests" / "dags" / "scheduler_chain.py"
DAG_ID = "ray_scheduler_chain"
# (1*1 + 2*2 + 3*3 + OFFSET 10) * FACTOR 3, as computed by the DAG (N=3, OFFSET=10, FACTOR=3).
EXPECTED_SQUARES = [1, 4, 9]
EXPECTED_TOTAL = 24
EXPECTED_FINAL = 72

STARTUP_TIMEOUT_S = 150.0  # API server up and DAG parsed into the database
RUN_TIMEOUT_S = 240.0  # trigger to terminal run state


# -- the test -----------------------------------------------------------------------------------
def test_ray_dag_runs_under_scheduler_on_postgres(
    pg_database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Requested here rather than as an argument, so a missing PostgreSQL skips before Ray starts.
    request.getfixturevalue("ray_cluster")
    started = time.monotonic()
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    # The default XCom backend, explicitly (the session's environment names the Ray one): values come back
    # into Airflow and land in PostgreSQL as JSON, which the test reads there.
    airflow = Airflow(home=tmp_path / "airflow-home", dags=dags, db_url=postgres.url(pg_database),
                      extra_env={"AIRFLOW__CORE__XCOM_BACKEND": "airflow.sdk.bases.xcom.BaseXCom"})
    migrated = time.monotonic()  # pg_database is a copy of the session's migrated template
    api = airflow.api
    try:
        airflow.start()
        airflow.wait(f"DAG {DAG_ID} to be parsed", lambda: api.has_dag(DAG_ID), STARTUP_TIMEOUT_S)
        ready = time.monotonic()
        run_id = api.trigger(DAG_ID)
        state = airflow.wait(f"run {run_id} to finish", lambda: api.run_state(DAG_ID, run_id), RUN_TIMEOUT_S)
        run_seconds = time.monotonic() - ready
        diagnostics = airflow.diagnostics

        # What the scheduler recorded in PostgreSQL itself.
        ti_rows = postgres.query(
            pg_database,
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = %s AND run_id = %s",
            (DAG_ID, run_id),
        )
        ti_states = {(task, index): st for task, index, st in ti_rows}
        assert state == "success", f"run {run_id} ended {state}; task states {ti_states}\n\n{diagnostics()}"
        expected_tis = {("make_numbers", -1), ("add_offset", -1), ("scale", -1)} | {
            ("square", i) for i in range(len(EXPECTED_SQUARES))
        }
        assert ti_states == dict.fromkeys(expected_tis, "success"), f"{ti_states}\n\n{diagnostics()}"

        xcoms = {
            (task, index): value
            for task, index, value in postgres.query(
                pg_database,
                "SELECT task_id, map_index, value FROM xcom WHERE dag_id = %s AND run_id = %s AND key = %s",
                (DAG_ID, run_id, "return_value"),
            )
        }
        flowed = {
            "make_numbers": xcoms.get(("make_numbers", -1)),
            "square": [xcoms.get(("square", i)) for i in range(len(EXPECTED_SQUARES))],
            "add_offset": xcoms.get(("add_offset", -1)),
            "scale": xcoms.get(("scale", -1)),
        }
        assert flowed == {
            "make_numbers": [1, 2, 3],
            "square": EXPECTED_SQUARES,
            "add_offset": EXPECTED_TOTAL,
            "scale": EXPECTED_FINAL,
        }, f"XComs in PostgreSQL: {xcoms}\n\n{diagnostics()}"

        # And the same final value as the REST API reports it.
        entry = api.ok("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/scale/xcomEntries/return_value")
        assert entry["value"] == EXPECTED_FINAL, f"{entry}\n\n{diagnostics()}"

        print(f"\nscheduler run {run_id}: {state}; DB ready {migrated - started:.1f}s, components up and DAG "
              f"parsed {ready - migrated:.1f}s, run {run_seconds:.1f}s")
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        stopping = time.monotonic()
        survivors = airflow.stop()
        print(f"components stopped in {time.monotonic() - stopping:.1f}s; survivors: {survivors}")
