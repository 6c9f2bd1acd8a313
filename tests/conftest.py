"""Real Airflow (SQLite metadata DB in a temp ``AIRFLOW_HOME``) and a real Ray head per session.

The environment is set here, before anything imports Airflow, so every test and
every subprocess it starts sees the same isolated Airflow home.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
_HOME = Path(tempfile.mkdtemp(prefix="airflow-ray-tests-"))
os.environ.update(
    AIRFLOW_HOME=str(_HOME),
    AIRFLOW__CORE__LOAD_EXAMPLES="False",
    AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "tests" / "dags"),
    AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{_HOME}/airflow.db",
    AIRFLOW__CORE__UNIT_TEST_MODE="False",
    RAY_USAGE_STATS_ENABLED="0",
    # Tests run the XCom gc themselves; test_xcom_backend turns the background one on where it tests it.
    AIRFLOW__RAY__XCOM_GC_INTERVAL="-1",
)
os.environ.pop("AIRFLOW_CONN_RAY_DEFAULT", None)


def pytest_configure(config: pytest.Config) -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy(), timeout=300)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A Ray head for the whole session (4 logical CPUs so a few tasks run at once on 2 cores).

    Started with the provider's own launcher under a separate home, then reached
    through an explicit ``host:port`` connection, as users of a shared cluster do.
    """
    from airflow_ray_provider.local_cluster import LocalRayCluster

    cluster = LocalRayCluster(_HOME / "session-ray", num_cpus=4, resources={"session_head": 1})
    state = cluster.ensure_running()
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps(
        {"conn_type": "ray", "extra": {"address": state.address, "namespace": "tests"}}
    )
    try:
        yield state.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch):
    """Define an Airflow connection through the environment for one test."""

    def _define(conn_id: str, **fields: Any) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "ray", **fields}))
        return conn_id

    return _define


def ti_states(dag_run: Any) -> dict[tuple[str, int], str | None]:
    """``{(task_id, map_index): state}`` for a finished ``dag.test()`` run."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(
            select(TaskInstance.task_id, TaskInstance.map_index, TaskInstance.state).where(
                TaskInstance.dag_id == dag_run.dag_id, TaskInstance.run_id == dag_run.run_id
            )
        ).all()
    return {(t, m): (str(s.value) if hasattr(s, "value") else s) for t, m, s in rows}


def xcom_value(dag_run: Any, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    """The stored XCom of a finished run, as the default backend wrote it (JSON)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.execute(
            select(XComModel.value).where(
                XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id, XComModel.key == key, XComModel.map_index == map_index,
            )
        ).scalar_one()
    return XComModel.deserialize_value(type("R", (), {"value": value})())
