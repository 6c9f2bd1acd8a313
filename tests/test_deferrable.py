"""Deferrable ``@task.ray`` under the real scheduler (LocalExecutor, 2 slots) and a real triggerer.

- 8 mapped deferrable Ray tasks of 45 s on 2 worker slots all run in Ray at once (their bodies
  overlap in time), while the same DAG not deferred (15 s bodies) runs them at most two at a time;
- the triggerer is SIGKILLed while a task is deferred and a new one started: the task still
  completes with the right value (nothing deferred is lost);
- a deferred task marked failed through the REST API has its Ray task cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import time
from pathlib import Path

import psutil
import pytest

from scripts.local_topology import Airflow, TopologyError
from tests.dag_runs import BACKEND

DAG_FILE = Path(__file__).resolve().parent / "dags" / "deferrable_dags.py"
WIDE, NOT_DEFERRED = "ray_deferrable_wide", "ray_not_deferrable_wide"
RESTART, MARK_FAILED = "ray_deferrable_triggerer_restart", "ray_deferrable_mark_failed"


def _intervals(marker: Path) -> list[tuple[float, float]]:
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for line in filter(None, marker.read_text().split("\n") if marker.exists() else []):
        what, call, at = line.split()
        (starts if what == "start" else ends)[call] = float(at)
    return [(starts[c], ends.get(c, float("inf"))) for c in starts]


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = best = 0
    for _, step in events:
        running += step
        best = max(best, running)
    return best


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


def _watcher_started_after(when: float) -> bool:
    """A trigger has started running in the new triggerer: it started its connection's watcher subprocess."""
    for proc in psutil.process_iter(["cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "airflow_ray_provider.triggers.watcher" in cmdline and proc.info["create_time"] >= when:
            return True
    return False


def test_deferrable_tasks_free_slots_survive_a_triggerer_restart_and_cancel_when_failed(
        tmp_path: Path, ray_cluster: str) -> None:
    dags, markers = tmp_path / "dags", tmp_path / "markers"
    dags.mkdir()
    markers.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    airflow = Airflow(home=tmp_path / "airflow-home", dags=dags, db_url=f"sqlite:///{tmp_path / 'airflow.db'}",
                      extra_env={"AIRFLOW_RAY_TEST_MARKERS": str(markers), "AIRFLOW__CORE__PARALLELISM": "2",
                                 "AIRFLOW__CORE__XCOM_BACKEND": BACKEND,
                                 "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10"})
    airflow.migrate()
    api = airflow.api
    try:
        airflow.start(triggerer=True)
        for dag_id in (WIDE, NOT_DEFERRED, RESTART, MARK_FAILED):
            airflow.wait(f"DAG {dag_id} to be parsed", lambda d=dag_id: api.has_dag(d), 150)

        def run_wide(dag_id: str) -> tuple[float, list[tuple[float, float]]]:
            started = time.monotonic()
            run = api.trigger(dag_id)
            state = airflow.wait(f"run of {dag_id}", lambda: api.run_state(dag_id, run), 600)
            assert state == "success", f"{state}\n\n{airflow.diagnostics()}"
            return time.monotonic() - started, _intervals(markers / dag_id)

        # 1. Two slots, eight deferred Ray tasks: all eight run in Ray at once.
        deferred_s, wide = run_wide(WIDE)
        assert len(wide) == 8 and _max_overlap(wide) == 8, f"{wide}\n\n{airflow.diagnostics()}"
        # 2. The same DAG not deferred: each task holds a slot while Ray works, so at most two at once.
        held_s, held = run_wide(NOT_DEFERRED)
        assert len(held) == 8 and _max_overlap(held) <= 2, f"{held}\n\n{airflow.diagnostics()}"
        print(f"\n8 Ray tasks on 2 slots: deferrable (45 s bodies) {deferred_s:.1f}s, not deferrable (15 s bodies) "
              f"{held_s:.1f}s")

        # 3. Kill the triggerer while the task is deferred; a new one takes the trigger over.
        runs = {d: api.trigger(d) for d in (RESTART, MARK_FAILED)}
        for dag_id, run_id in runs.items():
            airflow.wait(f"{dag_id} to defer", lambda d=dag_id, r=run_id: _ti_state(api, d, r, "body") == "deferred",
                         180, interval=1.0)
        db = tmp_path / "airflow.db"
        def assigned() -> dict[str, int | None] | None:
            ids = _triggerer_ids(db, tuple(runs))
            return ids if len(ids) == 2 and all(ids.values()) else None

        before = airflow.wait("both triggers to be assigned to the triggerer", assigned, 60)
        (old,) = [c for c in airflow.components if c.name == "triggerer"]
        os.killpg(old.proc.pid, signal.SIGKILL)
        old.proc.wait(timeout=30)
        airflow.components.remove(old)  # its death is the point, not a failure of the deployment
        restarted = time.time()
        airflow.start_triggerer("triggerer-2")
        # Until the new triggerer runs them (after TRIGGERER_HEALTH_CHECK_THRESHOLD), no trigger watches
        # either run; a task marked failed in that gap is cancelled only by its lease (README).
        airflow.wait("the new triggerer to take both triggers over", lambda: (
            (ids := assigned()) and not set(ids.values()) & set(before.values())), 180)
        airflow.wait("a trigger to run in the new triggerer (its watcher started)",
                     lambda: _watcher_started_after(restarted), 180)

        # 4. Mark the other deferred task failed: its Ray task is cancelled.
        api.ok("PATCH", f"/api/v2/dags/{MARK_FAILED}/dagRuns/{runs[MARK_FAILED]}/taskInstances/body",
               {"new_state": "failed"})
        airflow.wait("the marked-failed task's Ray task to be cancelled",
                     lambda: _owner_state(MARK_FAILED) == "cancelled", 120, interval=2.0)

        state = airflow.wait(f"run of {RESTART}", lambda: api.run_state(RESTART, runs[RESTART]), 300)
        assert state == "success", f"{state}\n\n{airflow.diagnostics()}"
        # The body ran once: the task was not started over.
        assert len(_intervals(markers / RESTART)) == 1, f"{_intervals(markers / RESTART)}\n\n{airflow.diagnostics()}"
        row = api.ok("GET", f"/api/v2/dags/{RESTART}/dagRuns/{runs[RESTART]}/taskInstances/body/xcomEntries/square")
        assert "ray-checkpoints" in json.dumps(row), row  # Ray XCom backend, item of multiple_outputs, checkpointed
        (failed_call,) = _intervals(markers / MARK_FAILED)
        assert failed_call[1] == float("inf"), f"the cancelled body ran to its end\n\n{airflow.diagnostics()}"
        logs = "\n".join(p.read_text(errors="replace") for p in (airflow.home / "logs").rglob("*.log")
                         if f"dag_id={RESTART}" in str(p))
        assert "item 3 sleeping" in logs, f"the Ray task's output did not reach the task log:\n{logs[-4000:]}"
        print(json.dumps({"deferrable_s": round(deferred_s, 1), "not_deferrable_s": round(held_s, 1)}))
    except TopologyError as exc:
        pytest.fail(str(exc))
    finally:
        airflow.stop()



def test_a_deferred_task_fails_as_a_held_one_does(ray_cluster: str) -> None:
    """``dag.test()`` runs the trigger in line: a remote exception fails both tasks with the same error.

    Also the regression test for a hang: the in-line run's event loop closed while the watcher
    subprocess waited on its stdin, and ``dag.test()`` never returned.
    """
    from tests.dag_runs import run_py

    result, output = run_py("""
        from tests.dags import deferrable_dags
        dr = deferrable_dags.deferred_failure_dag.test()
        emit(states=task_states(dr))
    """, timeout=400)
    assert result["states"] == {"deferred": "failed", "held": "failed"}, output[-6000:]
    for task_id in ("deferred", "held"):
        assert f"Ray task ray_deferred_failure.{task_id} failed" in output, output[-6000:]
    assert output.count("ValueError: boom 7") >= 2, output[-6000:]
    assert "Deferring: the triggerer watches Ray task ray_deferred_failure.deferred" in output, output[-6000:]
