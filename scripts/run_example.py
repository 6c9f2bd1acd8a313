"""The README's main job: run an example DAG end to end on the embedded default and print its result.

SQLite metadata DB under ``.airflow/`` and the embedded Ray head (started on first use, then kept for
later runs; ``airflow-ray local stop`` stops it). Task results stay in Ray's object store (the Ray XCom
backend) and checkpointed ones are also written under ``.airflow/ray-checkpoints``.

Usage: ``python scripts/run_example.py [DAG_ID] [--conf JSON]``; the default DAG is the HIGGS pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("AIRFLOW_HOME") or ROOT / ".airflow")
DEFAULT_DAG = "example_ray_xgboost_higgs"
# The task whose small JSON result sums the run up, and the checkpointed task worth loading afterwards.
FINAL_TASK = {"example_ray_basics": "report", "example_ray_xgboost_higgs": "report",
              "example_ray_tune_xgboost": "report", "example_ray_fault_tolerance": "verify"}
TRAINERS = {"xgboost_ray": "xgboost-ray", "ray_train": "Ray Train"}
LOADABLE_TASK = {"example_ray_xgboost_higgs": "train_xgboost_ray", "example_ray_tune_xgboost": "search",
                 "example_ray_fault_tolerance": "produce"}


def airflow_env() -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Task results stay in Ray's object store; the metadata DB keeps references (README: XCom backend).
        "AIRFLOW__CORE__XCOM_BACKEND": os.environ.get("AIRFLOW__CORE__XCOM_BACKEND",
                                                      "airflow_ray_provider.xcom.RayXComBackend"),
    }


def final_value(dag_id: str) -> tuple[str, Any]:
    """The latest run's state and its final task's JSON result, from the metadata DB."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc())).first()
        if run is None:
            return "no run", None
        value = session.scalar(select(XComModel.value).where(
            XComModel.dag_id == dag_id, XComModel.run_id == run.run_id,
            XComModel.task_id == FINAL_TASK.get(dag_id, ""), XComModel.key == "return_value"))
        return str(run.state), value


def last_run_id(dag_id: str) -> int:
    """The newest DagRun's row id (0 if none), so the watch below follows only the run started after it."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.max(DagRun.id)).where(DagRun.dag_id == dag_id)) or 0


def watch(dag_id: str, after_id: int, proc: subprocess.Popen[bytes], started: float, interval: float = 1.0) -> None:
    """Print each task's state as it changes, with the run's elapsed time, until ``proc`` (the DAG test) exits.

    Read from the metadata DB, which ``airflow dags test`` updates as it goes; a read that meets the
    writer's lock is simply retried on the next tick.
    """
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    seen: dict[str, str] = {}
    while True:
        exited = proc.poll() is not None
        try:
            with create_session() as session:
                run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.id > after_id)
                                      .order_by(DagRun.id)).first()
                rows = [] if run is None else session.execute(
                    select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state, TaskInstance.try_number)
                    .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run.run_id)
                    .order_by(TaskInstance.start_date.is_(None), TaskInstance.start_date, TaskInstance.task_id,
                              TaskInstance.map_index)).all()
                states = {} if run is None else {"DAG run": str(run.state)}
        except OperationalError:
            rows, states = [], {}
        for task_id, map_index, state, try_number in rows:
            label = task_id if map_index < 0 else f"{task_id}[{map_index}]"
            states[label] = f"{state or 'none'}" + (f" (try {try_number})" if try_number and try_number > 1 else "")
        for label, state in states.items():
            if seen.get(label) != state and not (state.startswith("none") and label not in seen):
                print(f"{time.monotonic() - started:7.1f}s  {label:<32} {state}", flush=True)
                seen[label] = state
        if exited:
            return
        time.sleep(interval)


def main(dag_id: str, conf: dict[str, Any]) -> int:
    env = airflow_env()
    HOME.mkdir(parents=True, exist_ok=True)
    airflow = [sys.executable, "-m", "airflow"]
    log_path = HOME / f"{dag_id}.log"
    print(f"Airflow home: {HOME} (SQLite); DAGs: {ROOT / 'example_dags'}", flush=True)
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    os.environ.update(env)
    after_id = last_run_id(dag_id)
    print(f"Running {dag_id} (airflow dags test; its full log goes to {log_path}):", flush=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*airflow, "dags", "test", dag_id, "--conf", json.dumps(conf)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            watch(dag_id, after_id, proc, started)
        finally:
            if proc.poll() is None:  # Ctrl-C here: stop the DAG test too
                proc.terminate()
            proc.wait()
    elapsed = time.monotonic() - started
    from airflow_ray_provider.cluster.checkpoint import safe_component
    from airflow_ray_provider.config import DEFAULT_CONN_ID
    from airflow_ray_provider.local_cluster import LocalRayCluster
    from airflow_ray_provider.storage import store_for

    state, value = final_value(dag_id)
    head = LocalRayCluster().status()
    print(f"DAG {dag_id}: {state} in {elapsed:.1f}s (airflow dags test exit code {proc.returncode})")
    if isinstance(value, dict) and "accuracy" in value:
        shown = ", ".join(f"{'skipped' if acc is None else f'{acc:.4f}'} ({TRAINERS[name]})"
                          for name, acc in value["accuracy"].items())
        print(f"Accuracy: {shown} on {value['validation_rows']} validation rows of {value['data']}")
    else:
        print(f"Result: {value}")
    store, _ = store_for(DEFAULT_CONN_ID)
    print(f"Checkpoints: {store.root.rstrip('/')}/{safe_component(dag_id)}")
    if dag_id in LOADABLE_TASK:
        print(f'Load a result in Python: from airflow_ray_provider.xcom.results import load_result; '
              f'load_result("{dag_id}", "{LOADABLE_TASK[dag_id]}")  (with AIRFLOW_HOME={HOME})')
    print(f"Ray: embedded head at {head.address if head else 'not running'} (state in {HOME / 'ray'})")
    print(f"Task log: {log_path}")
    return 0 if proc.returncode == 0 and state.endswith("success") else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dag_id", nargs="?", default=DEFAULT_DAG, choices=sorted(FINAL_TASK))
    parser.add_argument("--conf", type=json.loads, default={}, help="DAG run conf (JSON), e.g. '{\"rows\": 20000}'")
    args = parser.parse_args()
    sys.exit(main(args.dag_id, args.conf))
