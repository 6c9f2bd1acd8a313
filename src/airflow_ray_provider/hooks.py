"""``RayHook``: the ``ray`` connection, one bounded connect per process, cluster checks."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_ray_provider.local_cluster import LocalRayCluster, port_open
from airflow_ray_provider.settings import AUTO, LOCAL, RayAddress, RayConnectionError, RaySettings

_connect_lock = threading.Lock()
_connected: dict[str, str] = {}  # this process's Ray connection: {"address": ..., "namespace": ...}


class RayHook(BaseHook):
    """Connects this process to the Ray cluster named by a ``ray`` connection.

    A process joins at most one cluster and reuses that connection for every
    task it runs. Without a ``ray_default`` connection (or with address
    ``local``) the embedded local head is started once and reused.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, ray_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ray_conn_id = ray_conn_id
        self._settings: RaySettings | None = None

    @property
    def settings(self) -> RaySettings:
        if self._settings is None:
            try:
                conn = self.get_connection(self.ray_conn_id)
            except AirflowNotFoundException:
                if self.ray_conn_id != self.default_conn_name:
                    raise
                self._settings = RaySettings()  # no ray_default: the embedded cluster
            else:
                self._settings = RaySettings.from_fields(
                    host=conn.host, port=conn.port, password=conn.password, extra=conn.extra_dejson
                )
        return self._settings

    # -- connecting --------------------------------------------------------------
    def resolve_address(self) -> str:
        """The address handed to ``ray.init``; starts the embedded head for ``local``."""
        address = self.settings.address
        if address.kind == LOCAL:
            return LocalRayCluster().ensure_running().address
        if address.kind == AUTO:
            return AUTO
        return str(address)

    def get_conn(self) -> Any:
        """Connect this process to the cluster once (bounded by ``connect_timeout``) and return ``ray``."""
        import ray

        settings = self.settings
        with _connect_lock:
            target = self.resolve_address()
            if ray.is_initialized():
                current = _connected.get("address")
                if current not in (None, target) or _connected.get("namespace") not in (None, settings.namespace):
                    _precheck_tcp(settings.address, target, min(5.0, settings.connect_timeout))
                    raise RayConnectionError(
                        f"This process is already connected to the Ray cluster at {current} "
                        f"(namespace {_connected.get('namespace')}); connection {self.ray_conn_id!r} "
                        f"asks for {target} (namespace {settings.namespace}). Use one Ray connection per worker."
                    )
                return ray
            _connect_bounded(target, settings)
            _connected.update(address=target, namespace=settings.namespace)
        return ray

    # -- checks ------------------------------------------------------------------
    def check_feasible(self, request: dict[str, float], task_label: str) -> None:
        """Fail fast if no single alive node could ever run a task needing ``request``."""
        import ray

        if self.settings.autoscaling:
            return  # the autoscaler may add a node that fits
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        needed = {k: v for k, v in request.items() if v}
        if any(all(node["Resources"].get(k, 0.0) >= v for k, v in needed.items()) for node in nodes):
            return
        missing = []
        for name, amount in needed.items():
            best = max((node["Resources"].get(name, 0.0) for node in nodes), default=0.0)
            if best < amount:
                missing.append(f"{name}={_fmt(amount)} (largest node has {_fmt(best)})")
        detail = ", ".join(missing) or "that combination of " + ", ".join(f"{k}={_fmt(v)}" for k, v in needed.items())
        raise RayConnectionError(
            f"Task {task_label} can never run on the Ray cluster at {_connected.get('address')}: "
            f"no node offers {detail}. Lower the request, or set the connection extra "
            f'"autoscaling": true if the cluster adds nodes on demand.'
        )

    def test_connection(self) -> tuple[bool, str]:
        """Power the UI's Test button; probes in a subprocess so the API server never joins a cluster."""
        try:
            settings = self.settings
            target = self.resolve_address()
        except Exception as exc:  # noqa: BLE001 - shown to the user in the UI
            return False, str(exc)
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        if settings.auth_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=settings.auth_token)
        cmd = [sys.executable, "-m", "airflow_ray_provider.probe", target, settings.namespace,
               str(settings.connect_timeout)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=settings.connect_timeout + 30)
        except subprocess.TimeoutExpired:
            return False, f"Ray cluster at {target} did not answer within {settings.connect_timeout:.0f}s"
        lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
        return proc.returncode == 0, lines[-1]

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        from airflow_ray_provider.get_provider_info import get_provider_info

        return get_provider_info()["connection-types"][0]["ui-field-behaviour"]


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _precheck_tcp(address: RayAddress, target: str, timeout: float) -> None:
    if address.kind in (LOCAL, AUTO) or address.host is None or address.port is None:
        return
    if not port_open(address.host, address.port, timeout=timeout):
        raise RayConnectionError(
            f"Cannot reach the Ray cluster at {target}: nothing accepts connections on "
            f"{address.host}:{address.port} (checked for {timeout:.0f}s)"
        )


class _NoSigtermWarning(logging.Filter):
    """Drop Ray's warning that it did not install its SIGTERM handler (we want Airflow's kept)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_NO_SIGTERM_WARNING = _NoSigtermWarning()  # one instance: addFilter ignores an instance it already has


def _reload_ray_auth_config() -> None:
    """Ray reads ``RAY_AUTH_MODE`` and the token when it is imported, long before a task picks its
    connection; without a reload the token set above is never sent and the cluster refuses the driver.
    This is what Ray's own ``ray start`` does after enabling token auth (a private API, pinned Ray)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _connect_bounded(target: str, settings: RaySettings) -> None:
    """``ray.init`` retries for minutes on a dead address; bound it and name the address.

    It runs in a helper thread for the bound, which has a second purpose: on the main
    thread ``ray.init`` replaces the SIGTERM handler with ``sys.exit``, and Airflow's own
    handler (which calls ``on_kill`` and so cancels the Ray task) would never run.
    """
    import ray

    logging.getLogger("ray._private.worker").addFilter(_NO_SIGTERM_WARNING)

    started = time.monotonic()
    address = settings.address if settings.address.kind != LOCAL else RayAddress("gcs")
    if settings.address.kind != LOCAL:
        _precheck_tcp(address, target, min(5.0, settings.connect_timeout))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.auth_token:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = settings.auth_token
        _reload_ray_auth_config()
    outcome: dict[str, BaseException | None] = {}

    def _init() -> None:
        try:
            ray.init(address=target, namespace=settings.namespace, log_to_driver=False,
                     configure_logging=False)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=_init, name="airflow-ray-connect", daemon=True)
    thread.start()
    thread.join(max(1.0, settings.connect_timeout - (time.monotonic() - started)))
    if thread.is_alive():
        raise RayConnectionError(
            f"Cannot connect to the Ray cluster at {target}: no answer within {settings.connect_timeout:.0f}s"
        )
    error = outcome.get("error")
    if error is not None:
        if _refused_token(error):
            given = "refused the token in the ray connection's password" if settings.auth_token else (
                "requires a token (RAY_AUTH_MODE=token): put it in the ray connection's password")
            raise RayConnectionError(f"Cannot connect to the Ray cluster at {target}: the cluster {given}") from error
        raise RayConnectionError(f"Cannot connect to the Ray cluster at {target}: {error}") from error


def _refused_token(error: BaseException | None) -> bool:
    """Whether ``ray.init`` failed because of token authentication (Ray wraps it in other errors)."""
    from ray.exceptions import AuthenticationError

    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False
