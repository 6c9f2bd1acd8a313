"""Durable ``@task.ray`` under the real scheduler: a retry after SIGKILL re-attaches to the running Ray task.

The scheduler (LocalExecutor) runs ``tests/dags/durable_dags.py``. While each DAG's Ray task runs,
the test SIGKILLs the task's process and its supervisor (the LocalExecutor worker), as a lost pod or
an OOM kill would. Airflow notices through the missing heartbeats and schedules the retry:

- durable (the default): the retry finds the record the first try left in the task state store,
  re-attaches, and the body runs once; the retry's log says it re-attached;
- ``durable=False``: the owner actor's lease (10 s here) cancels the orphaned Ray task before the
  retry starts, and the retry runs the body again.

The bodies end when the test releases them, once it has seen what it waits for (a retry re-attached, a
body started again), so a loaded machine makes the test slower, never wrong. It runs once, on PostgreSQL (a
copy of the session's migrated template) where a server is available, else on SQLite, and says which: the
durable record is kept through Airflow's task state store API, which is the same on both (until run 6 it ran
on both, 155 s and 293 CPU-s for the SQLite run alone; the scheduler on SQLite is run by
tests/system/triggers/test_deferrable.py, on PostgreSQL by tests/system/test_scheduler_postgres.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from scripts.local_topology import Airflow, TopologyError
from tests.support import ROOT, postgres
from tests.support.deployment import calls, release, task_processes, try_logs
from tests.support.fixtures import sqlite_copy

DAG_FILES = [ROOT / "tests" / "dags" / name for name in ("durable_dags.py", "preload_dags.py")]
DURABLE, NOT_DURABLE, FINISHED = "ray_durable_reattach", "ray_durable_off", "ray_durable_finished"
MAPPED = "ray_durable_mapped"  # two mapped instances with multiple_outputs
DAGS = (DURABLE, NOT_DURABLE, FINISHED, MAPPED)
LEASE_S = 10.0
HEARTBEAT_TIMEOUT_S = 15
RAY_XCOM_BACKEND = "airflow_ray_provider.xcom.RayXComBackend"


@pytest.mark.timeout(900)
def test_a_killed_try_is_reattached_to_or_started_over(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    missing = postgres.unavailable()
    if missing is None:
        database, db_url = "postgres", postgres.url(request.getfixturevalue("pg_database"))
    else:
        print(f"\nrunning on SQLite: {missing}")
        database = "sqlite"
        db_url = sqlite_copy(request.getfixturevalue("migrated_sqlite"), tmp_path / "airflow.db")
    request.getfixturevalue("ray_cluster")
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    dags.mkdir()
    markers.mkdir()
    for dag_file in DAG_FILES:
        shutil.copy(dag_file, dags / dag_file.name)
    conn = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    conn["extra"] = {**conn["extra"], "lease_timeout": LEASE_S}
    airflow = Airflow(home=tmp_path / "airflow-home", dags=dags, db_url=db_url, extra_env={
        "AIRFLOW_CONN_RAY_DEFAULT": json.dumps(conn),
        "AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW__CORE__XCOM_BACKEND": RAY_XCOM_BACKEND,
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
        "AIRFLOW__CORE__PARALLELISM": "6",  # the five long tries run at once, so one kill catches them all
    })
    api = airflow.api
    try:
        airflow.start()
        for dag_id in (*DAGS, "preload_probe"):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: api.has_dag(d), 240)
        triggered = time.monotonic()
        runs = {dag_id: api.trigger(dag_id) for dag_id in DAGS}
        airflow.wait("every body to start in Ray", lambda: all(
            len(calls(markers / d)["start"]) >= (2 if d == MAPPED else 1) for d in runs), 300, interval=0.5)
        (scheduler,) = [c for c in airflow.components if c.name == "scheduler"]
        victims = task_processes(scheduler)
        assert len(victims) >= 10, f"expected 5 task runners and their supervisors, found {victims}"
        for proc in victims:
            proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        release(markers, FINISHED)  # it ends now, while Airflow is still noticing the dead try

        home = airflow.home
        airflow.wait("the durable retry to re-attach to the running body",
                     lambda: "Re-attached to Ray task" in try_logs(home, DURABLE, "long_body", 2), 300)
        release(markers, DURABLE)
        airflow.wait("both mapped retries to re-attach", lambda: all(
            f"Re-attached to Ray task {MAPPED}.long_pair[{i}]" in try_logs(home, MAPPED, "long_pair", 2, i)
            for i in (0, 1)), 300)
        release(markers, MAPPED)
        airflow.wait("the not-durable retry to start the body again",
                     lambda: len(calls(markers / NOT_DURABLE)["start"]) >= 2, 300, interval=0.5)
        release(markers, NOT_DURABLE)
        states = {d: airflow.wait(f"run of {d} to finish", lambda d=d, r=r: api.run_state(d, r), 300)
                  for d, r in runs.items()}
        durable_calls, off_calls = calls(markers / DURABLE), calls(markers / NOT_DURABLE)
        finished_calls, mapped_calls = calls(markers / FINISHED), calls(markers / MAPPED)
        mapped_logs = [try_logs(home, MAPPED, "long_pair", 2, i) for i in (0, 1)]
        finished_log = try_logs(home, FINISHED, "long_body", 2)
        retry_log = try_logs(home, DURABLE, "long_body", 2)
        off_retry_log = try_logs(home, NOT_DURABLE, "long_body", 2)
        report = (f"states {states}; durable calls {durable_calls}; not durable calls {off_calls}; "
                  f"finished calls {finished_calls}; mapped calls {mapped_calls}\n"
                  f"durable try 2 log:\n{retry_log[-3000:]}\n\n"
                  + "".join(f"mapped [{i}] try 2 log:\n{log[-2500:]}\n\n" for i, log in enumerate(mapped_logs))
                  + airflow.diagnostics())

        assert states == dict.fromkeys(DAGS, "success"), report
        # Durable: the body ran once, to the end, and the retry said what it re-attached to.
        assert len(durable_calls["start"]) == 1 and durable_calls["end"] == durable_calls["start"], report
        assert "Re-attached to Ray task" in retry_log and "submitted by try 1" in retry_log, report
        assert "body" in retry_log and "done" in retry_log, report  # the Ray task's own output, streamed
        # Not durable: the lease cancelled the orphan (it never ended) and the retry ran the body again.
        assert len(off_calls["start"]) == 2, report
        assert len(off_calls["end"]) == 1, report
        assert "Re-attached" not in off_retry_log, report
        # The re-attached try's XCom (Ray XCom backend) names the checkpoint the Ray worker wrote.
        row = api.ok("GET", f"/api/v2/dags/{DURABLE}/dagRuns/{runs[DURABLE]}/taskInstances/long_body/"
                            "xcomEntries/return_value")
        assert "ray-checkpoints" in json.dumps(row), f"{row}\n\n{report}"
        # Finished before the retry came: its held result is taken, the body is not run again.
        assert len(finished_calls["start"]) == 1 and finished_calls["end"] == finished_calls["start"], report
        assert "Re-attached to Ray task" in finished_log, report
        # Mapped, multiple_outputs: each instance's retry re-attached to its own Ray task (check_all got both).
        assert len(mapped_calls["start"]) == 2 and mapped_calls["end"] == mapped_calls["start"], report
        for index, log in enumerate(mapped_logs):
            assert f"Re-attached to Ray task {MAPPED}.long_pair[{index}]" in log, f"map {index}:\n{log[-3000:]}"
        for line in retry_log.splitlines():
            with contextlib.suppress(ValueError):
                event = str(json.loads(line).get("event", ""))
                if "Re-attached" in event or "body" in event or "Reconnecting" in event:
                    print(f"durable try 2: {event[:300]}")
        print(f"\n{database}: killed {killed - triggered:.1f}s after trigger; runs took "
              f"{time.monotonic() - triggered:.1f}s")
        # [ray] preload_modules (on by default): a task process, a fork of the scheduler's, starts with Ray
        # loaded, even for a DAG file that never imports it. (Triggered once the killed tries are retried: a
        # LocalExecutor that starts workers while it is reaping SIGKILLed ones was seen to leave tasks queued.)
        probe = api.trigger("preload_probe")
        assert airflow.wait("preload_probe", lambda: api.run_state("preload_probe", probe), 240) == "success"
        loaded = api.ok("GET", f"/api/v2/dags/preload_probe/dagRuns/{probe}/taskInstances/loaded/xcomEntries/"
                               "return_value?deserialize=true")["value"]
        assert "ray" in json.dumps(loaded) and "airflow_ray_provider.operators.ray" in json.dumps(loaded), loaded
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        airflow.stop()
