"""End to end: a ``@task.ray`` DAG run by the real scheduler (LocalExecutor) on PostgreSQL and real Ray.

Starts ``airflow api-server``, ``airflow scheduler`` and ``airflow dag-processor`` as
subprocesses against a fresh PostgreSQL database and a private ``AIRFLOW_HOME``, triggers
``tests/dags/scheduler_chain.py`` through the REST API and checks the run's state and the
numbers that flowed ``@task.ray`` -> mapped ``@task.ray`` -> ``@task`` -> ``@task.ray``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.postgres

DAG_FILE = Path(__file__).resolve().parent / "dags" / "scheduler_chain.py"
DAG_ID = "ray_scheduler_chain"
# (1*1 + 2*2 + 3*3 + OFFSET 10) * FACTOR 3, as computed by the DAG (N=3, OFFSET=10, FACTOR=3).
EXPECTED_SQUARES = [1, 4, 9]
EXPECTED_TOTAL = 24
EXPECTED_FINAL = 72

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"
FORBIDDEN_PORTS = {6379, 8080}  # held by other services on this machine
STARTUP_TIMEOUT_S = 150.0  # API server up and DAG parsed into the database
RUN_TIMEOUT_S = 240.0  # trigger to terminal run state
LOG_TAIL_LINES = 60


# -- PostgreSQL ---------------------------------------------------------------------------------
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


def _pg_query(dbname: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = _pg_connect(dbname)
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


# -- processes ----------------------------------------------------------------------------------
@dataclass
class Component:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            text = [f"<cannot read {self.log}: {exc}>"]
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return f"===== {self.name} ({state}), last {lines} lines of {self.log} =====\n" + "\n".join(text)


def _start(name: str, args: list[str], env: dict[str, str], logs: Path, cwd: Path) -> Component:
    log = logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    return Component(name, proc, log)


def _stop_all(components: list[Component], timeout: float = 20.0) -> list[psutil.Process]:
    """SIGTERM every component's process group (and descendants that left it), then SIGKILL what remains.

    All components are signalled together so their graceful shutdowns overlap. Returns survivors (none expected).
    """
    family: list[psutil.Process] = []
    for component in components:
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(component.proc.pid)
            family += [leader, *leader.children(recursive=True)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for component in components:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(component.proc.pid, sig)  # start_new_session=True: group id == leader pid
        for member in family:
            with contextlib.suppress(psutil.Error):
                member.send_signal(sig)
        _, family = psutil.wait_procs(family, timeout=timeout / 2)
        if not family:
            break
    for component in components:
        with contextlib.suppress(subprocess.TimeoutExpired):
            component.proc.wait(timeout=5)  # reap, so no zombie is left behind
    return family


def _free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in FORBIDDEN_PORTS:
            return port


# -- REST ---------------------------------------------------------------------------------------
class Api:
    def __init__(self, base: str, diagnostics: Callable[[], str]) -> None:
        self.base = base.rstrip("/")
        self.token: str | None = None
        self.diagnostics = diagnostics  # appended to every failure

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.call(method, path, body)
        if status >= 300:
            raise AssertionError(f"{method} {path} -> HTTP {status}: {payload}\n\n{self.diagnostics()}")
        return payload


# -- the test -----------------------------------------------------------------------------------
def test_ray_dag_runs_under_scheduler_on_postgres(
    pg_database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Requested here rather than as an argument, so a missing PostgreSQL skips before Ray starts.
    request.getfixturevalue("ray_cluster")
    started = time.monotonic()

    home, dags, logs = tmp_path / "airflow-home", tmp_path / "dags", tmp_path / "component-logs"
    for folder in (home, dags, logs):
        folder.mkdir()
    shutil.copy(DAG_FILE, dags / DAG_FILE.name)
    port = _free_port()
    password = secrets.token_urlsafe(16)
    passwords_file = home / "simple_auth_manager_passwords.json"
    passwords_file.write_text(json.dumps({"tester": password}))
    from cryptography.fernet import Fernet

    env = os.environ.copy()
    assert "AIRFLOW_CONN_RAY_DEFAULT" in env, "the ray_cluster fixture should have defined ray_default"
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(dags),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{pg_database}",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__PARALLELISM="4",
        AIRFLOW__CORE__FERNET_KEY=Fernet.generate_key().decode(),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API__BASE_URL=f"http://127.0.0.1:{port}",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="tester:admin",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords_file),
    )

    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, f"airflow db migrate failed:\n{migrate.stdout[-4000:]}\n{migrate.stderr[-4000:]}"
    migrated = time.monotonic()

    components: list[Component] = []

    def diagnostics() -> str:
        parts = [c.tail() for c in components]
        for task_log in sorted((home / "logs").rglob("*.log")) if (home / "logs").exists() else []:
            lines = task_log.read_text(errors="replace").splitlines()[-30:]
            parts.append(f"===== {task_log.relative_to(home)} (last 30 lines) =====\n" + "\n".join(lines))
        return "\n\n".join(parts)

    def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            dead = [c for c in components if c.proc.poll() is not None]
            if dead:
                pytest.fail(f"{', '.join(c.name for c in dead)} exited while waiting for {what}\n\n{diagnostics()}")
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n\n{diagnostics()}")
            time.sleep(interval)

    api = Api(f"http://127.0.0.1:{port}", diagnostics)
    try:
        components.append(_start("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port),
                                                "--workers", "1"], env, logs, tmp_path))
        components.append(_start("scheduler", ["scheduler"], env, logs, tmp_path))
        components.append(_start("dag-processor", ["dag-processor"], env, logs, tmp_path))

        def api_healthy() -> bool:
            try:
                status, _ = api.call("GET", "/api/v2/monitor/health")
            except OSError:
                return False
            return status == 200

        wait_for("the API server", api_healthy, STARTUP_TIMEOUT_S)
        api.token = api.ok("POST", "/auth/token", {"username": "tester", "password": password})["access_token"]

        def parsed() -> bool:
            try:
                return api.call("GET", f"/api/v2/dags/{DAG_ID}")[0] == 200
            except OSError:
                return False

        wait_for(f"DAG {DAG_ID} to be parsed", parsed, STARTUP_TIMEOUT_S)
        ready = time.monotonic()

        dag = api.ok("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
        assert dag["is_paused"] is False, dag
        run_id = f"scheduler_chain_{secrets.token_hex(4)}"
        api.ok("POST", f"/api/v2/dags/{DAG_ID}/dagRuns", {"dag_run_id": run_id, "logical_date": None})

        def finished() -> str | None:
            try:  # a slow or failing poll is retried; the deadline still bounds the wait
                status, payload = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}")
            except OSError:
                return None
            state = payload.get("state") if status == 200 and isinstance(payload, dict) else None
            return state if state in ("success", "failed") else None

        state = wait_for(f"run {run_id} to finish", finished, RUN_TIMEOUT_S)
        run_seconds = time.monotonic() - ready

        # What the scheduler recorded in PostgreSQL itself.
        ti_rows = _pg_query(
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
            for task, index, value in _pg_query(
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

        print(f"\nscheduler run {run_id}: {state}; db migrate {migrated - started:.1f}s, components up and DAG "
              f"parsed {ready - migrated:.1f}s, run {run_seconds:.1f}s")
    finally:
        stopping = time.monotonic()
        survivors = _stop_all(components)
        print(f"components stopped in {time.monotonic() - stopping:.1f}s; survivors: {survivors}")
