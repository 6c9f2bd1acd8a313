"""Deferrable ``@task.ray`` under the real scheduler (LocalExecutor, 2 slots) and a real triggerer.

- 4 mapped deferrable Ray tasks on 2 worker slots all run in Ray at once (each body waits until all 4 have
  started, which only happens if no slot is held while Ray works), while the same DAG not deferred runs
  them at most two at a time;
- the triggerer is SIGKILLed while a task is deferred and a new one started: the task still
  completes with the right value (nothing deferred is lost);
- a deferred task marked failed through the REST API has its Ray task cancelled.

A trigger's failure modes without a scheduler (cancellation, signatures, watcher restarts) are in
tests/integration/triggers/test_ray.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from airflow_ray_provider.triggers.ray import STATE_API_READY
from scripts.local_topology import Airflow, TopologyError
from tests.support import ROOT
from tests.support.deployment import intervals, max_overlap, release, started_under
from tests.support.fixtures import sqlite_copy

DAG_FILE = ROOT / "tests" / "dags" / "deferrable_dags.py"
WIDE, NOT_DEFERRED = "ray_deferrable_wide", "ray_not_deferrable_wide"
RESTART, MARK_FAILED = "ray_deferrable_triggerer_restart", "ray_deferrable_mark_failed"
RAY_XCOM_BACKEND = "airflow_ray_provider.xcom.RayXComBackend"
# Mapped tasks per wide DAG: twice the 2 worker slots. All of them running in Ray at once shows that no slot is
# held while Ray works; 8 (the benchmark's) cost this test 8 more task processes on 2 slots, about 90 s.
ITEMS = 4


def _ti_state(api, dag_id: str, run_id: str, task_id: str) -> str | None:
    return api.ok("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}").get("state")


def _owner_state(dag_id: str) -> str | None:
    """The owner actor's state for this DAG's Ray task (the test process is a driver of the session head)."""
    from airflow_ray_provider import submission
    from airflow_ray_provider.cluster.owner import get_owner
    from airflow_ray_provider.hooks.ray import RayHook

    hook = RayHook()
    hook.get_conn()
    inventory = submission.bounded_get(get_owner(hook.settings.namespace, 0).inventory.remote(), timeout=60,
                                       what="inventory")
    states = [info["state"] for key, info in inventory.items() if key.startswith(f"{dag_id}/")]
    return states[0] if states else None


WATCHER_READY = "Ray watcher of connection 'ray_default' started"


def _trigger_log_count(home: Path, dag_ids: tuple[str, ...], text: str, triggerer: int | str = "*") -> int:
    """How many times ``text`` is in these DAGs' trigger logs (of one triggerer, by its job id, if given)."""
    return sum(path.read_text(errors="replace").count(text) for dag_id in dag_ids
               for path in (home / "logs" / f"dag_id={dag_id}").rglob(f"*.log.trigger.{triggerer}.log"))


def _triggerer_ids(db: Path, dag_ids: tuple[str, ...]) -> dict[str, int | None]:
    """Which triggerer (job id) runs each DAG's deferred ``body``, read from the metadata DB."""
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            rows = conn.execute(
                "SELECT ti.dag_id, t.triggerer_id FROM task_instance ti JOIN trigger t ON ti.trigger_id = t.id "
                f"WHERE ti.task_id = 'body' AND ti.dag_id IN ({','.join('?' * len(dag_ids))})", dag_ids).fetchall()
    except sqlite3.OperationalError:  # the scheduler holds the write lock: ask again
        return {}
    return {dag_id: triggerer for dag_id, triggerer in rows}


