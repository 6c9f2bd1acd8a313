"""``RayHook``: the ``ray`` connection, one bounded connect per process, cluster checks."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from airflow_ray_provider.bundle import driver_runtime_env
from airflow_ray_provider.cluster import ray_compat
from airflow_ray_provider.config import DEFAULT_CONN_ID
from airflow_ray_provider.exceptions import RayConnectionError, RayVersionMismatch
from airflow_ray_provider.hooks.settings import AUTO, LOCAL, RayAddress, RaySettings
from airflow_ray_provider.local_cluster import (
    LocalRayCluster,
    is_loopback_host,
    keep_loopback_addresses,
    port_open,
    set_provider_auth_env,
    user_environ,
)

log = logging.getLogger(__name__)
# What Ray Client's proxier answers when the server process it starts for a new client exits at once.
CLIENT_SERVER_START_FAILED = "Starting Ray client server failed"

_connect_lock = threading.Lock()
# This process's Ray connection, recorded by get_conn: conn_id, address (as given to ray.init), namespace,
# token_sha256, gcs_address (what the driver's core worker talks to) and cluster_id (hex). Only a digest of
# the token is kept, so neither an error message nor a dump of this dict can show the token.
_connected: dict[str, str | None] = {}
# How long the pre-reuse check waits for the GCS behind the connection to say which cluster it is.
_CLUSTER_CHECK_TIMEOUT_S = 5.0
# What the Test button's probe may take to start before its connect (bounded by connect_timeout) begins: a new
# interpreter importing Airflow's config and Ray took more than 30 s with both cores of a 2-core machine busy
# (stress-ng beside the test suite), and the button then reported a cluster that answered as unreachable.
PROBE_STARTUP_S = 120.0
# A week, in seconds (fits Ray's int32 config even as milliseconds); see _connect_bounded.
_GCS_RECONNECT_ENV = ray_compat.GCS_RECONNECT_TIMEOUT_ENV
_DRIVER_GCS_RECONNECT_TIMEOUT_S = str(7 * 24 * 3600)


class RayHook(BaseHook):
    """Connects this process to the Ray cluster named by a ``ray`` connection.

    A process joins at most one cluster and reuses that connection for every
    task it runs. Without a ``ray_default`` connection (or with address
    ``local``) the embedded local head is started once and reused.
    """

    conn_name_attr = "ray_conn_id"
    default_conn_name = DEFAULT_CONN_ID
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
            if self._settings.address.kind == LOCAL and self._settings.gateway_url is None:
                # (Through a gateway, the address is unused and the password is the cluster's token.)
                # The embedded head accepts only its own token (its token file, or the user's
                # RAY_AUTH_TOKEN it was started with: LocalRayCluster.auth_token knows which), so a
                # password on a `local` connection could only be wrong: it is ignored, visibly.
                token = LocalRayCluster().auth_token()
                if self._settings.auth_token and self._settings.auth_token != token:
                    self.log.warning("Connection %r names the embedded head (address local); its password is "
                                     "ignored: the head's own token is used", self.ray_conn_id)
                self._settings = dataclasses.replace(self._settings, auth_token=token)
        return self._settings

    # -- connecting --------------------------------------------------------------
    def resolve_address(self) -> str:
        """The address handed to ``ray.init``; starts the embedded head for ``local``."""
        address = self.settings.address
        if address.kind == LOCAL or (address.kind == "gcs" and is_loopback_host(address.host)):
            keep_loopback_addresses()  # else Ray dials the machine's address, where the local head is not
        if address.kind == LOCAL:
            return LocalRayCluster().ensure_running().address
        if address.kind == AUTO:
            return AUTO
        return str(address)

    def get_conn(self) -> Any:
        """Connect this process to the cluster once (bounded by ``connect_timeout``) and return ``ray``.

        A process keeps one connection, with one identity (address, namespace, token). A later call
        whose connection differs in any of them is refused, naming both connections; reusing the first
        would run the task as someone else, or on another cluster than its connection names.

        Before the connection is reused, the GCS behind it must still be the cluster this process
        joined: after a restart behind the same host:port, the driver's next ``ray.nodes()`` dies in
        Ray's C++ core ("WrongClusterID") and takes the whole process (``airflow dags test``, a
        triggerer) with it, with no Python exception. A replaced cluster is reconnected to, with a
        warning; one that does not answer fails the task with an error naming it.
        """
        import ray

        settings = self.settings
        with _connect_lock:
            target = self.resolve_address()
            wanted = _identity(self.ray_conn_id, target, settings)
            if ray.is_initialized():
                if not _connected:
                    return ray  # joined by other code (user code, a Ray worker): no identity to compare
                differs = _differences(_connected, wanted)
                if differs and _connected.get("conn_id") != self.ray_conn_id:
                    _precheck_tcp(settings.address, target, min(5.0, settings.connect_timeout))
                    raise self._identity_error(differs)
                timeout = min(_CLUSTER_CHECK_TIMEOUT_S, settings.connect_timeout)
                state, answering = _cluster_status(_connected, timeout)
                if state == _SAME:
                    if differs:  # e.g. the connection's token was edited while its cluster kept running
                        raise self._identity_error(differs)
                    return ray
                joined = _connected.get("cluster_id")
                if state == _UNREACHABLE and not differs:
                    # Not a reconnect: if the same cluster comes back (GCS fault tolerance) the connection
                    # is still good, and a retry of the task reuses it; a new cluster is joined then.
                    raise RayConnectionError(
                        f"The Ray cluster at {target} (cluster id {joined}), which this process is connected "
                        f"to through connection {_connected.get('conn_id')!r}, does not answer at its GCS "
                        f"{_connected.get('gcs_address')} ({answering}); it is down or restarting"
                    )
                # Replaced behind the same address, or gone while this connection now names another
                # address (the embedded head restarted on new ports): nothing of the old one is usable.
                self.log.warning(
                    "The Ray cluster at %s changed under this process (joined cluster id %s, now %s); "
                    "disconnecting and connecting to %s through connection %r",
                    _connected.get("address"), joined, answering, target, self.ray_conn_id,
                )
                _disconnect(_connected.get("address"))
            _connect_bounded(target, settings)
            gcs_address, cluster_id = _joined_cluster()
            if gcs_address is not None:  # a driver of its own (not Ray Client, whose driver is in the cluster)
                self._warn_if_an_outage_ends_this_process(target)
            _connected.clear()
            _connected.update(wanted, gcs_address=gcs_address, cluster_id=cluster_id)
        return ray

    def _warn_if_an_outage_ends_this_process(self, target: str) -> None:
        try:
            system_config = ray_compat.cluster_system_config()
        except Exception as exc:  # noqa: BLE001 - a warning we cannot give must not fail the task
            self.log.debug("Could not read the system config of the Ray cluster at %s: %s", target, exc)
            return
        warning = outage_limit_warning(system_config, target,
                                       os.environ.get(_GCS_RECONNECT_ENV, _DRIVER_GCS_RECONNECT_TIMEOUT_S))
        if warning:
            self.log.warning(warning)

    def _identity_error(self, differs: list[str]) -> RayConnectionError:
        return RayConnectionError(
            f"This process is already connected to the Ray cluster at {_connected.get('address')} "
            f"(namespace {_connected.get('namespace')}) through connection {_connected.get('conn_id')!r}; "
            f"connection {self.ray_conn_id!r} differs in {'; '.join(differs)}. One process joins one Ray "
            f"cluster with one identity, so it is not reused. Use one Ray connection per worker."
        )

    # -- checks ------------------------------------------------------------------
    def owners(self) -> Any:
        """What lists and releases the keys the owner actors hold (gc, the Ray tab): the connection's gateway
        client, or, as a Ray driver (connecting this process), ``submission.DriverOwners``."""
        if self.settings.gateway_url is not None:
            from airflow_ray_provider.gateway_client import client_for

            return client_for(self.settings)
        from airflow_ray_provider.submission import DriverOwners

        self.get_conn()
        return DriverOwners()

    def check_feasible(self, request: dict[str, float], task_label: str) -> None:
        """Fail fast if no single alive node could ever run a task needing ``request``."""
        import ray

        if not self.settings.autoscaling:
            check_feasible([n["Resources"] for n in ray.nodes() if n.get("Alive")], request, task_label,
                           f"the Ray cluster at {_connected.get('address')}")

    def test_connection(self) -> tuple[bool, str]:
        """Power the UI's Test button; probes in a subprocess so the API server never joins a cluster (or, through a
        gateway, asks the gateway over HTTP)."""
        try:
            settings = self.settings
            if settings.gateway_url is not None:
                from airflow_ray_provider.gateway_bootstrap import test_gateway

                return test_gateway(settings)
            target = self.resolve_address()
        except Exception as exc:  # noqa: BLE001 - shown to the user in the UI
            return False, str(exc)
        # The probe tests this connection, so it gets only this connection's token, never one this
        # process holds from connecting elsewhere.
        env = {**user_environ(), "RAY_USAGE_STATS_ENABLED": "0"}
        if settings.auth_token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=settings.auth_token)
        cmd = [sys.executable, "-m", "airflow_ray_provider.hooks.probe", target, settings.namespace,
               str(settings.connect_timeout)]
        # The probe bounds its own connect by connect_timeout; this bound also covers starting it (Python, Airflow's
        # config, Ray), which alone took more than 30 s on a 2-core machine with both cores busy.
        bound = settings.connect_timeout + PROBE_STARTUP_S
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=bound)
        except subprocess.TimeoutExpired:
            return False, (f"The connection test of the Ray cluster at {target} did not finish within {bound:.0f}s "
                           f"(starting its probe process, then connecting for up to {settings.connect_timeout:.0f}s)")
        lines = (proc.stdout.strip() or proc.stderr.strip() or "no output").splitlines()
        if proc.returncode != 0:
            return False, lines[-1]
        # Say which field named the cluster, so a Host/Port or address the user did not mean is visible.
        source = {
            "address": f"from the 'address' extra {str(settings.address)!r}",
            "host/port": "from Host/Port",
            "default": "no address set",
        }.get(settings.address_source, settings.address_source)
        where = f"embedded head, {source}" if settings.address.kind == LOCAL else source
        return True, f"{lines[-1]} ({where})"

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        from airflow_ray_provider.get_provider_info import get_provider_info

        return get_provider_info()["connection-types"][0]["ui-field-behaviour"]


def dashboard_url(settings: RaySettings) -> str | None:
    """The connection's ``dashboard_url``, else for the embedded head its own dashboard when it runs one
    (``airflow-ray local start --dashboard``); None: no dashboard to link to.

    Not what the cluster itself reports: on a remote cluster that is the head's internal address,
    which a browser outside the cluster's network usually cannot open.
    """
    if settings.dashboard_url or settings.address.kind != LOCAL:
        return settings.dashboard_url
    state = LocalRayCluster().status()
    return state.dashboard_url.rstrip("/") if state is not None and state.dashboard_url else None


def check_feasible(nodes: list[dict[str, float]], request: dict[str, float], task_label: str, where: str) -> None:
    """Raise if none of ``nodes`` (each alive node's total resources) offers all of ``request``."""
    needed = {k: v for k, v in request.items() if v}
    if any(all(node.get(k, 0.0) >= v for k, v in needed.items()) for node in nodes):
        return
    missing = []
    for name, amount in needed.items():
        best = max((node.get(name, 0.0) for node in nodes), default=0.0)
        if best < amount:
            missing.append(f"{name}={_fmt(amount)} (largest node has {_fmt(best)})")
    detail = ", ".join(missing) or "that combination of " + ", ".join(f"{k}={_fmt(v)}" for k, v in needed.items())
    raise RayConnectionError(
        f"Task {task_label} can never run on {where}: no node offers {detail}. Lower the request, or set the "
        f'connection extra "autoscaling": true if the cluster adds nodes on demand.'
    )


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _identity(conn_id: str, target: str, settings: RaySettings) -> dict[str, str | None]:
    """What makes two connections the same one for this process (the token only as a digest)."""
    token = settings.auth_token
    return {
        "conn_id": conn_id,
        "address": target,
        "namespace": settings.namespace,
        "token_sha256": hashlib.sha256(token.encode()).hexdigest() if token else None,
    }


def _differences(current: dict[str, str | None], wanted: dict[str, str | None]) -> list[str]:
    """How ``wanted`` differs from the connection in use, worded without the tokens or their digests."""
    found = []
    if current.get("address") != wanted["address"]:
        found.append(f"the cluster address ({current.get('address')} in use, {wanted['address']} asked)")
    if current.get("namespace") != wanted["namespace"]:
        found.append(f"the namespace ({current.get('namespace')} in use, {wanted['namespace']} asked)")
    old, new = current.get("token_sha256"), wanted["token_sha256"]
    if old != new:
        detail = ("none in use, one asked" if old is None else "one in use, none asked" if new is None
                  else "a different token; neither is shown")
        found.append(f"the auth token ({detail})")
    return found


_SAME, _REPLACED, _UNREACHABLE = "same", "replaced", "unreachable"


def _joined_cluster() -> tuple[str | None, str | None]:
    """``(gcs_address, cluster_id hex)`` of the cluster this driver is connected to; ``(None, None)`` for
    Ray Client (``ray://``), whose driver runs in the cluster's client server, not here."""
    return ray_compat.joined_cluster()


def _cluster_status(connected: dict[str, str | None], timeout: float) -> tuple[str, str]:
    """Whether the GCS at the connected address is still the cluster this process joined.

    Asks through a fresh, standalone GCS client, never the driver's own: that one sends the joined
    cluster id, and Ray aborts the process when a restarted GCS rejects it. The fresh client fetches
    the id of whatever answers (about 0.5 ms on a healthy local head). Returns ``(state, what answers)``.
    """
    gcs_address, joined = connected.get("gcs_address"), connected.get("cluster_id")
    if not gcs_address or not joined:
        return _SAME, "not checked"  # Ray Client: the cluster's client server holds the driver
    host, _, port = gcs_address.rpartition(":")
    # A closed port is the common "down" case: without this, the GCS client below would sit out its
    # own connect timeouts (about 11 s here) and log warnings for each of them.
    if not port_open(host.strip("[]"), int(port), timeout=min(timeout, 2.0)):
        return _UNREACHABLE, "nothing accepts connections there"
    outcome: dict[str, Any] = {}

    def _ask() -> None:
        try:
            outcome["id"] = ray_compat.cluster_id_at(gcs_address, timeout)
        except Exception as exc:  # noqa: BLE001 - classified below
            outcome["error"] = exc

    # A helper thread bounds the call: the GCS client's own timeouts add up to about 11 s (the call
    # releases the GIL, so the thread costs about 0.1 ms, not the bound).
    thread = threading.Thread(target=_ask, name="airflow-ray-cluster-check", daemon=True)
    thread.start()
    thread.join(timeout)
    if "id" in outcome:
        return (_SAME, outcome["id"]) if outcome["id"] == joined else (_REPLACED, outcome["id"])
    error = outcome.get("error")
    if error is None:
        return _UNREACHABLE, f"no answer within {timeout:g}s"
    if _refused_token(error):
        # The joined cluster accepted this token; one that refuses it is another cluster.
        return _REPLACED, "a cluster that refuses this process's token"
    return _UNREACHABLE, f"{type(error).__name__}: {error}"


def _disconnect(address: str | None) -> None:
    """``ray.shutdown()`` of a connection whose cluster is gone (about 0.4 s; 5 s while its GCS is down)."""
    import ray

    try:
        ray.shutdown()
    except Exception as exc:
        raise RayConnectionError(
            f"Cannot disconnect from the replaced Ray cluster at {address} to reconnect: {exc}"
        ) from exc
    finally:
        _connected.clear()


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
    This is what Ray's own ``ray start`` does after enabling token auth (private API: ``ray_compat``)."""
    ray_compat.reload_auth_config()


def outage_limit_warning(system_config: dict[str, Any], target: str, wanted_s: str) -> str | None:
    """Why a head outage would end this process, if the cluster's own ``gcs_rpc_server_reconnect_timeout_s`` is
    below the ``wanted_s`` this provider (or the user's environment) gives its drivers; else None.

    Measured (Ray 2.60, ``ray start --head --system-config '{"gcs_rpc_server_reconnect_timeout_s": 5}'``): a
    driver started with ``RAY_gcs_rpc_server_reconnect_timeout_s=600`` exited 5 s after the GCS was killed.
    A value in the cluster's system config wins over the driver's environment; one in the head's environment
    does not reach drivers at all.
    """
    value = system_config.get(ray_compat.GCS_RECONNECT_TIMEOUT_NAME)
    try:
        if value is None or float(value) >= float(wanted_s):
            return None
    except (TypeError, ValueError):
        pass  # not a number: Ray would not have started with it; say what it is anyway
    return (f"The Ray cluster at {target} sets {ray_compat.GCS_RECONNECT_TIMEOUT_NAME} = {value!r} in its system "
            f"config, which overrides the {wanted_s} s this process asked for: if the cluster's head (its GCS) "
            f"is unreachable for longer than that, Ray ends this Airflow process without a Python error, and "
            f"Airflow sees the task as killed. Raise or remove it in the head's `ray start --system-config`.")


def _connect_bounded(target: str, settings: RaySettings) -> None:
    """``ray.init`` retries for minutes on a dead address; bound it and name the address.

    It runs in a helper thread for the bound, which has a second purpose: on the main
    thread ``ray.init`` replaces the SIGTERM handler with ``sys.exit``, and Airflow's own
    handler (which calls ``on_kill`` and so cancels the Ray task) would never run.
    """
    import ray

    logging.getLogger(ray_compat.WORKER_LOGGER).addFilter(_NO_SIGTERM_WARNING)

    started = time.monotonic()
    address = settings.address if settings.address.kind != LOCAL else RayAddress("gcs")
    if settings.address.kind != LOCAL:
        _precheck_tcp(address, target, min(5.0, settings.connect_timeout))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if settings.auth_token:
        set_provider_auth_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=settings.auth_token)
        _reload_ray_auth_config()
    outcome: dict[str, BaseException | None] = {}
    # Ray's C++ core ends a driver whose GCS stays unreachable for gcs_rpc_server_reconnect_timeout_s
    # (60 s): seen here, an idle `airflow dags test`-like process exited 60 s into its cluster's outage.
    # A long-lived process must outlive an outage (get_conn then refuses tasks naming the cluster, and
    # reconnects once one answers), so the driver gets a week. Ray reads it when the driver's core worker
    # starts (inside ray.init); it is set only for that, so Ray processes started later from this
    # process (the embedded head) keep Ray's default. A value the user set is kept.
    own_reconnect_timeout = _GCS_RECONNECT_ENV not in os.environ
    if own_reconnect_timeout:
        os.environ[_GCS_RECONNECT_ENV] = _DRIVER_GCS_RECONNECT_TIMEOUT_S

    runtime_env = driver_runtime_env()  # the provider's cluster-side code (bundle.py)

    def _init() -> None:
        try:
            ray.init(address=target, namespace=settings.namespace, log_to_driver=False,
                     configure_logging=False, runtime_env=runtime_env)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    def _attempt() -> bool:
        """One bounded ``ray.init``; False if it is still running at the deadline."""
        outcome.clear()
        thread = threading.Thread(target=_init, name="airflow-ray-connect", daemon=True)
        thread.start()
        thread.join(max(1.0, settings.connect_timeout - (time.monotonic() - started)))
        return not thread.is_alive()

    try:
        answered = _attempt()
        if answered and _client_server_start_failed(outcome.get("error")) \
                and time.monotonic() - started < settings.connect_timeout - 1.0:
            # Ray Client's proxier starts one server process per client, on a port it checked a moment
            # before; that start failed once on the loaded CI machine, and a connect that retries gets a
            # new process (Ray's client disconnects after a failed connect, so the retry starts clean).
            log.warning("Ray Client at %s could not start a server for this client (%s); trying once more",
                        target, outcome.get("error"))
            answered = _attempt()
    finally:
        if own_reconnect_timeout:
            os.environ.pop(_GCS_RECONNECT_ENV, None)
    if not answered:
        raise RayConnectionError(
            f"Cannot connect to the Ray cluster at {target}: no answer within {settings.connect_timeout:.0f}s"
        )
    error = outcome.get("error")
    if error is not None:
        if _refused_token(error):
            given = "refused the token in the ray connection's password" if settings.auth_token else (
                "requires a token (RAY_AUTH_MODE=token): put it in the ray connection's password")
            raise RayConnectionError(f"Cannot connect to the Ray cluster at {target}: the cluster {given}") from error
        mismatch = version_mismatch(error)
        if mismatch is not None:
            raise RayVersionMismatch(f"Cannot connect to the Ray cluster at {target}: {mismatch}") from error
        raise RayConnectionError(f"Cannot connect to the Ray cluster at {target}: {error}") from error


