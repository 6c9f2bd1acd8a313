"""The provider's Airflow plugin: a listener that runs ``airflow-ray upkeep`` when DAG runs finish, and
the *Ray* tab of a DAG run (the view in :mod:`airflow_ray_provider.ui.app`, mounted under ``/ray``).

Airflow does not tell XCom backends when DAG runs are deleted or age out, so the objects
behind them would stay in Ray, and checkpoints would stay in storage. The scheduler (and
``dag.test()``) reports every finished run to listeners; this one starts ``airflow-ray upkeep``
(``xcom gc`` with the Ray XCom backend, ``checkpoints prune`` with ``[ray] checkpoint_retention``
set) in a separate process, at most one at a time and at most every ``[ray] xcom_gc_interval``
seconds, so the scheduler itself never joins a Ray cluster and never waits for it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from airflow.listeners import hookimpl
from airflow.plugins_manager import AirflowPlugin

log = logging.getLogger(__name__)



class _GcTrigger:
    """Starts ``airflow-ray xcom gc`` in the background, rate-limited."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def _enabled() -> float | None:
        from airflow_ray_provider.config import checkpoint_retention, xcom_gc_interval

        if not ray_xcom_backend_configured() and checkpoint_retention() < 0:
            return None
        interval = xcom_gc_interval()
        return None if interval < 0 else interval

    def maybe_start(self) -> bool:
        interval = self._enabled()
        if interval is None:
            return False
        with self._lock:
            now = time.monotonic()
            if self._proc is not None and self._proc.poll() is None:
                return False  # one gc at a time
            if self._last is not None and now - self._last < interval:
                return False
            self._last = now
            from airflow_ray_provider.config import xcom_conn_id

            conn_id = xcom_conn_id()
            log_path = os.path.join(os.environ.get("AIRFLOW_HOME", "."), "airflow-ray-upkeep.log")
            with open(log_path, "ab") as out:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "airflow_ray_provider.cli", "upkeep", "--conn-id", conn_id],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
            log.info("Started airflow-ray upkeep (pid %s, log %s)", self._proc.pid, log_path)
            return True


def ray_xcom_backend_configured() -> bool:
    from airflow.configuration import conf

    from airflow_ray_provider.xcom.backend import RayXComBackend

    try:
        backend = conf.getimport("core", "xcom_backend")
    except Exception:  # noqa: BLE001 - a broken setting is reported by Airflow itself
        return False
    return isinstance(backend, type) and issubclass(backend, RayXComBackend)


# What a ``@task.ray`` task process imports before it submits: Ray itself, the operator, and pyarrow,
# which Ray's serializer imports on a process's first ``ray.put`` where it is installed.
PRELOADED = ("ray", "airflow_ray_provider.operators.ray", "pyarrow")


def preload_for_task_processes(component: Any) -> list[str]:
    """Import :data:`PRELOADED` in the scheduler, whose forks (LocalExecutor's workers, then each task
    process, a fork of those) then start with them loaded: about 0.7 s less per ``@task.ray`` task process
    (benchmarks/fanout.py). Importing Ray starts no thread and connects nowhere, so forking stays safe.
    Other components (a Celery worker, a Kubernetes pod) start task processes otherwise; nothing is done.
    """
    from airflow_ray_provider.config import preload_modules

    if not _is_scheduler(component) or not preload_modules():
        return []
    import importlib

    loaded = []
    for name in PRELOADED:
        try:
            importlib.import_module(name)
            loaded.append(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module must not stop the scheduler
            log.debug("Not preloading %s: %s: %s", name, type(exc).__name__, exc)
    log.info("Preloaded %s for task processes forked from this scheduler", ", ".join(loaded))
    return loaded


def _is_scheduler(component: Any) -> bool:
    """Whether ``on_starting``'s component is the scheduler's job. Airflow calls the hook from ``Job()`` before
    the scheduler's runner sets its ``job_type``, so an untyped job counts when this process is ``airflow
    scheduler``."""
    if type(component).__name__ != "Job":
        return False
    job_type = getattr(component, "job_type", None)
    return job_type == "SchedulerJob" or (job_type is None and sys.argv[1:2] == ["scheduler"])


class _DagRunListener:
    def __init__(self) -> None:
        self.trigger = _GcTrigger()

    @hookimpl
    def on_starting(self, component: Any) -> None:
        preload_for_task_processes(component)

    @hookimpl
    def on_dag_run_success(self, dag_run: Any, msg: str) -> None:
        self.trigger.maybe_start()

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        self.trigger.maybe_start()


dag_run_listener = _DagRunListener()


class _RayViewApp:
    """The Ray view's FastAPI app, imported on its first request.

    Airflow loads plugins in every process that runs tasks too, and the app's imports (Airflow's API
    security module above all) take about 3 s here; only the API server ever serves a request.
    """

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            from airflow_ray_provider.ui.app import app

            self._app = app
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return "airflow_ray_provider.ui.app:app"


class RayProviderPlugin(AirflowPlugin):
    """Registers the gc listener and the Ray view with Airflow."""

    name = "airflow_ray_provider"
    listeners = [dag_run_listener]
    fastapi_apps = [{"app": _RayViewApp(), "url_prefix": "/ray", "name": "Ray objects of a DAG run"}]
    # A tab of each DAG run; the UI fills in the ids. Relative, so it works under a base path.
    external_views = [{"name": "Ray", "href": "ray/view/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
                       "url_route": "ray-objects"}]