@pytest.mark.timeout(1200)
def test_deferrable_tasks_free_slots_survive_a_triggerer_restart_and_cancel_when_failed(
        tmp_path: Path, ray_cluster: str, migrated_sqlite: Path) -> None:
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    dags.mkdir()
    markers.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    db = tmp_path / "airflow.db"
    airflow = Airflow(home=tmp_path / "airflow-home", dags=dags, db_url=sqlite_copy(migrated_sqlite, db),
                      extra_env={"AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW_RAY_TEST_WIDE": str(ITEMS),
                                 "AIRFLOW__CORE__PARALLELISM": "2",
                                 "AIRFLOW__CORE__XCOM_BACKEND": RAY_XCOM_BACKEND,
                                 "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10"})
    api = airflow.api
    try:
        airflow.start(triggerer=True)
        for dag_id in (WIDE, NOT_DEFERRED, RESTART, MARK_FAILED):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: api.has_dag(d), 240)

        def run_wide(dag_id: str) -> tuple[float, list[tuple[float, float]]]:
            started = time.monotonic()
            run = api.trigger(dag_id)
            state = airflow.wait(f"run of {dag_id}", lambda: api.run_state(dag_id, run), 900)
            assert state == "success", f"{state}\n\n{airflow.diagnostics()}"
            return time.monotonic() - started, intervals(markers / dag_id)

        # 1. Two slots, four deferred Ray tasks: all four run in Ray at once.
        deferred_s, wide = run_wide(WIDE)
        assert len(wide) == ITEMS and max_overlap(wide) == ITEMS, f"{wide}\n\n{airflow.diagnostics()}"
        # 2. The same DAG not deferred: each task holds a slot while Ray works, so at most two at once.
        held_s, held = run_wide(NOT_DEFERRED)
        assert len(held) == ITEMS and max_overlap(held) <= 2, f"{held}\n\n{airflow.diagnostics()}"
        print(f"\n{ITEMS} Ray tasks on 2 slots: deferrable {deferred_s:.1f}s (bodies wait for all), not deferrable "
              f"{held_s:.1f}s (2 s bodies)")

        # 3. Kill the triggerer while the task is deferred; a new one takes the trigger over.
        runs = {d: api.trigger(d) for d in (RESTART, MARK_FAILED)}
        for dag_id, run_id in runs.items():
            airflow.wait(f"{dag_id} to defer", lambda d=dag_id, r=run_id: _ti_state(api, d, r, "body") == "deferred",
                         300, interval=1.0)

        def assigned() -> dict[str, int | None] | None:
            ids = _triggerer_ids(db, tuple(runs))
            return ids if len(ids) == 2 and all(ids.values()) else None

        before = airflow.wait("both triggers to be assigned to the triggerer", assigned, 120)
        (old,) = [c for c in airflow.components if c.name == "triggerer"]
        os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(timeout=30)
        airflow.components.remove(old)  # its death is the point, not a failure of the deployment
        restarted = time.time()
        new = airflow.start_triggerer("triggerer-2")
        # Until the new triggerer runs them (after TRIGGERER_HEALTH_CHECK_THRESHOLD), no trigger watches
        # either run; a task marked failed in that gap is cancelled only by its lease (README).
        after = airflow.wait("the new triggerer to take both triggers over", lambda: (
            (ids := assigned()) and not set(ids.values()) & set(before.values()) and ids), 300)
        airflow.wait("a trigger to run in the new triggerer (its watcher started)",
                     lambda: started_under(new, "airflow_ray_provider.triggers.watcher", restarted), 300)
        # ...and connected: until then the new triggerer is busy starting it, and on_kill's read of the task's
        # state can run out (seen once: the cancel was then left to the run's lease, 180 s).
        (new_id,) = set(after.values())
        airflow.wait("the new triggerer's watcher to be connected", lambda: _trigger_log_count(
            airflow.home, (RESTART, MARK_FAILED), WATCHER_READY, new_id) > 0, 300)
        # ...and its execution API built (a new triggerer builds it on a trigger's first Task SDK call: 10 s of
        # a loaded machine, which on_kill's state read then waited through; CI once ran out of its 20 s).
        airflow.wait("the new triggerer's task state API to be ready", lambda: _trigger_log_count(
            airflow.home, (RESTART, MARK_FAILED), STATE_API_READY, new_id) > 0, 300)

        # 4. Mark the other deferred task failed: its Ray task is cancelled.
        api.ok("PATCH", f"/api/v2/dags/{MARK_FAILED}/dagRuns/{runs[MARK_FAILED]}/taskInstances/body",
               {"new_state": "failed"})
        airflow.wait("the marked-failed task's Ray task to be cancelled",
                     lambda: _owner_state(MARK_FAILED) == "cancelled", 180, interval=2.0)
        # By on_kill, not by the run's lease running out (which also ends in "cancelled").
        assert _trigger_log_count(airflow.home, (MARK_FAILED,), "Cancelling Ray run") == 1, airflow.diagnostics()

        release(markers, RESTART)  # watched by the new triggerer now: let its body end
        state = airflow.wait(f"run of {RESTART}", lambda: api.run_state(RESTART, runs[RESTART]), 300)
        assert state == "success", f"{state}\n\n{airflow.diagnostics()}"
        # The body ran once: the task was not started over.
        assert len(intervals(markers / RESTART)) == 1, f"{intervals(markers / RESTART)}\n\n{airflow.diagnostics()}"
        row = api.ok("GET", f"/api/v2/dags/{RESTART}/dagRuns/{runs[RESTART]}/taskInstances/body/xcomEntries/square")
        assert "ray-checkpoints" in json.dumps(row), row  # Ray XCom backend, item of multiple_outputs, checkpointed
        (failed_call,) = intervals(markers / MARK_FAILED)
        assert failed_call[1] == float("inf"), f"the cancelled body ran to its end\n\n{airflow.diagnostics()}"
        logs = "\n".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*.log")
                         if f"dag_id={RESTART}" in str(p))
        assert "item 3 waiting" in logs, f"the Ray task's output did not reach the task log:\n{logs[-4000:]}"
        print(json.dumps({"deferrable_s": round(deferred_s, 1), "not_deferrable_s": round(held_s, 1)}))
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        airflow.stop()