_RAY_MISMATCH = re.compile(r"Ray: (?P<cluster_ray>\S+)\s+Python: (?P<cluster_py>\S+).*?"
                           r"Ray: (?P<ray>\S+)\s+Python: (?P<py>\S+)", re.S)


def version_mismatch(error: BaseException | None) -> str | None:
    """What differs, in words, when ``ray.init`` refused a cluster of another Ray or Python version."""
    for cause in _causes(error):
        found = _RAY_MISMATCH.search(str(cause))
        if found and "mismatch" in str(cause).lower():
            return (f"the cluster runs Ray {found['cluster_ray']} on Python {found['cluster_py']}, this process "
                    f"runs Ray {found['ray']} on Python {found['py']}. Client and cluster need the same Ray "
                    f"and Python versions (Ray compares Python to the patch level): install "
                    f"ray=={found['cluster_ray']} here (the provider supports Ray "
                    f"{', '.join(ray_compat.SUPPORTED_RAY)}), or run the cluster on Ray "
                    f"{found['ray']} with Python {found['py']}")
    return None


def _client_server_start_failed(error: BaseException | None) -> bool:
    """Whether ``ray.init("ray://...")`` failed because the proxier's per-client server did not start."""
    return any(CLIENT_SERVER_START_FAILED in str(cause) for cause in _causes(error))


def _refused_token(error: BaseException | None) -> bool:
    """Whether ``ray.init`` failed because of token authentication (Ray wraps it in other errors)."""
    from ray.exceptions import AuthenticationError

    return any(isinstance(cause, AuthenticationError) or "InvalidAuthToken" in str(cause)
               for cause in _causes(error))


def _causes(error: BaseException | None, limit: int = 10) -> Iterator[BaseException]:
    """``error`` and what caused it, outermost first (Ray wraps the real reason in other errors)."""
    while error is not None and limit > 0:
        yield error
        error, limit = error.__cause__ or error.__context__, limit - 1
