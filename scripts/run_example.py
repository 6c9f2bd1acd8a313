"""The README's main job: run an example DAG end to end on the embedded default and print its result.

SQLite metadata DB under ``.airflow/`` and the embedded Ray head (started on first use, then kept for
later runs; ``airflow-ray local stop`` stops it). Usage: ``python scripts/run_example.py [DAG_ID]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("AIRFLOW_HOME") or ROOT / ".airflow")
DEFAULT_DAG = "example_ray_basics"
FINAL_TASK = {"example_ray_basics": "report"}


def main(dag_id: str) -> int:
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "example_dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Task results stay in Ray's object store; the metadata DB keeps references (README: XCom backend).
        "AIRFLOW__CORE__XCOM_BACKEND": os.environ.get("AIRFLOW__CORE__XCOM_BACKEND",
                                                      "airflow_ray_provider.xcom.RayXComBackend"),
    }
    HOME.mkdir(parents=True, exist_ok=True)
    airflow = [sys.executable, "-m", "airflow"]
    log_path = HOME / f"{dag_id}.log"
    print(f"Airflow home: {HOME} (SQLite); DAGs: {ROOT / 'example_dags'}")
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.run([*airflow, "dags", "test", dag_id], env=env, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    os.environ.update(env)
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_ray_provider.local_cluster import LocalRayCluster

    with create_session() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc())).first()
        state = str(getattr(run, "state", None))
        value = None
        if run is not None and dag_id in FINAL_TASK:
            value = session.scalar(select(XComModel.value).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run.run_id,
                XComModel.task_id == FINAL_TASK[dag_id], XComModel.key == "return_value"))
    head = LocalRayCluster().status()
    print(f"DAG {dag_id}: {state} in {elapsed:.1f}s (airflow dags test exit code {proc.returncode})")
    print(f"Result: {value}")
    print(f"Ray: embedded head at {head.address if head else 'not running'} (state in {HOME / 'ray'})")
    print(f"Task log: {log_path}")
    return 0 if proc.returncode == 0 and state.endswith("success") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DAG))
